"""The CUDA backend on a real GPU (marker ``gpu``; skipped without an NVIDIA GPU): real sizes
for every strategy and dtype, CuPy / torch / numba arrays in and out, a non-default stream,
an input of more than 2**31 elements, and the checks the simulator cannot make (shared
memory beyond 48 KiB, the GPU's own bfloat16 bit arithmetic, determinism).

    python -m pytest -q -m gpu tests/test_gpu.py
"""
import numpy as np
import pytest

from cuda_kinds import gpu_available, gpu_kinds
from helpers import rng_for
from kinds import BF16, DTYPES, SIMULATOR
from reference import ref_cross_entropy, ref_log_softmax, ref_logsumexp, ref_softmax
from test_cuda_sim import check_array, check_loss, record_launches, rounded, soft_targets

HAVE_GPU = not SIMULATOR and gpu_available()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not HAVE_GPU, reason="needs an NVIDIA GPU (and no simulator)")]

if HAVE_GPU:
    import gpuce
    from gpuce import _cuda, _cuda_arrays
    from numba import cuda
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    KINDS = {k.name: k for k in gpu_kinds()}
else:
    KINDS = {}

# strategy -> (rows, classes): sizes where that kernel is the natural or a forced choice
SIZES = {
    "warp_2x16": ("warp", 4096, 10),
    "warp_8x16": ("warp", 2048, 100),
    "warp": ("warp", 2048, 250),     # warp_16x16 (float64: warp)
    "block_cached": ("block_cached", 512, 6000),
    "block": ("block", 128, 40000),
    "split": ("split", 8, 262144),
}


def _kind(*prefer):
    for name in prefer + ("torch-cuda", "cupy", "numba-cuda"):
        if name in KINDS:
            return KINDS[name]
    pytest.skip("no GPU array kind")


def _case(rng, n, c, dt):
    x = rounded(rng.standard_normal((n, c)) * 3, dt)
    t = rng.integers(0, c, n)
    t[::7] = -100
    w = rng.uniform(0.5, 2.0, c).astype(np.float32)
    return x, t, w


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("case", list(SIZES))
def test_strategies_at_real_sizes(case, dt):
    strategy, n, c = SIZES[case]
    kind = _kind("torch-cuda" if dt == "bfloat16" else "cupy")
    rng = rng_for(case, dt)
    x, t, w = _case(rng, n, c, dt)
    kw = dict(weight=w, label_smoothing=0.1, z_loss=1e-3, reduction="mean")
    xd = kind.to(x)
    with _cuda.force_strategy(strategy):
        loss, grad = gpuce.cross_entropy_with_grad(xd, kind.to(t), **{**kw, "weight": kind.to(w)})
        sm = gpuce.softmax(xd)
        lse = gpuce.logsumexp(xd)
        q = soft_targets(rng, x.shape, dt)
        sloss, sgrad = gpuce.cross_entropy_with_grad(xd, kind.to(q), reduction="none")
    ref_loss, ref_grad = ref_cross_entropy(x, t, **kw)
    check_loss(kind.back(loss), ref_loss, dt, "loss")
    check_array(kind.back(grad), ref_grad, dt, "grad")
    check_array(kind.back(sm), ref_softmax(x), dt, "softmax")
    check_loss(kind.back(lse), ref_logsumexp(x), dt, "logsumexp")
    ref_loss, ref_grad = ref_cross_entropy(x, q, reduction="none")
    check_loss(kind.back(sloss), ref_loss, dt, "soft loss")
    check_array(kind.back(sgrad), ref_grad, dt, "soft grad")


@pytest.mark.parametrize("kind_name", ["cupy", "torch-cuda", "numba-cuda"])
def test_each_library_in_and_out(kind_name):
    if kind_name not in KINDS:
        pytest.skip(f"{kind_name} not available")
    kind = KINDS[kind_name]
    rng = np.random.default_rng(1)
    x, t, _ = _case(rng, 300, 1000, "float32")
    xd, td = kind.to(x), kind.to(t)
    loss, grad = gpuce.cross_entropy_with_grad(xd, td)
    assert type(grad) is type(xd) and type(loss) is type(xd)
    assert tuple(loss.shape) == ()
    out = kind.to(np.full(x.shape, np.nan, np.float32))
    loss2, grad2 = gpuce.cross_entropy_with_grad(xd, td, out=out)
    assert grad2 is out
    ref_loss, ref_grad = ref_cross_entropy(x, t)
    check_loss(kind.back(loss), ref_loss, "float32", "loss")
    check_array(kind.back(grad), ref_grad, "float32", "grad")
    check_array(kind.back(out), ref_grad, "float32", "out=")
    check_array(kind.back(gpuce.log_softmax(xd, axis=0)), ref_log_softmax(x, axis=0), "float32",
                "log_softmax axis 0")


