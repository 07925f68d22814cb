"""Loading a model directory's tokenizer for the agent: chat templates and token counting.

The one place the control plane gets a tokenizer from (templating, tokenizing, tool formats).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_tokenizer(model_dir: Path) -> Any:
    """The tokenizer of an mlx-lm/HF model directory (its chat template included)."""
    from mlx_lm.tokenizer_utils import load as load_mlx_tokenizer

    return load_mlx_tokenizer(model_dir)
