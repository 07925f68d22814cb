"""flock's fused CPU attention kernels (native/flockattn.cpp): building, loading, calling.

On Linux without a GPU, MLX's CPU attention runs the scores, mask and softmax as separate
single-threaded ops; the extension's prefill kernel is flash-style (query blocks x key blocks,
online softmax, block products through OpenBLAS, threads across heads and query blocks) and its
decode kernel reads each row's cache once up to that row's position. Runners call
`prefill_attention` / `decode_attention`, which use the extension where it is loaded and MLX's
own ops otherwise, so Metal, CUDA, float16 and a missing build all keep the pure-MLX path.
A decode step's few-row float32 projections run through `dense` (native/flockdense.cpp: each
weight row read once, rows handed to the kernel threads in chunks), and a single node's dense
layers through `layer_entry` / `layer_block` (native/flocklayer.cpp: a layer is 5 ops), and a
decode step's mixture-of-experts MLP through `moe_experts` (native/flockmoe.cpp: the selected
experts' SwiGLU, down projections and weighted sum in one op).

The agent process never imports MLX: `resolve_kernels` and `describe_kernels` only look for the
built file. Runners learn from FLOCK_KERNELS_LIB (set by agent.runtime.environment) which file to
load, or "off"; unset (tests, benches) they load the one shipped next to this module if any.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import os
import platform
import secrets
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import mlx.core as mx

    from agent.runtime.kv import KvQuant
    from agent.settings import NodeSettings

log = logging.getLogger(__name__)

NATIVE_DIR = Path(__file__).resolve().parent / "native"
SOURCE = NATIVE_DIR / "flockattn.cpp"
# Compiled into the one extension with SOURCE (flockattn.h declares what they share).
SOURCES = (SOURCE, NATIVE_DIR / "flockthreads.cpp", NATIVE_DIR / "flockkv.cpp",
           NATIVE_DIR / "flockdecode.cpp", NATIVE_DIR / "flockops.cpp",
           NATIVE_DIR / "flockdense.cpp", NATIVE_DIR / "flocklayer.cpp",
           NATIVE_DIR / "flockmoe.cpp")
MODULE = "_flockattn"  # the name NB_MODULE gives it: its PyInit__flockattn symbol
ENV = "FLOCK_KERNELS_LIB"  # runner side: a file to load, or "off" (FLOCK_KERNELS is the setting)
# MLX 0.32's Python module is built with nanobind's ABI v22 in the "mlx" domain; the extension
# must match both for mx.array to cross the binding.
NANOBIND = "nanobind==3.1.0"
KERNELS = ("fused prefill + decode attention, RMSNorm/RoPE/SwiGLU ops, few-row projections, "
           "whole-layer decode, few-row experts")


class KernelError(RuntimeError):
    """The extension could not be built or loaded."""


@dataclass(frozen=True)
class KernelsUnavailable:
    reason: str


def mlx_version() -> str:
    try:
        return importlib.metadata.version("mlx")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def kernel_filename() -> str:
    """One file per MLX release (the C++ ABI of mx::array), CPython and platform."""
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return f"{MODULE}-mlx{mlx_version()}-{py}-{sys.platform}-{platform.machine()}.so"


# -- building (make native, make dist) -----------------------------------------------------------


def _nanobind_dir(hint: Path | None) -> Path:
    candidates = [hint] if hint else []
    spec = importlib.util.find_spec("nanobind")
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent)
    candidates.append(Path(__file__).resolve().parents[2] / "build" / "nanobind" / "nanobind")
    for path in candidates:
        if path is not None and (path / "src" / "nb_combined.cpp").is_file():
            return path
    raise KernelError(f"nanobind sources not found (pip install {NANOBIND}, or --nanobind DIR)")


def _mlx_dir() -> Path:
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        raise KernelError("mlx is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    if not (root / "include" / "mlx" / "mlx.h").is_file():
        raise KernelError(f"{root} has no C++ headers (an mlx wheel without include/)")
    return root


def build_command(output: str, nanobind: Path, mlx_dir: Path) -> list[str]:
    compiler = next((cc for cc in ("g++", "c++", "clang++") if shutil.which(cc)), None)
    if compiler is None:
        raise KernelError("no C++ compiler (g++, c++, clang++) on PATH")
    python_include = sysconfig.get_paths()["include"]
    return [
        compiler, "-O3", "-std=c++20", "-shared", "-fPIC", "-fvisibility=hidden",
        # omp simd pragmas without the OpenMP runtime; no trapping math so the clamps in the
        # softmax's exp vectorise (they stay exact: no -ffast-math).
        "-fopenmp-simd", "-fno-trapping-math", "-DNB_DOMAIN=mlx", "-DNDEBUG",
        f"-I{mlx_dir / 'include'}", f"-I{nanobind / 'include'}",
        f"-I{nanobind / 'ext' / 'robin_map' / 'include'}", f"-I{python_include}",
        "-o", output, *(str(src) for src in SOURCES), str(nanobind / "src" / "nb_combined.cpp"),
        # libmlx.so is found by its soname: mlx.core has loaded it before the extension is.
        f"-L{mlx_dir / 'lib'}", "-lmlx", "-ldl", "-pthread",
    ]


def build_kernels(out_dir: Path, *, nanobind: Path | None = None, name: str | None = None) -> Path:
    """Compile the extension into out_dir (atomically: runners may be loading the old one)."""
    if sys.platform != "linux":
        raise KernelError(f"the kernels are for Linux CPUs, not {sys.platform}")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / (name or kernel_filename())
    partial = out_dir / f".flockattn-{os.getpid()}-{secrets.token_hex(4)}.so"
    command = build_command(str(partial), _nanobind_dir(nanobind), _mlx_dir())
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise KernelError(f"{' '.join(command)} failed: {done.stderr.strip()[-2000:]}")
        os.chmod(partial, 0o755)
        probe(partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


_PROBE = f"""
import sys
sys.path[:0] = [{str(Path(__file__).resolve().parents[2])!r}]
from agent.runtime import kernels
mod = kernels.load_module(sys.argv[1])
import mlx.core as mx
q, k, v = (mx.random.normal((1, h, 5, 8)) for h in (4, 2, 2))
ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask="causal")
got = mod.prefill_attention(q, [k], [v], 0.3, 0)
assert mx.allclose(got, ref.transpose(0, 2, 1, 3).reshape(1, 5, -1), atol=1e-5).item()
print("ok")
"""


def probe(path: Path) -> None:
    """Load the file in a fresh process and run one small attention against MLX's."""
    done = subprocess.run([sys.executable, "-I", "-c", _PROBE, str(path)], capture_output=True,
                          text=True, timeout=120, check=False)
    if done.returncode != 0 or "ok" not in done.stdout:
        raise KernelError(f"{path.name} does not load: {done.stderr.strip()[-1000:]}")


