"""A GGUF file's header read without MLX: each tensor's ggml type, and the `keep` refusal.

MLX's GGUF reader keeps Q4_0/Q4_1/Q8_0 quantized and returns every other quantized type as
float16, so what `--dtype keep` may import is decided from the header before any weight is read.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any


class GGUFImportError(ValueError):
    """The GGUF file cannot be turned into an mlx-lm model (architecture, tokenizer, tensor...)."""


# ggml tensor types MLX's GGUF reader returns as MLX-quantized weight/scales/biases (group 32);
# it returns every other quantized type (the K-quants, IQ*) dequantized to float16.
_KEPT_TYPES = {2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}
_FLOAT_TYPES = {0: "F32", 1: "F16", 30: "BF16"}
_GGML_NAMES = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K",
               14: "Q6_K", 15: "Q8_K"}


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """Each tensor's ggml type, read from the GGUF header (metadata is skipped, not kept)."""
    import struct

    def unpack(f: Any, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, f.read(size))[0]

    def string(f: Any) -> bytes:
        return f.read(unpack(f, "<Q"))

    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
              11: "<q", 12: "<d"}

    def skip(f: Any, kind: int) -> None:
        if kind == 8:
            string(f)
        elif kind == 9:
            item, count = unpack(f, "<I"), unpack(f, "<Q")
            if item in scalar:
                f.seek(count * struct.calcsize(scalar[item]), os.SEEK_CUR)
            else:
                for _ in range(count):
                    skip(f, item)
        else:
            f.seek(struct.calcsize(scalar[kind]), os.SEEK_CUR)

    types: dict[str, int] = {}
    with Path(path).open("rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFImportError(f"{path} is not a GGUF file")
        _version, tensors, entries = struct.unpack("<IQQ", f.read(20))
        for _ in range(entries):
            string(f)
            skip(f, unpack(f, "<I"))
        for _ in range(tensors):
            name = string(f).decode()
            dims = unpack(f, "<I")
            f.seek(8 * dims, os.SEEK_CUR)
            types[name] = unpack(f, "<I")
            f.seek(8, os.SEEK_CUR)  # offset
    return types


def refuse_unkept(path: Path) -> None:
    """`keep` stores what MLX reads quantized; a K-quant would arrive as float16 (twice the size
    of a 8-bit kept weight, four times a 4-bit one), so it is refused rather than kept silently."""
    others = Counter(_GGML_NAMES.get(t, f"type {t}") for t in gguf_tensor_types(path).values()
                     if t not in _KEPT_TYPES and t not in _FLOAT_TYPES)
    if others:
        found = ", ".join(f"{n} ({c} tensors)" for n, c in sorted(others.items()))
        raise GGUFImportError(
            f"{path.name} has tensors in {found}, which MLX cannot keep quantized (it reads them "
            f"as float16): --dtype keep imports only Q4_0, Q4_1, Q8_0 and float tensors; import "
            f"it with --dtype float32, float16 or bfloat16 instead")
