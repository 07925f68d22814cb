"""Tooling that ships flock but stays out of its runtime package: the zipapp builder
(`python -m deploy.zipapp`, what `make dist` runs) with its wheel resolution and site-packages
layout; beside it, the service and monitoring templates (systemd/, launchd/, prometheus/,
grafana/).
"""