# -- the agent's view (no MLX import) ------------------------------------------------------------


def resolve_kernels() -> Path | KernelsUnavailable:
    """The built extension for this machine's MLX and CPython, or why runners go without."""
    if sys.platform != "linux":
        return KernelsUnavailable(f"not used on {sys.platform} (MLX's Metal/Accelerate kernels)")
    path = NATIVE_DIR / kernel_filename()
    if path.is_file():
        return path
    built = sorted(p.name for p in NATIVE_DIR.glob(f"{MODULE}-*.so"))
    have = f" (have {', '.join(built)})" if built else ""
    return KernelsUnavailable(f"no {path.name} ships with this flock{have}; `make native` "
                              "builds it")


def describe_kernels(settings: NodeSettings | None = None) -> str:
    """A short line for `flock version`, node profiles and logs."""
    if settings is not None and settings.kernels == "off":
        return "off (kernels = off)"
    if _loaded is not None:
        return f"flockattn: {KERNELS} ({_threads} threads)" if _loaded else "pure MLX"
    found = resolve_kernels()
    if isinstance(found, KernelsUnavailable):
        return f"pure MLX; {found.reason}"
    return f"flockattn: {KERNELS} (mlx {mlx_version()})"


def kernels_env(settings: NodeSettings) -> tuple[dict[str, str], str | None]:
    """FLOCK_KERNELS_LIB for one runner, and a warning when it falls back to MLX's attention."""
    if sys.platform != "linux":
        return {}, None
    if settings.kernels == "off":
        return {ENV: "off"}, None
    found = resolve_kernels()
    if isinstance(found, KernelsUnavailable):
        return {ENV: "off"}, (f"runners use MLX's CPU attention (long prompts several times "
                              f"slower): {found.reason}; set kernels = \"off\" to silence this")
    return {ENV: str(found)}, None


