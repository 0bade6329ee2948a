"""tanh_f32 (kernels/cuda_tanh.py), the softcap's tanh without division or libdevice.

- accuracy: within 2 ulps of the float64 tanh over 12M float32 inputs, the same source
  compiled for the CPU with numpy's correctly rounded exp2 and 1/x standing in for the GPU's
  ex2.approx / rcp.approx (those add at most ~2 and 1 ulps to E and 1/(E + 1), see the module);
- the simulator (NUMBA_ENABLE_CUDASIM=1) runs it in a kernel: special values and accuracy;
- PTX: the compiled code uses ex2.approx and rcp.approx, and has no division and no branch.
"""
import re

import numpy as np
import pytest
from numba import cuda  # a module global: the simulator swaps it inside kernels

from kinds import SIMULATOR

MAX_ULPS = 2.0
SPECIAL = np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 1e-30, 3e38, -3e38,
                    np.nextafter(np.float32(0.75), np.float32(0)), 0.75, -0.75,
                    np.nextafter(np.float32(-0.75), np.float32(0))], dtype=np.float32)


def _inputs(n_each=4_000_000):
    rng = np.random.default_rng(20261203)
    mag = np.float32(2.0) ** rng.uniform(-30, 4, n_each).astype(np.float32)
    return np.concatenate([rng.uniform(-12, 12, n_each), rng.uniform(-1.2, 1.2, n_each),
                           mag * rng.choice([-1, 1], n_each), SPECIAL]).astype(np.float32)


def _ulps(u, t):
    """|t - tanh(u)| in units of the float32 ulp at tanh(u) (float64 reference)."""
    ref = np.tanh(u.astype(np.float64))
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    return np.abs(t.astype(np.float64) - ref) / ulp


def _check_specials(u, t):
    for v, r in zip(u, t):
        if np.isinf(v):
            assert r == np.sign(v), (v, r)
        if v == 0:
            assert r == 0 and np.signbit(r) == np.signbit(v), (v, r)
    assert np.isnan(t[np.isnan(u)]).all()


@pytest.mark.skipif(SIMULATOR, reason="the same CPU build either way: run without the simulator")
def test_tanh_f32_accuracy_cpu():
    from numba import njit

    from gpuce.kernels.cuda_tanh import make_tanh

    @njit
    def ex2(v):
        return np.float32(np.exp2(v))

    @njit
    def rcp(v):
        return np.float32(1.0) / v

    @njit
    def fma(a, b, c):
        return a * b + c  # (b = -2: the product is exact)

    tanh_f32 = make_tanh(njit, ex2, rcp, fma)

    @njit
    def run(u, out):
        for i in range(u.size):
            out[i] = tanh_f32(u[i])

    u = np.concatenate([_inputs(), np.array([np.nan], np.float32)])
    t = np.empty_like(u)
    run(u, t)
    fin = np.isfinite(u)
    err = _ulps(u[fin], t[fin])
    assert err.max() <= MAX_ULPS, f"{err.max():.3f} ulps at u = {u[fin][err.argmax()]!r}"
    assert err.max() > 0.5  # the error is measured (a correctly rounded result would be <= 0.5)
    _check_specials(u, t)


@pytest.mark.skipif(not SIMULATOR, reason="simulator test: set NUMBA_ENABLE_CUDASIM=1")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf in the unselected side
def test_tanh_f32_simulator():
    from gpuce.kernels.cuda_tanh import tanh_f32

    @cuda.jit
    def run(u, out):
        i = cuda.grid(1)
        if i < u.size:
            out[i] = tanh_f32(u[i])

    rng = np.random.default_rng(3)
    u = np.concatenate([SPECIAL, np.array([np.nan], np.float32),
                        rng.uniform(-4, 4, 243).astype(np.float32)])
    t = np.zeros_like(u)
    run[(u.size + 127) // 128, 128](u, t)
    fin = np.isfinite(u)
    assert _ulps(u[fin], t[fin]).max() <= MAX_ULPS
    _check_specials(u, t)


@pytest.mark.skipif(SIMULATOR, reason="PTX compilation needs the real numba-cuda")
def test_tanh_f32_ptx():
    pytest.importorskip("numba_cuda", reason="numba-cuda is not installed")
    from numba import types

    from gpuce.kernels.cuda_ptx import _device_functions_for
    from gpuce.kernels.cuda_tanh import tanh_f32

    def one(u, out):  # no bounds test: any branch in the PTX is tanh_f32's
        out[0] = tanh_f32(u[0])

    a = types.Array(types.float32, 1, "C")
    with _device_functions_for((9, 0)):  # (no GPU: name the target)
        ptx, _ = cuda.compile_ptx(one, (a, a), cc=(9, 0))
    body = ptx[ptx.index(".entry"):]
    assert re.search(r"\bex2\.approx(\.ftz)?\.f32\b", body)
    assert re.search(r"\brcp\.approx(\.ftz)?\.f32\b", body)
    assert not re.search(r"\bdiv\.", body), "a division"
    assert not re.search(r"\bbra\b", body), "a branch"
    assert not re.search(r"\bcall\b", body), "a call (libdevice)"
