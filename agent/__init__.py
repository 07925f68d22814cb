"""flock: a node agent that pools several machines into one LLM inference cluster."""

__version__ = "0.1.0"