# -- the runner's side ---------------------------------------------------------------------------

_loaded: bool | None = None  # None: not decided yet
_module: Any = None
_threads = 1


def load_module(path: str | Path) -> ModuleType:
    """Import the extension from a file of any name (its init symbol fixes the module name)."""
    import mlx.core  # noqa: F401  (libmlx.so must be loaded for the extension's soname lookup)

    loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
    spec = importlib.util.spec_from_file_location(MODULE, str(path), loader=loader)
    if spec is None:
        raise KernelError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _default_threads() -> int:
    # The runner's budget: environment.py sets OPENBLAS_NUM_THREADS to its share of the cores.
    value = os.environ.get("OPENBLAS_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    from agent.sysinfo import usable_cores

    return usable_cores()


def _blas_path() -> str:
    lib = os.environ.get("FLOCK_BLAS_LIB")
    if lib:
        return lib
    from agent.runtime.blas import find_openblas

    found = find_openblas()
    return found.path if found is not None else ""


def enabled() -> bool:
    """Whether this process computes attention with the extension; decided (and logged) once."""
    global _loaded, _module, _threads
    if _loaded is not None:
        return _loaded
    _loaded = False
    setting = os.environ.get(ENV, "")
    if sys.platform != "linux" or setting == "off":
        return False
    import mlx.core as mx

    if mx.default_device().type != mx.DeviceType.cpu:
        return False
    path = Path(setting) if setting else NATIVE_DIR / kernel_filename()
    if not path.is_file():
        if setting:
            log.warning("flock kernels not loaded: %s is missing; attention uses MLX's CPU ops",
                        path)
        return False
    try:
        module = load_module(path)
        _threads = _default_threads()
        module.configure(_blas_path(), _threads)
    except (ImportError, OSError, RuntimeError, KernelError) as e:
        log.warning("flock kernels not loaded (%s): attention uses MLX's CPU ops", e)
        return False
    _module, _loaded = module, True
    log.info("attention: flockattn kernels (%d threads, BLAS %s)", _threads,
             _blas_path() or "linked")
    return True


def set_enabled(on: bool) -> bool:
    """Turn the kernels on (loading them if need be) or off in this process; returns the state.
    For tests and benches that compare both paths in one process (a step compiled before keeps
    the path it was traced with)."""
    global _loaded
    if not on:
        _loaded = False
    elif _module is not None:
        _loaded = True
    else:
        _loaded = None
    return enabled()


def set_threads(threads: int) -> None:
    """The kernels' thread count from now on (default: the runner's BLAS thread budget)."""
    global _threads
    _threads = max(1, threads)
    if _module is not None:
        _module.configure(_blas_path(), _threads)


def _f32(*arrays: mx.array) -> bool:
    import mlx.core as mx

    return all(a.dtype == mx.float32 for a in arrays)


def _quant_args(quant: KvQuant | None) -> tuple[int, int]:
    return (0, 0) if quant is None else (quant.bits, quant.group)


def prefill_attention(q: mx.array, k: mx.array | list[mx.array], v: mx.array | list[mx.array], *,
                      scale: float, offset: int, quant: KvQuant | None = None) -> mx.array:
    """Causal attention of q (B, H, n, d) at positions [offset, offset + n) over keys and values
    (B, KV, offset + n, d); returns (B, n, H * d), the layout the output projection takes. With
    `quant`, k and v are the cache's parts (codes, scales, biases), read packed by the kernel."""
    import mlx.core as mx

    batch, _, n, _ = q.shape
    ks, vs = (list(k), list(v)) if quant is not None else ([k], [v])
    if enabled() and _f32(q, *ks[-1:], *vs[-1:]):
        return _module.prefill_attention(q, ks, vs, scale, offset, *_quant_args(quant))
    if quant is not None:
        ks = [mx.dequantize(*ks, group_size=quant.group, bits=quant.bits)]
        vs = [mx.dequantize(*vs, group_size=quant.group, bits=quant.bits)]
    # MLX's "causal" mask aligns the last query with the last key: position offset + i sees
    # keys [0, offset + i].
    out = mx.fast.scaled_dot_product_attention(q, ks[0], vs[0], scale=scale,
                                               mask="causal" if n > 1 else None)
    return out.transpose(0, 2, 1, 3).reshape(batch, n, -1)


def decode_attention(q: mx.array, k: mx.array | list[mx.array], v: mx.array | list[mx.array],
                     positions: mx.array, *, scale: float, quant: KvQuant | None = None
                     ) -> mx.array | None:
    """One query a row, q (R, H, 1, d), over the preallocated caches (R, KV, C, d), or their
    quantized parts with `quant`, row r seeing keys [0, positions[r]]; returns (R, 1, H * d), or
    None where the kernels are not in use (the caller keeps its own MLX path)."""
    ks, vs = (list(k), list(v)) if quant is not None else ([k], [v])
    if not enabled() or not _f32(q, ks[-1], vs[-1]):
        return None
    return _module.decode_attention(q, ks, vs, positions, scale, *_quant_args(quant))


def rms_norm(x: mx.array, w: mx.array, eps: float) -> mx.array:
    """`mx.fast.rms_norm` (on MLX's CPU backend six ops) as one kernel where loaded."""
    import mlx.core as mx

    if enabled() and _f32(x, w):
        return _module.rms_norm(x, w, eps)
    return mx.fast.rms_norm(x, w, eps)


def add_rms_norm(h: mx.array, delta: mx.array, w: mx.array, eps: float
                 ) -> tuple[mx.array, mx.array]:
    """The residual add and the next norm: (h + delta, rms_norm(h + delta, w, eps))."""
    import mlx.core as mx

    if enabled() and _f32(h, delta, w) and h.shape == delta.shape:
        return _module.add_rms_norm(h, delta, w, eps)
    h = h + delta
    return h, mx.fast.rms_norm(h, w, eps)


def swiglu(gate_up: mx.array) -> mx.array:
    """silu(gate) * up of the fused gate_up projection's output (gate first)."""
    import mlx.core as mx

    if enabled() and _f32(gate_up):
        return _module.swiglu(gate_up)
    gate, up = mx.split(gate_up, 2, axis=-1)
    return gate * mx.sigmoid(gate) * up


# The most rows `dense` takes: decode batches; wider products (prompts, verify blocks of many
# tokens) are the BLAS's blocked GEMM's.
DENSE_MAX_ROWS = 16


def dense(x: mx.array, weight: mx.array) -> mx.array | None:
    """x (..., in) @ weight.T for a float32 weight (out, in) and at most DENSE_MAX_ROWS rows of
    x, with the extension's bandwidth-bound kernel; None where it does not apply (the caller
    keeps `matmul.linear`)."""
    if not enabled() or not _f32(x, weight) or x.shape[-1] == 0:
        return None
    if x.size // x.shape[-1] > DENSE_MAX_ROWS:
        return None
    return _module.dense(x, weight)


def moe_experts(x: mx.array, inds: mx.array, scores: mx.array, gate_up: mx.array,
                down: mx.array) -> mx.array | None:
    """A decode step's mixture-of-experts output for x (..., D) in one kernel: for each row the
    sum over its top-k experts e_j = inds[..., j] of scores[..., j] * down[e_j] @
    swiglu(gate_up[e_j] @ x), gate_up (E, 2W, D) with the gate rows first and down (E, W, D)
    (`model.experts_down`'s layout), all float32. None where it does not apply (kernels off, an
    extension built without it, other dtypes, more than DENSE_MAX_ROWS rows): the caller keeps
    the gather matmuls."""
    if not enabled() or not _f32(x, gate_up, down) or x.shape[-1] == 0:
        return None
    if x.size // x.shape[-1] > DENSE_MAX_ROWS or not hasattr(_module, "moe_experts"):
        return None
    return _module.moe_experts(x, inds, scores, gate_up, down)


def layer_entry(h: mx.array, norm_w: mx.array, qkv_w: mx.array, positions: mx.array,
                inv_freqs: mx.array, *, heads: int, kv_heads: int, eps: float, rope_scale: float,
                traditional: bool) -> tuple[mx.array, mx.array, mx.array]:
    """A dense layer's decode entry in one kernel: rms_norm(h) (h (R, 1, D)), the fused qkv
    projection, q and k roped; q (R, H, 1, d), k, v (R, KV, 1, d). Only where `enabled()`."""
    return _module.layer_entry(h, norm_w, qkv_w, positions, inv_freqs, heads, kv_heads, eps,
                               rope_scale, traditional)


def layer_block(h: mx.array, attn: mx.array, o_w: mx.array, norm_w: mx.array,
                gate_up_w: mx.array, down_w: mx.array, eps: float) -> mx.array:
    """The rest of a dense layer's decode in one kernel: s = h + attn @ o_w.T, then
    s + down(swiglu(gate_up(rms_norm(s)))). Only where `enabled()`."""
    return _module.layer_block(h, attn, o_w, norm_w, gate_up_w, down_w, eps)


def rope_qkv(qkv: mx.array, positions: mx.array, inv_freqs: mx.array, *, heads: int,
             kv_heads: int, rope_scale: float, traditional: bool,
             norms: tuple[mx.array, mx.array] | None = None, eps: float = 0.0
             ) -> tuple[mx.array, mx.array, mx.array]:
    """The fused qkv projection's output (R, n, (H + 2 KV) d) as q (R, H, n, d), k, v
    (R, KV, n, d), q and k roped at angles (position * rope_scale) * inv_freqs, token t of row r
    at positions[r * n + t]; with `norms` (q_norm, k_norm), each (d,), every q and k head is
    RMS-normed (eps) before its rotation, as qwen3 does. Callers check `enabled()`, float32 and
    (for norms) `norm_rope()` first (step.fused_layers)."""
    if norms is not None:
        return _module.rope_norm_qkv(qkv, positions, inv_freqs, heads, kv_heads, rope_scale,
                                     traditional, norms[0], norms[1], eps)
    return _module.rope_qkv(qkv, positions, inv_freqs, heads, kv_heads, rope_scale, traditional)


def norm_rope() -> bool:
    """Whether the loaded extension norms q and k heads in `rope_qkv` (builds before it do
    not: qwen3's attention then keeps MLX's ops)."""
    return enabled() and hasattr(_module, "rope_norm_qkv")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.runtime.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="compile the extension (for packaging)")
    build.add_argument("--out", type=Path, default=NATIVE_DIR, help="directory for the .so")
    build.add_argument("--nanobind", type=Path, help=f"nanobind's package directory ({NANOBIND})")
    commands.add_parser("describe", help="say which attention runners on this machine use")
    args = parser.parse_args(argv)
    if args.command == "build":
        if sys.platform != "linux":
            print(f"flockattn: not needed on {sys.platform}", file=sys.stderr)
            return 0
        try:
            print(build_kernels(args.out, nanobind=args.nanobind))
        except (KernelError, OSError, subprocess.TimeoutExpired) as e:
            print(f"flockattn: {e}", file=sys.stderr)
            return 1
        return 0
    print(describe_kernels())
    return 0


if __name__ == "__main__":
    sys.exit(main())
