"""Serving on one node: the runner pool, the router, and the engine the APIs call."""