def test_non_default_stream_torch():
    torch = pytest.importorskip("torch")
    kind = _kind("torch-cuda")
    if kind.name != "torch-cuda":
        pytest.skip("no CUDA torch")
    rng = np.random.default_rng(2)
    x, t, _ = _case(rng, 1000, 5000, "float32")
    xd, td = kind.to(x), kind.to(t)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        assert _cuda_arrays._TorchLib(torch).stream(xd) != 0
        xd2 = xd * 1.0  # made on s: gpuce must be ordered after it
        loss, grad = gpuce.cross_entropy_with_grad(xd2, td, reduction="sum")
    s.synchronize()
    ref_loss, ref_grad = ref_cross_entropy(x, t, reduction="sum")
    check_loss(kind.back(loss), ref_loss, "float32", "loss")
    check_array(kind.back(grad), ref_grad, "float32", "grad")


def test_non_default_stream_cupy():
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(3)
    x, t, _ = _case(rng, 700, 3000, "float32")
    with cp.cuda.Stream(non_blocking=True) as s:
        xd = cp.asarray(x) * 1
        loss, grad = gpuce.cross_entropy_with_grad(xd, cp.asarray(t), reduction="none")
    s.synchronize()
    ref_loss, ref_grad = ref_cross_entropy(x, t, reduction="none")
    check_loss(cp.asnumpy(loss), ref_loss, "float32", "loss")
    check_array(cp.asnumpy(grad), ref_grad, "float32", "grad")


