"""`flock doctor`: checks of this machine, its node and its peers, each ok / warn / fail with the
fix for anything not ok.

Checks are pure functions over facts gathered first (`agent.doctor.run` gathers; the other
modules hold one group of checks each), so each can be tested on recorded facts; what must
import MLX runs in a subprocess (`agent.doctor.local.probe_mlx`), never in the agent.
"""
