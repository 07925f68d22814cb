"""The flockblas shim: exact gemm semantics through its sgemv path, real MLX matmuls preloaded on
OpenBLAS, and the runner environment that turns it on. Real compiler, real library, real MLX."""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from agent.runtime.blas import (
    REFERENCE,
    BlasSetup,
    BlasUnavailable,
    OpenBlas,
    build_shim,
    describe_blas,
    describe_info,
    find_openblas,
    parse_info,
    probe,
    shim_filename,
)
from agent.runtime.environment import blas_threads, runner_environment, usable_cores, with_blas
from agent.settings import NodeSettings

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the shim is for Linux only")

ROW, COL = 101, 102
NO_TRANS, TRANS, CONJ_TRANS = 111, 112, 113
PAD_VALUE = 12345.0  # what C's padding holds; the shim must never write it

LoadShim = Callable[[OpenBlas, bool], ctypes.CDLL]


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shim(tmp_path_factory.mktemp("shim"))


@pytest.fixture(scope="module")
def openblas() -> OpenBlas:
    library = find_openblas()
    assert library is not None, "scipy-openblas32 is a flock dependency on Linux"
    return library


def _libraries() -> list[OpenBlas]:
    """scipy-openblas32 (scipy_ symbols) and, where installed, the system's (plain symbols)."""
    found = [lib for lib in (find_openblas(),) if lib is not None]
    soname = ctypes.util.find_library("openblas")
    if soname:
        found.append(OpenBlas(path=soname, origin=soname))
    return found


# --- gemm semantics, called through ctypes -------------------------------------------------------


def _store(x: np.ndarray, order: int, trans: int, pad: int) -> np.ndarray:
    """x (the logical op(X)) laid out as BLAS reads it: a 2-D buffer whose rows are ld long."""
    content = x if (order == ROW) == (trans == NO_TRANS) else x.T
    ld = max(1, content.shape[1]) + pad
    buf = np.full((content.shape[0], ld), PAD_VALUE, dtype=np.float32)
    buf[:, : content.shape[1]] = content
    return buf


def _load(buf: np.ndarray, order: int, rows: int, cols: int) -> np.ndarray:
    return buf[:rows, :cols] if order == ROW else buf[:cols, :rows].T


def _sgemm(lib: ctypes.CDLL) -> Callable[..., None]:
    fn = lib.cblas_sgemm
    i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    fn.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
    fn.restype = None
    return fn


def _counts(lib: ctypes.CDLL) -> list[int]:
    out = (ctypes.c_ulonglong * 4)()
    lib.flockblas_counts(out)
    return list(out)


