"""Llama 3 rope scaling recovered from the per-frequency divisors llama.cpp writes to GGUF
(`rope_freqs.weight`), by matching the known parameterisations. Pure arithmetic."""

from __future__ import annotations

import math

from agent.models.gguf_header import GGUFImportError


def round_float32(x: float) -> float:
    """GGUF stores float32; print 100000.0 rather than 99999.99744..."""
    return float(f"{x:.7g}")


def _llama3_divisors(
    head_dim: int, theta: float, factor: float, low: float, high: float, original: int
) -> list[float]:
    # The same computation llama.cpp's converter runs to write rope_freqs.
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def llama3_scaling_from_divisors(
    divisors: list[float], head_dim: int, theta: float
) -> dict | None:
    if all(abs(d - 1.0) < 1e-6 for d in divisors):
        return None
    factor = round_float32(max(divisors))
    for original in (8192, 4096, 16384, 32768, 2048, 65536, 131072):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0), (1.0, 8.0)):
            expected = _llama3_divisors(head_dim, theta, factor, low, high, original)
            if len(expected) == len(divisors) and all(
                math.isclose(a, b, rel_tol=1e-4) for a, b in zip(expected, divisors, strict=True)
            ):
                return {
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": original,
                }
    raise GGUFImportError("rope_freqs does not match any known llama3 rope scaling")
