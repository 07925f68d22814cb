"""Replacing a model directory in one step, shared by the store and the GGUF importer.

Pure file-system code (no MLX), so the control plane can store hub snapshots without loading
the converter.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory `src` to `dst`, replacing any existing `dst` without a moment of absence
    for readers of a complete `dst` other than the rename itself."""
    try:
        os.rename(src, dst)
        return
    except OSError:
        if not dst.exists():
            raise
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
    os.rename(dst, old / dst.name)
    try:
        os.rename(src, dst)
    except BaseException:
        os.rename(old / dst.name, dst)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