@pytest.fixture
def shim_copy(
    shim: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> LoadShim:
    """Loads a private copy of the shim in this process: each copy has its own load-time state."""

    def load(library: OpenBlas, gemv: bool) -> ctypes.CDLL:
        copy = tmp_path / f"shim-{len(list(tmp_path.iterdir()))}.so"
        shutil.copy(shim, copy)
        monkeypatch.setenv("FLOCK_BLAS_LIB", library.path)
        monkeypatch.setenv("FLOCK_BLAS_GEMV", "1" if gemv else "0")
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
        lib = ctypes.CDLL(str(copy))
        lib.flockblas_info.restype = ctypes.c_char_p
        assert "error" not in parse_info(lib.flockblas_info().decode())
        return lib

    return load


@pytest.mark.parametrize("library", _libraries(), ids=lambda lib: lib.origin)
@pytest.mark.parametrize("gemv", [True, False], ids=["gemv", "no-gemv"])
def test_sgemm_matches_reference_for_every_layout(
    shim_copy: LoadShim, library: OpenBlas, gemv: bool
) -> None:
    lib = shim_copy(library, gemv)
    sgemm = _sgemm(lib)
    rng = np.random.default_rng(0)
    shapes = [(1, 7, 5), (6, 1, 5), (1, 1, 4), (3, 4, 5), (1, 6, 0), (5, 1, 0)]
    cases = itertools.product(
        shapes, (ROW, COL), (NO_TRANS, TRANS, CONJ_TRANS), (NO_TRANS, TRANS, CONJ_TRANS),
        (1.0, -0.5, 0.0), (0.0, 1.0, 0.25), (0, 3),
    )
    for (m, n, k), order, ta, tb, alpha, beta, pad in cases:
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        c = rng.standard_normal((m, n)).astype(np.float32)
        a_buf, b_buf = _store(a, order, ta, pad), _store(b, order, tb, pad + 1)
        a_before, b_before = a_buf.copy(), b_buf.copy()
        # With beta == 0 the output's prior contents (NaN here) must not leak through.
        c_buf = _store(c if beta != 0.0 else np.full_like(c, np.nan), order, NO_TRANS, pad)
        sgemm(order, ta, tb, m, n, k, alpha, a_buf.ctypes.data, a_buf.shape[1],
              b_buf.ctypes.data, b_buf.shape[1], beta, c_buf.ctypes.data, c_buf.shape[1])
        want = alpha * (a.astype(np.float64) @ b) + (beta * c.astype(np.float64) if beta else 0)
        case = f"m,n,k={m},{n},{k} order={order} ta={ta} tb={tb} a={alpha} b={beta} pad={pad}"
        np.testing.assert_allclose(_load(c_buf, order, m, n), want, rtol=1e-5, atol=1e-5,
                                   err_msg=case)
        padding = np.ones(c_buf.shape, bool)
        padding[:, : c_buf.shape[1] - pad] = False
        assert (c_buf[padding] == PAD_VALUE).all(), case
        assert np.array_equal(a_buf, a_before) and np.array_equal(b_buf, b_before), case
    forwarded, routed, _, _ = _counts(lib)
    assert forwarded > 0  # K == 0, alpha == 0 and M, N > 1 always reach sgemm
    assert (routed > 0) == gemv


def test_dgemm_and_cgemm_are_forwarded(shim_copy: LoadShim, openblas: OpenBlas) -> None:
    lib = shim_copy(openblas, True)
    rng = np.random.default_rng(1)
    i, p = ctypes.c_int, ctypes.c_void_p
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    c = np.zeros((3, 2))
    lib.cblas_dgemm.argtypes = [i, i, i, i, i, i, ctypes.c_double, p, i, p, i, ctypes.c_double,
                                p, i]
    lib.cblas_dgemm(ROW, NO_TRANS, NO_TRANS, 3, 2, 4, 2.0, a.ctypes.data, 4, b.ctypes.data, 2,
                    0.0, c.ctypes.data, 2)
    np.testing.assert_allclose(c, 2.0 * a @ b, rtol=1e-12)
    za = (a + 1j * rng.standard_normal(a.shape)).astype(np.complex64)
    zb = (b + 1j * rng.standard_normal(b.shape)).astype(np.complex64)
    zc = np.zeros((3, 2), np.complex64)
    alpha, beta = np.array([0.5 + 1j], np.complex64), np.zeros(1, np.complex64)
    lib.cblas_cgemm.argtypes = [i, i, i, i, i, i, p, p, i, p, i, p, p, i]
    lib.cblas_cgemm(ROW, NO_TRANS, NO_TRANS, 3, 2, 4, alpha.ctypes.data, za.ctypes.data, 4,
                    zb.ctypes.data, 2, beta.ctypes.data, zc.ctypes.data, 2)
    np.testing.assert_allclose(zc, alpha[0] * (za.astype(np.complex128) @ zb), rtol=1e-5)
    assert _counts(lib)[2:] == [1, 1]


def test_missing_library_aborts_with_one_clear_line(shim: Path) -> None:
    script = (
        "import ctypes; x = ctypes.c_float(1.0); p = ctypes.byref(x)\n"
        "ctypes.CDLL(None).cblas_sgemm(101, 111, 111, 1, 1, 1, x, p, 1, p, 1, x, p, 1)"
    )
    env = {**os.environ, "LD_PRELOAD": str(shim), "FLOCK_BLAS_LIB": "/nonexistent/libx.so"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode < 0  # SIGABRT, not a wrong answer
    assert done.stderr.strip().splitlines() == [
        "flockblas: cannot load FLOCK_BLAS_LIB=/nonexistent/libx.so: "
        "/nonexistent/libx.so: cannot open shared object file: No such file or directory"
    ]


# --- MLX with the shim preloaded -----------------------------------------------------------------

# Runs in a process that preloads the shim: the matmul shapes an LLM produces, against numpy.
_MLX_CHECK = textwrap.dedent("""
    import ctypes, json
    import numpy as np
    import mlx.core as mx
    from agent.runtime.blas import describe_blas

    rng = np.random.default_rng(0)
    def r(*shape, dtype=np.float32):
        return rng.standard_normal(shape).astype(dtype)
    big, wide = r(9, 200), r(130, 120)
    w, w2 = r(80, 96), r(96, 80)
    cases = {
        "decode_linear_m1": (lambda a, b: a @ b.T, r(1, 576), r(1536, 576)),
        "decode_down_m1": (lambda a, b: a @ b.T, r(1, 1536), r(576, 1536)),
        "prefill_linear": (lambda a, b: a @ b.T, r(7, 96), w),
        "m1_plain": (lambda a, b: a @ b, r(1, 96), w2),
        "n1": (lambda a, b: a @ b, r(12, 96), r(96, 1)),
        "m1_n1": (lambda a, b: a @ b, r(1, 96), r(96, 1)),
        "a_transposed_m1": (lambda a, b: a.T @ b, r(96, 1), w2),
        "a_transposed_n1": (lambda a, b: a.T @ b, r(96, 12), r(96, 1)),
        "both_transposed": (lambda a, b: a.T @ b.T, r(96, 5), w),
        "batched_m1": (lambda a, b: a @ b, r(3, 1, 96), r(3, 96, 80)),
        "batched_broadcast": (lambda a, b: a @ b, r(3, 4, 96), w2),
        "batched_n1": (lambda a, b: a @ b, r(3, 7, 96), r(3, 96, 1)),
        "attention_scores_m1": (lambda q, k: q @ k.swapaxes(-1, -2), r(3, 3, 1, 64),
                                r(3, 3, 40, 64)),
        "sliced_rows": (lambda a, b: a[3:4, 4:100] @ b[:96, 7:87], big, wide),
        "strided_rows": (lambda a, b: a[::2, 4:100] @ b[::1, 7:87][:96], big, wide),
        "sliced_n1": (lambda a, b: a[1:8, 4:100] @ b[:96, 5:6], big, wide),
    }
    results = {}
    for name, (f, a, b) in cases.items():
        got = np.array(f(mx.array(a), mx.array(b)))
        want = f(a.astype(np.float64), b.astype(np.float64))
        results[name] = float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))

    for name, (m, n) in {"addmm_m1": (1, 80), "addmm": (6, 80), "addmm_n1": (6, 1)}.items():
        c, a, b = r(m, n), r(m, 96), r(96, n)
        got = np.array(mx.addmm(mx.array(c), mx.array(a), mx.array(b), alpha=0.5, beta=2.0))
        want = 0.5 * (a.astype(np.float64) @ b) + 2.0 * c
        results[name] = float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))

    for m in (1, 6):
        a, b = r(m, 96, dtype=np.float64), r(96, 80, dtype=np.float64)
        # mx.array() would narrow numpy float64 to float32 unless told otherwise.
        a_mx, b_mx = mx.array(a, dtype=mx.float64), mx.array(b, dtype=mx.float64)
        got = np.array(mx.matmul(a_mx, b_mx, stream=mx.cpu))
        results[f"float64_m{m}"] = float(np.abs(got - a @ b).max() / np.abs(a @ b).max())

    a = (r(4, 96) + 1j * r(4, 96)).astype(np.complex64)
    b = (r(96, 80) + 1j * r(96, 80)).astype(np.complex64)
    got = np.array(mx.array(a) @ mx.array(b))
    want = a.astype(np.complex128) @ b
    results["complex64"] = float(np.abs(got - want).max() / np.abs(want).max())

    counts = (ctypes.c_ulonglong * 4)()
    ctypes.CDLL(None).flockblas_counts(counts)
    print(json.dumps({"errors": results, "counts": list(counts), "describe": describe_blas()}))
""")


def _run_mlx_check(env: dict[str, str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _MLX_CHECK],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("gemv", [True, False], ids=["gemv", "no-gemv"])
def test_mlx_matmuls_on_openblas_match_numpy(shim: Path, openblas: OpenBlas, gemv: bool) -> None:
    env = {
        **os.environ,
        "LD_PRELOAD": str(shim),
        "FLOCK_BLAS_LIB": openblas.path,
        "FLOCK_BLAS_GEMV": "1" if gemv else "0",
        "OPENBLAS_NUM_THREADS": "1",
    }
    report = _run_mlx_check(env)
    bad = {name: err for name, err in report["errors"].items()
           if err > (1e-12 if name.startswith("float64") else 2e-5)}
    assert not bad, bad
    forwarded, routed, dgemm, cgemm = report["counts"]
    assert forwarded > 0 and dgemm >= 2 and cgemm >= 1
    # MLX hands every M == 1 / N == 1 case (decode steps, attention scores) over as sgemm.
    assert (routed >= 10) == gemv, report["counts"]
    assert report["describe"].startswith("OpenBLAS ")
    assert report["describe"].endswith("(sgemv fast path)" if gemv else "(sgemv fast path off)")


# --- the runner environment ----------------------------------------------------------------------


def test_runner_environment_preloads_the_shim_and_splits_cores(tmp_path: Path) -> None:
    settings = NodeSettings(state_dir=tmp_path, blas="auto", blas_threads=None)
    base = {"PATH": os.environ["PATH"], "OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_L2_SIZE": "1"}
    env, warning = runner_environment(settings, ranks_on_this_machine=3, base=base)
    assert warning is None
    assert Path(env["LD_PRELOAD"]).is_file()
    assert env["FLOCK_BLAS_LIB"] == find_openblas().path
    assert env["OPENBLAS_NUM_THREADS"] == str(max(1, usable_cores() // 3))
    assert env["OPENBLAS_CORETYPE"] == "Haswell" and env["OPENBLAS_L2_SIZE"] == "1"
    # What the runner will see: the shim loads its library and reports OpenBLAS.
    assert describe_info(probe(Path(env["LD_PRELOAD"]), find_openblas())).startswith("OpenBLAS")


def test_blas_threads_setting_wins_over_the_core_share(tmp_path: Path) -> None:
    settings = NodeSettings(state_dir=tmp_path, blas_threads=5)
    env, _ = runner_environment(settings, ranks_on_this_machine=64, base={})
    assert env["OPENBLAS_NUM_THREADS"] == "5"
    assert blas_threads(NodeSettings(state_dir=tmp_path, blas_threads=None), 10_000) == 1


def test_blas_off_means_no_preload_and_no_warning(tmp_path: Path) -> None:
    settings = NodeSettings(state_dir=tmp_path, blas="off", blas_threads=None)
    env, warning = runner_environment(settings, base={"LD_PRELOAD": "/x/libjemalloc.so"})
    assert warning is None
    assert env["LD_PRELOAD"] == "/x/libjemalloc.so" and "FLOCK_BLAS_LIB" not in env
    assert env["OPENBLAS_NUM_THREADS"] == str(max(1, usable_cores()))  # numpy spins too


def test_fallback_to_reference_blas_warns_in_one_line() -> None:
    env, warning = with_blas({"PATH": "/bin"}, BlasUnavailable(reason="no compiler"), threads=2)
    assert "LD_PRELOAD" not in env and env["OPENBLAS_NUM_THREADS"] == "2"
    assert warning is not None and "no compiler" in warning and "\n" not in warning


def test_shim_goes_first_in_an_existing_preload(shim: Path, openblas: OpenBlas) -> None:
    setup = BlasSetup(shim=shim, library=openblas, info={})
    env, _ = with_blas({"LD_PRELOAD": "/x/libjemalloc.so"}, setup, threads=1)
    assert env["LD_PRELOAD"] == f"{shim}:/x/libjemalloc.so"


def test_describe_blas_names_what_runners_get(tmp_path: Path) -> None:
    assert describe_blas(NodeSettings(state_dir=tmp_path)).startswith("OpenBLAS ")
    assert describe_blas(NodeSettings(state_dir=tmp_path, blas="off")) == f"{REFERENCE}; blas = off"
    assert describe_blas() == REFERENCE  # this process runs without the shim


def test_build_command_writes_a_loadable_shim(tmp_path: Path, openblas: OpenBlas) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "agent.runtime.blas", "build", "--out", str(tmp_path)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True,
    )
    built = Path(done.stdout.strip())
    assert built == tmp_path / shim_filename()
    assert built.stat().st_mode & 0o444 == 0o444  # packaged for every user
    assert probe(built, openblas)["lib"] == openblas.path