def test_more_than_2_31_elements():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA torch")
    n, c = 16385, 131072  # 2**31 + 131072 elements of bfloat16: 4.3 GB, in place
    if torch.cuda.mem_get_info()[0] < 12 * 2**30:
        pytest.skip("needs 12 GiB of free GPU memory")
    assert n * c > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((n, c), device="cuda", dtype=torch.bfloat16, generator=gen)
    t = torch.randint(0, c, (n,), device="cuda", generator=gen)
    rows = [0, n // 2, n - 2, n - 1]  # the last rows lie past 2**31 elements
    host = {r: x[r].float().cpu().numpy().astype(BF16) for r in rows}
    tt = t.cpu().numpy()
    loss, grad = gpuce.cross_entropy_with_grad(x, t, reduction="none", inplace=True)
    assert grad is x
    loss_h = loss.cpu().numpy()
    for r in rows:
        ref_loss, ref_grad = ref_cross_entropy(host[r][None], tt[r:r + 1], reduction="none")
        check_loss(loss_h[r:r + 1], ref_loss, "bfloat16", f"loss of row {r}")
        got = grad[r].view(torch.int16).cpu().numpy().view(BF16)[None]
        check_array(got, ref_grad, "bfloat16", f"grad of row {r}")
    del x, grad
    torch.cuda.empty_cache()


def test_bad_targets_and_validate():
    kind = _kind()
    rng = np.random.default_rng(4)
    x, t, _ = _case(rng, 64, 3000, "float32")
    t[5], t[9] = -3, 3000
    loss, grad = gpuce.cross_entropy_with_grad(kind.to(x), kind.to(t), reduction="none")
    loss, grad = kind.back(loss), kind.back(grad)
    assert np.isnan(loss[[5, 9]]).all() and not grad[[5, 9]].any()
    with pytest.raises(ValueError, match=r"target: class index -3 \(row 5\)"):
        gpuce.cross_entropy(kind.to(x), kind.to(t), validate=True)


def test_cuda_array_interface_object():
    kind = _kind("cupy", "torch-cuda")

    class Wrapped:
        def __init__(self, a):
            self.__cuda_array_interface__ = a.__cuda_array_interface__
            self._keep = a
    x = np.random.default_rng(5).standard_normal((50, 100)).astype(np.float32)
    xd = kind.to(x)
    res = gpuce.softmax(Wrapped(xd))
    assert isinstance(res, DeviceNDArray)
    check_array(res.copy_to_host(), ref_softmax(x), "float32", "softmax")


def test_numba_arrays_needing_a_layout_change():
    if "numba-cuda" not in KINDS or not ({"cupy", "torch-cuda"} & set(KINDS)):
        pytest.skip("needs numba device arrays and CuPy or torch")
    x = np.random.default_rng(6).standard_normal((30, 200)).astype(np.float32)
    xd = cuda.to_device(np.ascontiguousarray(x.T)).T  # a transposed view
    res = gpuce.logsumexp(xd, axis=1)
    assert isinstance(res, DeviceNDArray)
    check_loss(res.copy_to_host(), ref_logsumexp(x, axis=1), "float32", "logsumexp")


def test_block_cached_beyond_48k_shared_memory():
    kind = _kind("cupy", "torch-cuda")
    rng = np.random.default_rng(7)
    x, t, _ = _case(rng, 64, 32768, "float32")  # 128 KiB of row per block
    dev = _cuda._device_limits(0)
    plan = _cuda._plan("ce", 64, 32768, "float32", dev)
    if dev.max_shared_per_block_optin >= 32768 * 4:
        assert plan.part == "block_cached", "could not opt in to large shared memory"
    loss, grad = gpuce.cross_entropy_with_grad(kind.to(x), kind.to(t))
    ref_loss, ref_grad = ref_cross_entropy(x, t)
    check_loss(kind.back(loss), ref_loss, "float32", "loss")
    check_array(kind.back(grad), ref_grad, "float32", "grad")


@pytest.mark.parametrize("strategy", ["block", "split"])
def test_reductions_are_deterministic(strategy):
    kind = _kind()
    rng = np.random.default_rng(8)
    x, t, w = _case(rng, 16, 100000, "float32")
    xd, td = kind.to(x), kind.to(t)
    with _cuda.force_strategy(strategy):
        a = [kind.back(gpuce.cross_entropy(xd, td, label_smoothing=0.1)) for _ in range(3)]
    assert a[0].tobytes() == a[1].tobytes() == a[2].tobytes()


@pytest.mark.parametrize("dt", ["bfloat16", "float16"])
def test_gpu_half_rounding_is_exact(dt):
    """The GPU's own conversion code (libdevice bit casts), against numpy / ml_dtypes."""
    kind = _kind("cupy", "torch-cuda")
    bits = np.random.default_rng(9).integers(0, 2**32, 100000, dtype=np.uint64).astype(np.uint32)
    vals = np.concatenate([bits.view(np.float32),
                           np.array([1 + 2**-8, 1 + 3 * 2**-8, 65520.0, 3.4e38, -0.0, np.inf,
                                     np.nan], np.float32)])
    be = _cuda.CudaBackend()
    lib, xd = _cuda_arrays._lib_for(kind.to(vals))
    got = be._converted(xd, dt, None, lib.stream(xd)).copy_to_host().view(DTYPES[dt])
    with np.errstate(all="ignore"):
        want = vals.astype(DTYPES[dt])
    nan = np.isnan(want.astype(np.float32))
    assert (np.isnan(got.astype(np.float32)) == nan).all()
    assert (got.view(np.uint16)[~nan] == want.view(np.uint16)[~nan]).all()


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("strategy", ["warp", "block_cached", "block", "split"])
def test_unaligned_rows_take_the_scalar_kernels(strategy, dt, monkeypatch):
    """An offset view (every row 2-8 bytes off 16) runs the scalar kernels, an aligned copy
    the 128-bit ones; both match the reference."""
    torch = pytest.importorskip("torch")
    n, c = (64, 256) if strategy == "warp" else (16, 20000)
    rng = np.random.default_rng(41)
    x, t, _ = _case(rng, n, c, dt)
    launched = record_launches(monkeypatch)
    kind = KINDS.get("torch-cuda") or pytest.skip("needs CUDA torch")
    xa = kind.to(x)
    flat = torch.empty(n * c + 1, dtype=xa.dtype, device="cuda")
    xo = flat[1:].view(n, c)
    xo.copy_(xa)
    ref_loss, ref_grad = ref_cross_entropy(x, t, reduction="none", label_smoothing=0.1)
    for xd, vec in ((xa, True), (xo, False)):
        launched.clear()
        with _cuda.force_strategy(strategy):
            loss, grad = gpuce.cross_entropy_with_grad(xd, kind.to(t), reduction="none",
                                                       label_smoothing=0.1)
            sm = gpuce.softmax(xd)
        assert all(k.endswith("_vec") == vec for k in launched if k.startswith(("ce_", "softmax_"))), launched
        check_loss(kind.back(loss), ref_loss, dt, f"loss vec={vec}")
        check_array(kind.back(grad), ref_grad, dt, f"grad vec={vec}")
        check_array(kind.back(sm), ref_softmax(x), dt, f"softmax vec={vec}")
