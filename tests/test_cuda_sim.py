"""The CUDA kernels run by Numba's simulator (NUMBA_ENABLE_CUDASIM=1), against the float64
reference: every strategy, every dtype, every option, the special rows.

    NUMBA_ENABLE_CUDASIM=1 python -m pytest -q tests/test_cuda_sim.py

Shapes are tiny (the simulator runs each CUDA thread as a Python thread). Each strategy is
forced (GPUCE_CUDA_STRATEGY's context-manager form) on a row length it can hold. New
simulator allocations are NaN-filled by gpuce, and ``out=`` buffers are prefilled with junk
here, so an element a kernel forgets to write shows up.
"""

import numpy as np
import pytest
from numba import cuda  # a module global: the simulator swaps it inside kernels

from helpers import rng_for
from kinds import BF16, DTYPES, SIMULATOR, available_kinds
from reference import ref_cross_entropy, ref_log_softmax, ref_logsumexp, ref_softmax

pytestmark = pytest.mark.skipif(not SIMULATOR, reason="simulator tests: set NUMBA_ENABLE_CUDASIM=1")

if SIMULATOR:
    import gpuce
    from gpuce import _cuda, _dispatch

    KIND = available_kinds()[0]

# case name -> (strategy forced, row length): one row length per kernel variant (a warp case
# is named after the warp part it runs; float64 ones hold half the values, see case_shape)
STRATEGY_CASES = {
    "warp_2x16": ("warp", 26),       # 2 lanes per row
    "warp_4x16": ("warp", 45),
    "warp_8x16": ("warp", 77),
    "warp_16x16": ("warp", 150),
    "warp": ("warp", 300),           # a warp per row
    "block_cached": ("block_cached", 150),
    "block": ("block", 203),
    "split": ("split", 257),         # 4 chunks per row in the simulator
}
VARIANT_CASES = list(STRATEGY_CASES)  # the dtype tests: every kernel variant
# the option tests: the warp kernels differ only in lanes and values per lane, so the
# narrowest and the full-warp one stand for them
CASES = ["warp_2x16", "warp", "block_cached", "block", "split"]
# the same kernels' 128-bit variants: row lengths whose rows start on 16 bytes in every dtype
ALIGNED_CASES = {
    "warp_2x16": ("warp", 16),
    "warp_4x16": ("warp", 48),
    "warp_8x16": ("warp", 96),
    "warp_16x16": ("warp", 160),
    "warp": ("warp", 320),
    "block_cached": ("block_cached", 160),
    "block": ("block", 208),
    "split": ("split", 256),
}


def case_shape(case, dt, cases=STRATEGY_CASES):
    """(strategy, row length) of a case in ``dt``: float64 warp kernels hold 8 values a lane,
    not 16, so a warp case's float64 rows are half as long (the same part runs)."""
    strategy, n_cls = cases[case]
    if strategy == "warp" and dt == "float64":
        n_cls //= 2
    return strategy, n_cls


def launched_part(names):
    """The kernel part (cuda_registry: ce_<part>[_vec|_peel]) of the main kernels launched."""
    parts = {n[len("ce_"):].removesuffix("_vec").removesuffix("_peel") for n in names
             if n.startswith("ce_") and n != "ce_target_stats"}
    return {"split" if p.startswith("split_") else p for p in parts}


# ---- helpers ---------------------------------------------------------------------------------

def rounded(a, dt):
    return np.asarray(a, dtype=np.float64).astype(DTYPES[dt])


def _ordered(bits):
    """16-bit float patterns as integers that order like the values (+0 and -0 both 0)."""
    b = bits.astype(np.int32)
    return np.where(b >= 0x8000, -(b - 0x8000), b)


def check_array(got, ref, dt, what, scale=None):
    """Storage-dtype results: fp32 rel 2e-5, fp64 1e-10, half types within 1 ulp of the
    reference rounded to that type."""
    got = np.asarray(got)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, what
    if dt in ("float16", "bfloat16"):
        want = ref.astype(DTYPES[dt])
        gbits = _ordered(got.view(np.uint16))
        wbits = _ordered(want.view(np.uint16))
        both_nan = np.isnan(got.astype(np.float64)) & np.isnan(ref)
        ulps = np.where(both_nan, 0, np.abs(gbits - wbits))
        assert ulps.max(initial=0) <= 1, (
            f"{what}: {int(ulps.max())} ulps at {np.unravel_index(ulps.argmax(), ulps.shape)}: "
            f"got {got.ravel()[ulps.argmax()]}, want {want.ravel()[ulps.argmax()]}")
        return
    finite = np.isfinite(ref)
    scale = scale if scale is not None else max(1.0, np.abs(ref[finite]).max(initial=0))
    tol = 2e-5 if dt != "float64" else 1e-10
    np.testing.assert_allclose(got.astype(np.float64), ref, rtol=tol, atol=tol * scale,
                               err_msg=what)


def check_loss(got, ref, dt, what):
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, what
    finite = np.isfinite(ref)
    scale = max(1e-3, np.abs(ref[finite]).max(initial=0))
    tol = 1e-5 if dt != "float64" else 1e-10
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * scale, err_msg=what)


def to_dev(a):
    return KIND.to(a) if isinstance(a, np.ndarray) else a


def run_ce(logits, target, strategy, with_grad=True, **kw):
    dev = {k: to_dev(v) for k, v in kw.items()}
    logits, target = to_dev(logits), to_dev(target)  # (device arrays pass as they are)
    with _cuda.force_strategy(strategy):
        if with_grad:
            loss, grad = gpuce.cross_entropy_with_grad(logits, target, **dev)
            return KIND.back(loss), KIND.back(grad)
        return KIND.back(gpuce.cross_entropy(logits, target, **dev)), None


def make_logits(rng, shape, dt, scale=3.0):
    return rounded(rng.standard_normal(shape) * scale, dt)


def soft_targets(rng, shape, dt):
    q = rng.random(shape) ** 3
    q[..., 0] = 0.0  # exact zeros in the probabilities
    return rounded(q / q.sum(-1, keepdims=True), dt)


# ---- every strategy x every option (float32) -------------------------------------------------

OPTIONS = {
    "plain_mean": dict(reduction="mean"),
    "weight_ignore_mean": dict(reduction="mean", weight=True, ignore=True),
    "smooth_weight_sum": dict(reduction="sum", weight=True, label_smoothing=0.2, go=0.7),
    "zloss_softcap_none": dict(reduction="none", z_loss=1e-2, softcap=2.5, go="rows"),
    "ignore_is_a_class_none": dict(reduction="none", ignore_index=2, label_smoothing=0.1),
    "all_hard_mean": dict(reduction="mean", weight=True, ignore=True, label_smoothing=0.3,
                          z_loss=1e-3, softcap=4.0, go="0d"),
    "soft_smooth_weight_mean": dict(reduction="mean", soft=True, weight=True,
                                    label_smoothing=0.15),
    "soft_zloss_softcap_sum": dict(reduction="sum", soft=True, z_loss=1e-2, softcap=3.0,
                                   go=-1.5),
}


def build_case(rng, n_rows, n_cls, dt, opt):
    x = make_logits(rng, (n_rows, n_cls), dt)
    ignore_index = opt.get("ignore_index", -100)
    if opt.get("soft"):
        t = soft_targets(rng, (n_rows, n_cls), dt)
    else:
        t = rng.integers(0, n_cls, n_rows)
        t[0] = n_cls - 1  # the last class (the end of the last chunk or lane)
        if opt.get("ignore"):
            t[1] = ignore_index
    kw = dict(reduction=opt["reduction"], ignore_index=ignore_index,
              label_smoothing=opt.get("label_smoothing", 0.0), z_loss=opt.get("z_loss", 0.0),
              softcap=opt.get("softcap"))
    if opt.get("weight"):
        kw["weight"] = rng.uniform(0.25, 2.0, n_cls).astype(np.float32)
    go = opt.get("go")
    if go == "rows":
        kw["grad_output"] = rng.uniform(-2, 2, n_rows).astype(np.float32)
    elif go == "0d":
        kw["grad_output"] = np.array(0.6, dtype=np.float32)
    elif go is not None:
        kw["grad_output"] = go
    return x, t, kw


@pytest.mark.parametrize("opt", list(OPTIONS))
@pytest.mark.parametrize("case", CASES)
def test_cross_entropy_options(case, opt):
    strategy, n_cls = STRATEGY_CASES[case]
    rng = rng_for(case, opt)
    x, t, kw = build_case(rng, 3, n_cls, "float32", OPTIONS[opt])
    loss, grad = run_ce(x, t, strategy, **kw)
    ref_loss, ref_grad = ref_cross_entropy(x, t, **kw)
    check_loss(loss, ref_loss, "float32", "loss")
    check_array(grad, ref_grad, "float32", "grad")


# ---- every strategy x every dtype --------------------------------------------------------------

@pytest.mark.parametrize("dt", ["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("case", VARIANT_CASES)
def test_cross_entropy_dtypes(case, dt):
    strategy, n_cls = case_shape(case, dt)
    rng = rng_for(case, dt)
    x, t, kw = build_case(rng, 3, n_cls, dt, OPTIONS["all_hard_mean"])
    loss, grad = run_ce(x, t, strategy, **kw)
    assert grad.dtype == DTYPES[dt]
    assert loss.dtype == (np.float64 if dt == "float64" else np.float32)
    ref_loss, ref_grad = ref_cross_entropy(x, t, **kw)
    check_loss(loss, ref_loss, dt, "loss")
    check_array(grad, ref_grad, dt, "grad")
    # soft targets in the logits' dtype, one loss per row
    q = soft_targets(rng, x.shape, dt)
    loss, grad = run_ce(x, q, strategy, reduction="none", label_smoothing=0.05)
    ref_loss, ref_grad = ref_cross_entropy(x, q, reduction="none", label_smoothing=0.05)
    check_loss(loss, ref_loss, dt, "soft loss")
    check_array(grad, ref_grad, dt, "soft grad")


def record_launches(monkeypatch):
    """The names of the kernels gpuce launches from here on (a list that fills as it goes);
    also for tests/test_gpu.py, on a real device."""
    from gpuce import _cuda
    launched = []
    real = _cuda._launch

    def recording(name, *args):
        launched.append(name)
        return real(name, *args)
    monkeypatch.setattr(_cuda, "_launch", recording)
    return launched


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("case", list(ALIGNED_CASES))
def test_vectorized_variants(case, dt, monkeypatch):
    """Rows that start on 16 bytes take the 128-bit kernels (int32 views, 4/8/2 values per
    access); the same rows one element off their alignment (an offset view) take the scalar
    ones. Both against the reference: loss, gradient in place and not, softmax family."""
    strategy, n_cls = case_shape(case, dt, ALIGNED_CASES)
    launched = record_launches(monkeypatch)
    rng = rng_for(case, dt, "vec")
    opt = dict(OPTIONS["all_hard_mean"])
    x, t, kw = build_case(rng, 3, n_cls, dt, opt)
    ref_loss, ref_grad = ref_cross_entropy(x, t, **kw)
    q = soft_targets(rng, x.shape, dt)
    ref_sloss, ref_sgrad = ref_cross_entropy(x, q, reduction="none", label_smoothing=0.05)
    for aligned in (True, False):
        if aligned:
            xd = KIND.to(x)
        else:  # one element in: every row starts 2, 4 or 8 bytes off 16
            from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
            flat = KIND.to(np.concatenate([x.ravel()[:1], x.ravel()]))._ary
            xd = FakeCUDAArray(flat[1:].reshape(x.shape))
            assert xd.is_c_contiguous() and xd.__array_interface__["data"][0] % 16
        launched.clear()
        loss, grad = run_ce(xd, t, strategy, **kw)
        vec = [n for n in launched if n.startswith("ce_") and n != "ce_target_stats"]
        assert vec and all(n.endswith("_vec") == aligned for n in vec), launched
        assert launched_part(launched) == {case}, launched
        check_loss(loss, ref_loss, dt, f"loss aligned={aligned}")
        check_array(grad, ref_grad, dt, f"grad aligned={aligned}")
        with _cuda.force_strategy(strategy):
            launched.clear()
            sm = KIND.back(gpuce.softmax(xd))
            assert all(n.endswith("_vec") == aligned for n in launched), launched
        check_array(sm, ref_softmax(x), dt, f"softmax aligned={aligned}")
    # the rest only on the 128-bit path (the scalar kernels have their own tests above)
    loss, grad = run_ce(x, q, strategy, reduction="none", label_smoothing=0.05)
    check_loss(loss, ref_sloss, dt, "soft loss")
    check_array(grad, ref_sgrad, dt, "soft grad")
    with _cuda.force_strategy(strategy):
        xi = KIND.to(x)
        gpuce.log_softmax(xi, out=xi)  # in place
    check_array(KIND.back(xi), ref_log_softmax(x), dt, "log_softmax in place")
    loss, grad = run_ce(KIND.to(x), t, strategy, inplace=True, **kw)
    check_array(grad, ref_grad, dt, "grad in place")


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("strategy", ["warp", "block_cached"])
@pytest.mark.parametrize("dt", ["bfloat16", "float16"])
def test_half_target_gradient_rounded_once(dt, strategy, softcap):
    """p_y close to 1: the target's p - 1 is formed in fp32 and rounded once (rounding p
    first would give 0 or a 100% error); with a softcap (p - 1 ~ -4e-4), also through
    block_cached's cached e (1 - t^2)."""
    x = np.zeros((2, 40))
    x[:, 5] = 12.0
    x = rounded(x, dt)
    t = np.array([5, 5])
    _, grad = run_ce(x, t, strategy, reduction="sum", softcap=softcap)
    _, ref_grad = ref_cross_entropy(x, t, reduction="sum", softcap=softcap)
    assert ref_grad[0, 5] != 0
    check_array(grad, ref_grad, dt, "grad")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dt", ["bfloat16", "float16"])
def test_half_rounding_is_exact(dt):
    """float32 -> half stores round to nearest even (ties, overflow, subnormals, NaN) and half
    -> float32 loads are exact: the device conversion against numpy / ml_dtypes."""
    rng = np.random.default_rng(29)
    bits = rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32)
    special = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11, -2.5, 65520.0,
                        3.4e38, 1e-40, 6e-8, 0.0, -0.0, np.inf, -np.inf, np.nan],
                       dtype=np.float32)
    vals = np.concatenate([bits.view(np.float32), special])
    be = _cuda.CudaBackend()
    raw = be._converted(KIND.to(vals), dt, None, 0)  # the convert kernel
    got = raw.copy_to_host().view(DTYPES[dt])
    want = vals.astype(DTYPES[dt])
    nan = np.isnan(want.astype(np.float32))
    assert (np.isnan(got.astype(np.float32)) == nan).all()
    assert (got.view(np.uint16)[~nan] == want.view(np.uint16)[~nan]).all()
    back = be._converted(KIND.to(got), "float32", None, 0).copy_to_host()
    np.testing.assert_array_equal(back, got.astype(np.float32))


# ---- softmax, log_softmax, logsumexp -----------------------------------------------------------

@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("case", VARIANT_CASES)
def test_softmax_family(case, dt):
    strategy, n_cls = case_shape(case, dt)
    rng = rng_for(case, dt, "sm")
    x = make_logits(rng, (3, n_cls), dt)
    x[1, : n_cls // 2] = -np.inf  # a masked half row (whole chunks and lanes of -inf)
    xd = KIND.to(x)
    with _cuda.force_strategy(strategy):
        sm = KIND.back(gpuce.softmax(xd))
        out = KIND.to(np.full(x.shape, np.nan, dtype=x.dtype))
        lsm = gpuce.log_softmax(xd, out=out)
        assert lsm is out
        lsm = KIND.back(lsm)
        lse = KIND.back(gpuce.logsumexp(xd))
    assert sm.dtype == x.dtype and lsm.dtype == x.dtype
    assert lse.dtype == (np.float64 if dt == "float64" else np.float32)
    check_array(sm, ref_softmax(x), dt, "softmax")
    check_array(lsm, ref_log_softmax(x), dt, "log_softmax")
    check_loss(lse, ref_logsumexp(x), dt, "logsumexp")


# ---- 128-bit streaming of rows that do not start on 16 bytes (cuda_vec.peel) ------------------

PEEL_STRATEGIES = ("block_cached", "block", "split")
# layout -> (row length, elements from a 16-byte boundary to the first row): rows on 16 bytes;
# rows of 117 values (row 1 starts inside the 16-byte chunk where row 0 ends, and ends inside
# one); an offset view, one element past the boundary (half floats: inside a 32-bit word).
# (test_softmax_family runs the same kernels on rows of 150-257 values in every mode.)
PEEL_LAYOUTS = {"aligned": (120, 0), "unaligned_c": (117, 0), "offset_view": (120, 1)}


def _placed(rows, phase, rng):
    """(buffer, view): ``rows`` copied into a simulated device buffer, ``phase`` elements past
    a 16-byte boundary, with random-bit guards of more than 16 bytes before and after it (in
    the same 16-byte chunks as the first and last row)."""
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    item = rows.dtype.itemsize
    before, after = 16 // item + phase, 16 // item + 1
    n = before + rows.size + after
    raw = np.empty(n * item + 16, np.uint8)
    buf = raw[-raw.ctypes.data % 16:][:n * item]
    buf[:] = rng.integers(0, 256, buf.size, dtype=np.uint8)  # the guards' bits
    buf = buf.view(rows.dtype)
    view = buf[before:before + rows.size].reshape(rows.shape)
    view[...] = rows
    assert view.ctypes.data % 16 == phase * item
    return buf, FakeCUDAArray(view)


def _guards(buf, rows_size, phase):
    before = 16 // buf.dtype.itemsize + phase
    return np.concatenate([buf[:before], buf[before + rows_size:]]).view(np.uint8).copy()


@pytest.mark.parametrize("layout", list(PEEL_LAYOUTS))
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("strategy", PEEL_STRATEGIES)
def test_peeled_softmax_rows(strategy, dt, layout, monkeypatch):
    """The block kernels' peeled 128-bit variants take rows at any offset from 16 bytes: the
    head and tail element by element, the middle in 16-byte steps (aligned rows: the _vec
    variants). softmax into the rows of a
    junk-filled larger buffer: every element written (against the reference), the guards
    either side (in the rows' first and last 16-byte chunks) untouched, so no store strays
    into a neighbour's elements. Offset views: log_softmax in place the same way, and an
    output at another offset than x takes the scalar kernels."""
    n_cls, phase = PEEL_LAYOUTS[layout]
    launched = record_launches(monkeypatch)
    rng = rng_for("peel", strategy, dt, layout)
    x = make_logits(rng, (2, n_cls), dt)
    x[1, :n_cls // 2] = -np.inf  # (a masked half row)
    xbuf, xd = _placed(x, phase, rng)
    obuf, out = _placed(np.full(x.shape, np.nan, x.dtype), phase, rng)
    guards = _guards(obuf, x.size, phase)
    with _cuda.force_strategy(strategy):
        gpuce.softmax(xd, out=out)
        variant = "_vec" if layout == "aligned" else "_peel"
        assert launched and all(n.endswith(variant) for n in launched), launched
        np.testing.assert_array_equal(_guards(obuf, x.size, phase), guards, "softmax's guards")
        check_array(out._ary, ref_softmax(x), dt, f"softmax {layout}")
        if layout != "offset_view":
            return
        launched.clear()
        sm = KIND.back(gpuce.softmax(xd))  # a fresh output: another phase than x
        assert launched and not any(n.endswith(("_vec", "_peel")) for n in launched), launched
        check_array(sm, ref_softmax(x), dt, "softmax, output at another offset")
        guards = _guards(xbuf, x.size, phase)
        launched.clear()
        gpuce.log_softmax(xd, out=xd)  # in place
        assert launched and all(n.endswith("_peel") for n in launched), launched
    np.testing.assert_array_equal(_guards(xbuf, x.size, phase), guards, "in place: guards")
    check_array(xd._ary, ref_log_softmax(x), dt, "log_softmax in place")


# cross entropy's block_cached on rows anywhere (its _peel variant): the options run on
# every dtype, soft targets also as float32 probabilities with half logits (another kernel);
# a softcap without smoothing (zloss_softcap_none, class_mask_softcap) caches the chain factor
CE_PEEL_OPTIONS = ("all_hard_mean", "zloss_softcap_none", "soft_smooth_weight_mean", "soft_f32",
                   "class_mask", "class_mask_softcap")
CE_PEEL_MASKED = {
    "class_mask": dict(reduction="none", weight=True, label_smoothing=0.2, softcap=4.0),
    "class_mask_softcap": dict(reduction="none", weight=True, z_loss=1e-3, softcap=4.0),
}


def _ce_peel_case(rng, dt, n_cls, opt, n_rows=3):
    """(x, t, kw) of a CE_PEEL_OPTIONS option: class_mask* is a per-row mask (NaN logits
    where masked: never read into a sum) with weights and a softcap, and with smoothing
    (class_mask) or without (class_mask_softcap)."""
    if opt in CE_PEEL_MASKED:
        x, t, kw = build_case(rng, n_rows, n_cls, dt, CE_PEEL_MASKED[opt])
        mask = rng.random(x.shape) < 0.7
        mask[np.arange(n_rows), t] = True
        x[~mask] = np.nan
        kw["class_mask"] = mask
        return x, t, kw
    x, t, kw = build_case(rng, n_rows, n_cls, dt, OPTIONS["soft_smooth_weight_mean" if opt ==
                                                           "soft_f32" else opt])
    if opt == "soft_f32":
        t = t.astype(np.float64)
        t = (t / t.sum(-1, keepdims=True)).astype(np.float32)
    return x, t, kw


@pytest.mark.parametrize("opt", CE_PEEL_OPTIONS)
@pytest.mark.parametrize("layout", ["unaligned_c", "offset_view"])
@pytest.mark.parametrize("dt", list(DTYPES))
def test_peeled_cross_entropy_rows(dt, layout, opt, monkeypatch):
    """Cross entropy's block_cached takes rows at any offset from 16 bytes through its peeled
    128-bit variant: the gradient written into the rows of a junk-filled buffer at the
    logits' phase (out=; every element written, the guards either side untouched), and in
    place, against the reference. Soft targets sit at phase 0 (read by element: any phase)."""
    if opt == "soft_f32" and dt not in ("float16", "bfloat16"):
        pytest.skip("float32 probabilities with half logits only")
    n_cls, phase = PEEL_LAYOUTS[layout]
    launched = record_launches(monkeypatch)
    rng = rng_for("ce-peel", dt, layout, opt)
    x, t, kw = _ce_peel_case(rng, dt, n_cls, opt)
    ref_loss, ref_grad = ref_cross_entropy(x, t, **kw)
    dev = {k: to_dev(v) for k, v in kw.items()}
    xbuf, xd = _placed(x, phase, rng)
    gbuf, gd = _placed(np.full(x.shape, np.nan, x.dtype), phase, rng)
    guards = _guards(gbuf, x.size, phase)
    with _cuda.force_strategy("block_cached"):
        loss, grad = gpuce.cross_entropy_with_grad(xd, to_dev(t), out=gd, **dev)
    main = [n for n in launched if n.startswith("ce_block")]
    assert main and all(n.endswith("_peel") for n in main), launched
    assert grad is gd
    np.testing.assert_array_equal(_guards(gbuf, x.size, phase), guards, "out=: guards")
    check_loss(KIND.back(loss), ref_loss, dt, f"loss {layout}")
    check_array(gd._ary, ref_grad, dt, f"grad {layout}")
    if opt not in ("all_hard_mean", "zloss_softcap_none"):
        return
    guards = _guards(xbuf, x.size, phase)
    launched.clear()
    with _cuda.force_strategy("block_cached"):
        loss, _ = gpuce.cross_entropy_with_grad(xd, to_dev(t), inplace=True, **dev)
    assert any(n.endswith("_peel") for n in launched), launched
    np.testing.assert_array_equal(_guards(xbuf, x.size, phase), guards, "in place: guards")
    check_loss(KIND.back(loss), ref_loss, dt, "loss in place")
    check_array(xd._ary, ref_grad, dt, "grad in place")


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("dt", list(DTYPES))
def test_peeled_cross_entropy_bits(dt, soft, monkeypatch):
    """A peeled row's loss and gradient bits do not depend on where it sits in memory (batch
    invariance: the sums read the cached row by column, not in the memory's 16-byte steps):
    rows of 117 values (each row at another phase from 16 bytes) in a batch of 5, in a
    permuted batch of 3 and as an offset view give the same bits; rows of 120 values (whole
    16-byte steps) one element off 16 bytes give the bits of the aligned kernel (_vec)."""
    launched = record_launches(monkeypatch)
    K = 16 // np.dtype(DTYPES[dt]).itemsize
    for n_cls in (117, 120):
        rng = rng_for("ce-peel-bits", dt, soft, n_cls)
        x, t, kw = _ce_peel_case(rng, dt, n_cls, "soft_smooth_weight_mean" if soft
                                 else "all_hard_mean", n_rows=5)
        x[1, rng.integers(0, n_cls, n_cls // 3)] = -np.inf
        kw = dict(kw, reduction="none", z_loss=1e-3, softcap=15.0)
        kw.pop("grad_output", None)
        dev = {k: to_dev(v) for k, v in kw.items()}

        def run(xd, tt, phase=0):
            _, out = _placed(np.full(tt.shape[:1] + (n_cls,), np.nan, x.dtype), phase, rng)
            launched.clear()
            with _cuda.force_strategy("block_cached"):
                loss, _ = gpuce.cross_entropy_with_grad(xd, to_dev(tt), out=out, **dev)
            main = [n for n in launched if n.startswith("ce_block")]
            return KIND.back(loss), out._ary.copy(), main

        loss, grad, main = run(KIND.to(x), t)
        assert main == ["ce_block_cached" + ("_vec" if n_cls % K == 0 else "_peel")], main
        if n_cls % K:
            rows = [3, 1, 2]
            sub_loss, sub_grad, _ = run(KIND.to(x[rows]), t[rows])
            assert sub_loss.tobytes() == loss[rows].tobytes()
            assert sub_grad.tobytes() == grad[rows].tobytes()
        _, xd = _placed(x, 1, rng)  # every row one element further on
        off_loss, off_grad, main = run(xd, t, 1)
        assert main == ["ce_block_cached_peel"], main
        assert off_loss.tobytes() == loss.tobytes(), (n_cls, off_loss, loss)
        assert off_grad.tobytes() == grad.tobytes(), n_cls


def test_peel_row_parts():
    """cuda_vec.peel's split of a row: head, whole 16-byte steps on the word view, tail --
    every column exactly once, each step 16-byte aligned, each edge shorter than a step."""
    from gpuce.kernels.cuda_vec import peel, word_view_skip
    for dt in ("float16", "float32", "float64"):
        P = peel(dt, 16 // np.dtype(dt).itemsize)
        K = P.K
        for phase in range(K):
            skip = word_view_skip(phase, dt)
            for n_cls in range(0, 3 * K + 2):
                for row in range(3 * K):
                    start, h, first, n_mid, n_edge = (int(v) for v in
                                                      P.parts(phase, row, n_cls))
                    assert start == row * n_cls
                    cols = [int(P.edge_col(q, h, n_mid)) for q in range(n_edge)]
                    mid = [h + s * K + k for s in range(n_mid) for k in range(K)]
                    assert sorted(cols + mid) == list(range(n_cls)), (phase, start, n_cls)
                    assert h < K and n_edge - h < K
                    if n_mid:
                        assert (phase + start + h) % K == 0
                        assert first * K + skip == start + h  # the word view's step
                        assert first >= 0


@pytest.mark.parametrize("case", ["warp_8x16", "block_cached", "split"])
def test_softmax_axes_and_in_place(case):
    strategy, n_cls = STRATEGY_CASES[case]
    rng = np.random.default_rng(7)
    x = make_logits(rng, (n_cls, 2, 3), "float32")
    with _cuda.force_strategy(strategy):
        got = KIND.back(gpuce.softmax(KIND.to(x), axis=0))
        check_array(got, ref_softmax(x, axis=0), "float32", "softmax axis 0")
        got = KIND.back(gpuce.logsumexp(KIND.to(x), axis=0))
        check_loss(got, ref_logsumexp(x, axis=0), "float32", "logsumexp axis 0")
        y = make_logits(rng, (2, n_cls), "float32")
        yd = KIND.to(y)
        res = gpuce.log_softmax(yd, out=yd)  # in place
        assert res is yd
        check_array(KIND.back(yd), ref_log_softmax(y), "float32", "log_softmax in place")


# ---- the special rows ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_masked_rows(case):
    """-inf masks never give NaN; an all -inf row has loss +inf and a zero gradient (the
    contract; tests/reference.py gives NaN there when z_loss=0: 0 * inf), softmax 0."""
    strategy, n_cls = STRATEGY_CASES[case]
    rng = np.random.default_rng(11)
    x = make_logits(rng, (4, n_cls), "float32")
    x[0, 1:] = -np.inf                 # only the target class is finite
    x[1, : 3 * n_cls // 4] = -np.inf   # most of the row masked (whole chunks in split)
    x[2, :] = -np.inf                  # everything masked
    t = np.array([0, n_cls - 1, 3, 1])
    loss, grad = run_ce(x, t, strategy, reduction="none")
    assert not np.isnan(loss).any() and not np.isnan(grad).any()
    assert loss[2] == np.inf and not grad[2].any()
    keep = [0, 1, 3]
    ref_loss, ref_grad = ref_cross_entropy(x[keep], t[keep], reduction="none")
    check_loss(loss[keep], ref_loss, "float32", "loss")
    check_array(grad[keep], ref_grad, "float32", "grad")
    with _cuda.force_strategy(strategy):
        sm = KIND.back(gpuce.softmax(KIND.to(x)))
    assert not sm[2].any() and not np.isnan(sm).any()
    # with z_loss the reference agrees on the +inf row, and the mean is +inf
    loss, grad = run_ce(x, t, strategy, reduction="mean", z_loss=1e-2)
    ref_loss, ref_grad = ref_cross_entropy(x, t, reduction="mean", z_loss=1e-2)
    assert loss == ref_loss == np.inf
    check_array(grad, ref_grad, "float32", "grad with z_loss")


@pytest.mark.parametrize("case", CASES)
def test_large_offsets(case):
    """Logits near +-1e4: lse - z is formed as (max - z) + log s and the smoothing / soft
    terms relative to the max, so the loss keeps fp32's 1e-5 (lse first would lose ~5e-4
    nats to the rounding of max + log s)."""
    strategy, n_cls = STRATEGY_CASES[case]
    rng = np.random.default_rng(31)
    for offset in (1e4, -1e4):
        x = rounded(offset + rng.standard_normal((3, n_cls)), "float32")
        t = rng.integers(0, n_cls, 3)
        kw = dict(reduction="none", label_smoothing=0.1,
                  weight=rng.uniform(0.5, 2, n_cls).astype(np.float32))
        loss, grad = run_ce(x, t, strategy, **kw)
        ref_loss, ref_grad = ref_cross_entropy(x, t, **kw)
        check_loss(loss, ref_loss, "float32", f"loss at {offset}")
        check_array(grad, ref_grad, "float32", f"grad at {offset}")
        q = soft_targets(rng, x.shape, "float32")
        loss, _ = run_ce(x, q, strategy, reduction="none")
        check_loss(loss, ref_cross_entropy(x, q, reduction="none")[0], "float32",
                   f"soft loss at {offset}")
        with _cuda.force_strategy(strategy):
            lsm = KIND.back(gpuce.log_softmax(KIND.to(x)))
        np.testing.assert_allclose(lsm, ref_log_softmax(x), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("case", CASES)
def test_infinite_and_nan_logits(case):
    """Rows the online (max, sum) state must not get wrong, in every strategy, against the
    reference: -inf over the first steps then logits near -1e4 (the first finite max must
    not be rescaled from 0), a +inf (logsumexp and loss NaN, as a two-pass softmax gives), a
    NaN (spreads: NaN softmax too), a row of -inf (logsumexp -inf, loss +inf), a plain row."""
    strategy, n_cls = STRATEGY_CASES[case]
    rng = rng_for(case, "inf")
    x = make_logits(rng, (5, n_cls), "float32")
    x[0, : n_cls // 2] = -np.inf
    x[0, n_cls // 2:] -= 1e4
    x[1, n_cls // 3] = np.inf
    x[2, n_cls // 3] = np.nan
    x[3] = -np.inf
    with _cuda.force_strategy(strategy):
        lse = KIND.back(gpuce.logsumexp(KIND.to(x)))
        sm = KIND.back(gpuce.softmax(KIND.to(x)))
    check_loss(lse, ref_logsumexp(x), "float32", "logsumexp")
    keep = [0, 3, 4]  # (the reference's softmax of a NaN sum is 0, PyTorch's NaN)
    check_array(sm[keep], ref_softmax(x)[keep], "float32", "softmax")
    assert np.isneginf(lse[3]) and np.isnan(lse[1]) and np.isnan(lse[2])
    assert np.isnan(sm[2]).all()
    t = np.array([n_cls - 1, 0, 0, 1, 2])
    loss, grad = run_ce(x, t, strategy, reduction="none")
    ref_loss, ref_grad = ref_cross_entropy(x, t, reduction="none")
    keep = [0, 4]
    check_loss(loss[keep], ref_loss[keep], "float32", "loss")
    check_array(grad[keep], ref_grad[keep], "float32", "grad")
    assert np.isnan(loss[1]) and np.isnan(loss[2]) and np.isposinf(loss[3])
    assert np.all(grad[3] == 0)


@pytest.mark.parametrize("case", CASES)
def test_bad_targets_give_nan_rows(case):
    strategy, n_cls = STRATEGY_CASES[case]
    rng = np.random.default_rng(13)
    x = make_logits(rng, (5, n_cls), "float32")
    t = np.array([1, -1, n_cls, 2, -7])
    loss, grad = run_ce(x, t, strategy, reduction="none")
    bad = [1, 2, 4]
    good = [0, 3]
    assert np.isnan(loss[bad]).all() and not grad[bad].any()
    ref_loss, ref_grad = ref_cross_entropy(x[good], t[good], reduction="none")
    check_loss(loss[good], ref_loss, "float32", "loss")
    check_array(grad[good], ref_grad, "float32", "grad")
    loss, _ = run_ce(x, t, strategy, reduction="mean", with_grad=False)
    assert np.isnan(loss)
    with pytest.raises(ValueError, match="target"):
        run_ce(x, t, strategy, reduction="mean", validate=True)
    loss, _ = run_ce(x, np.array([1, 0, 3, 2, -100]), strategy, reduction="sum", validate=True,
                     with_grad=False)
    assert np.isfinite(loss)


@pytest.mark.parametrize("case", ["warp_2x16", "block", "split"])
def test_all_ignored_mean_is_zero(case):
    strategy, n_cls = STRATEGY_CASES[case]
    x = make_logits(np.random.default_rng(3), (3, n_cls), "float32")
    t = np.full(3, -100)
    loss, grad = run_ce(x, t, strategy, reduction="mean", weight=np.ones(n_cls, np.float32),
                        label_smoothing=0.1, z_loss=0.1)
    assert loss.shape == () and loss == 0.0 and not grad.any() and not np.isnan(grad).any()


# ---- buffers: out=, inplace, loss only, layouts, dtype conversions ----------------------------

@pytest.mark.parametrize("case", CASES)
def test_out_inplace_and_loss_only(case):
    strategy, n_cls = STRATEGY_CASES[case]
    rng = np.random.default_rng(17)
    x, t, kw = build_case(rng, 3, n_cls, "float32", OPTIONS["all_hard_mean"])
    ref_loss, ref_grad = ref_cross_entropy(x, t, **kw)
    dev = {k: to_dev(v) for k, v in kw.items()}
    xd, td = KIND.to(x), KIND.to(t)
    with _cuda.force_strategy(strategy):
        out = KIND.to(np.full(x.shape, 7.5e8, dtype=np.float32))  # junk
        loss, grad = gpuce.cross_entropy_with_grad(xd, td, out=out, **dev)
        assert grad is out
        check_array(KIND.back(out), ref_grad, "float32", "out=")
        check_array(KIND.back(xd), x, "float32", "logits untouched")
        loss2 = gpuce.cross_entropy(xd, td, **{k: v for k, v in dev.items()
                                               if k != "grad_output"})
        assert KIND.back(loss2) == KIND.back(loss)  # deterministic, and without the gradient
        loss3, grad3 = gpuce.cross_entropy_with_grad(xd, td, inplace=True, **dev)
        assert grad3 is xd
        check_array(KIND.back(xd), ref_grad, "float32", "inplace")
    check_loss(KIND.back(loss), ref_loss, "float32", "loss")
    check_loss(KIND.back(loss3), ref_loss, "float32", "inplace loss")


def test_strided_and_batched_inputs():
    rng = np.random.default_rng(19)
    # (2, 3, C) logits with (2, 3) targets; a transposed (non-contiguous) copy of them
    x = make_logits(rng, (2, 3, 150), "float32")
    t = rng.integers(0, 150, (2, 3))
    ref_loss, ref_grad = ref_cross_entropy(x, t, reduction="none", label_smoothing=0.1)
    with _cuda.force_strategy("block"):
        loss, grad = gpuce.cross_entropy_with_grad(KIND.to(x), KIND.to(t), reduction="none",
                                                   label_smoothing=0.1)
        check_loss(KIND.back(loss), ref_loss, "float32", "batched loss")
        check_array(KIND.back(grad), ref_grad, "float32", "batched grad")
        xt = KIND.to(np.ascontiguousarray(x.transpose(1, 0, 2))).transpose((1, 0, 2))
        tt = KIND.to(np.ascontiguousarray(t.T)).T
        assert not xt.is_c_contiguous()
        out = KIND.to(np.full((3, 2, 150), np.nan, np.float32)).transpose((1, 0, 2))
        loss, grad = gpuce.cross_entropy_with_grad(xt, tt, reduction="none",
                                                   label_smoothing=0.1, out=out)
        assert grad is out
        check_loss(KIND.back(loss), ref_loss, "float32", "strided loss")
        check_array(KIND.back(out), ref_grad, "float32", "strided out=")
        loss, grad = gpuce.cross_entropy_with_grad(xt, tt, reduction="none",
                                                   label_smoothing=0.1, inplace=True)
        assert grad is xt
        check_array(KIND.back(xt), ref_grad, "float32", "strided inplace")
        # one row without a batch axis: 0-d target, 0-d loss
        loss, grad = gpuce.cross_entropy_with_grad(KIND.to(x[1, 2]), KIND.to(t[1, 2]),
                                                   reduction="none", label_smoothing=0.1)
        assert loss.shape == () and grad.shape == (150,)
        check_loss(KIND.back(loss), ref_loss[1, 2], "float32", "1-d loss")
        check_array(KIND.back(grad), ref_grad[1, 2], "float32", "1-d grad")


def test_converted_argument_dtypes():
    """int32 / uint8 targets, float16 weights, float64 grad_output and soft targets of another
    float dtype than the logits: converted on the device, or read as they are."""
    rng = np.random.default_rng(23)
    x = make_logits(rng, (4, 77), "float32")
    w = rng.uniform(0.5, 2, 77).astype(np.float16)
    go = rng.uniform(-1, 1, 4)
    for t in (rng.integers(0, 77, 4).astype(np.int32), rng.integers(0, 77, 4).astype(np.uint8)):
        loss, grad = run_ce(x, t, "warp", reduction="none", weight=w, grad_output=go)
        ref_loss, ref_grad = ref_cross_entropy(x, t.astype(np.int64), reduction="none",
                                               weight=w, grad_output=go)
        check_loss(loss, ref_loss, "float32", "loss")
        check_array(grad, ref_grad, "float32", "grad")
    # soft targets in another float dtype: used as given (half logits read float32 q)
    for ldt, qdt, case in (("bfloat16", "float32", "warp"), ("float16", "float64", "split"),
                           ("bfloat16", "float16", "block"), ("float32", "float16", "warp"),
                           ("float64", "float32", "block_cached")):
        strategy, n_cls = STRATEGY_CASES[case]
        xq = make_logits(rng, (3, n_cls), ldt)
        q = soft_targets(rng, xq.shape, qdt)
        loss, grad = run_ce(xq, q, strategy, reduction="sum", label_smoothing=0.1)
        ref_loss, ref_grad = ref_cross_entropy(xq, q, reduction="sum", label_smoothing=0.1)
        check_loss(loss, ref_loss, ldt, f"soft {qdt} loss, {ldt} logits")
        check_array(grad, ref_grad, ldt, f"soft {qdt} grad, {ldt} logits")


def test_empty_batch():
    x = np.zeros((0, 20), np.float32)
    t = np.zeros(0, np.int64)
    loss, grad = run_ce(x, t, None, reduction="mean")
    assert loss.shape == () and loss == 0.0 and grad.shape == (0, 20)
    loss, _ = run_ce(x, t, None, reduction="none")
    assert loss.shape == (0,)


# ---- dispatch, strategy choice, the pieces ------------------------------------------------------

def test_dispatch_routes_simulator_arrays():
    xd = KIND.to(np.zeros((2, 3), np.float32))
    assert _dispatch.backend_for(xd).name == "cuda"
    assert _dispatch.backend_for(np.zeros(3)).name == "cpu"
    res = gpuce.softmax(xd)
    assert type(res) is type(xd)
    with pytest.raises(TypeError, match="target"):
        gpuce.cross_entropy(xd, np.zeros(2, np.int64))  # host target, device logits


def test_strategy_choice_and_forcing(monkeypatch):
    dev = _cuda._device_limits(0)

    def plan(*args):
        return _cuda._plan(*args)
    for case in (c for c, (strategy, _) in STRATEGY_CASES.items() if strategy == "warp"):
        for dt in DTYPES:
            assert plan("ce", 4, case_shape(case, dt)[1], dt, dev).part == case
            assert plan("softmax", 4, case_shape(case, dt, ALIGNED_CASES)[1], dt, dev).part == case
    from gpuce._cuda_plan import WARP_SHAPES, warp_capacity
    for dt in DTYPES:  # the warp part chosen pads at most 2x the row (C > 16)
        for n_cls in range(17, warp_capacity("warp", dt) + 1):
            p = plan("ce", 4, n_cls, dt, dev)
            assert p.part in WARP_SHAPES and warp_capacity(p.part, dt) <= 2 * n_cls, (n_cls, dt)
    assert plan("ce", 4, 257, "float64", dev).part == "block_cached"
    assert plan("ce", 4, 20000, "float32", dev).part == "block"
    with _cuda.force_strategy("split"):
        p = plan("ce", 4, 257, "float32", dev)
        assert p.part == "split" and p.n_split == 4
    monkeypatch.setenv("GPUCE_CUDA_STRATEGY", "block")
    assert plan("ce", 4, 13, "float32", dev).part == "block"
    with pytest.raises(ValueError, match="warp"):
        with _cuda.force_strategy("warp"):
            plan("ce", 4, 600, "float32", dev)
    monkeypatch.setenv("GPUCE_CUDA_STRATEGY", "nope")
    with pytest.raises(ValueError, match="GPUCE_CUDA_STRATEGY"):
        plan("ce", 4, 13, "float32", dev)


def test_split_count_fills_whole_waves():
    """An H100 (132 SMs, 2 split blocks an SM: 264 slots) splits few long rows into chunks
    that end in whole waves: 64 rows -> 4 chunks (256 blocks, one wave; 5 would add a second
    wave 21% full), 100 -> 5 (500 blocks, 95% of two waves), 130 -> 2 (260); a single row
    takes the most chunks of >= 8 values a thread (31 at C = 128256)."""
    from gpuce._cuda_plan import DeviceLimits, plan_for, split_count
    h100 = DeviceLimits.h100()
    for n_rows, n_cls, want in ((64, 128256, 4), (100, 128256, 5), (130, 20000, 2),
                                (1, 128256, 31), (64, 32000, 4)):
        p = plan_for(n_rows, n_cls, "bfloat16", h100)
        assert p.strategy == "split" and p.n_split == want, (n_rows, n_cls, p)
        assert p.grid == n_rows * want
    for n_rows in range(1, 132):  # never slower, in whole waves, than the next count up
        n = split_count(n_rows, 128256, 512, 264)
        waves = -(-n_rows * n // 264) / n
        assert all(waves <= -(-n_rows * k // 264) / k for k in range(2, 32)
                   if k <= -(-528 // n_rows)), n_rows


@pytest.mark.parametrize("case", CASES)
def test_mean_and_sum_launch_at_most_three_kernels(case, monkeypatch):
    """The mean divisors and the total are folded into their producers (a last-block ticket,
    then a fixed-order sum): at most 3 launches, and repeated calls give the same bits (the
    ticket resets itself)."""
    strategy, n_cls = STRATEGY_CASES[case]
    launched = record_launches(monkeypatch)
    rng = np.random.default_rng(37)
    for opt in ("weight_ignore_mean", "smooth_weight_sum"):
        x, t, kw = build_case(rng, 5, n_cls, "float32", OPTIONS[opt])
        ref_loss, ref_grad = ref_cross_entropy(x, t, **kw)
        losses = []
        for _ in range(2):
            launched.clear()
            loss, grad = run_ce(x, t, strategy, **kw)
            assert 1 <= len(launched) <= 3, launched
            losses.append(loss)
        check_loss(losses[0], ref_loss, "float32", f"{opt} loss")
        check_array(grad, ref_grad, "float32", f"{opt} grad")
        assert losses[0].tobytes() == losses[1].tobytes()


def test_simulated_shuffles():
    """shfl_{xor,down,up,sync} in a full warp and in a partial last warp (40 threads)."""
    @cuda.jit
    def kernel(out):
        i = cuda.threadIdx.x
        v = i * 10
        out[i, 0] = cuda.shfl_xor_sync(0xFFFFFFFF, v, 3)
        out[i, 1] = cuda.shfl_down_sync(0xFFFFFFFF, v, 4)
        out[i, 2] = cuda.shfl_up_sync(0xFFFFFFFF, v, 1)
        out[i, 3] = cuda.shfl_sync(0xFFFFFFFF, v, 5)

    out = cuda.to_device(np.zeros((40, 4), np.int64))
    kernel[1, 40](out)
    got = out.copy_to_host()
    for i in range(40):
        lane, base, width = i % 32, i - i % 32, min(32, 40 - (i - i % 32))
        def at(src):
            return (base + src) * 10 if 0 <= src < width else i * 10
        assert list(got[i]) == [at(lane ^ 3), at(lane + 4), at(lane - 1), at(5)], i


def test_block_barrier():
    """gpuce's simulated syncthreads (kernels/cuda_simulator.py):
    every barrier holds each thread until the whole block (less threads that returned) is
    there, thread 0's writes are seen after it, syncthreads_count counts, and threads that
    returned early do not hold the others."""
    @cuda.jit
    def kernel(out, n_live):
        buf = cuda.shared.array(64, np.int64)
        i = cuda.threadIdx.x
        if i >= n_live:
            return
        for step in range(3):
            buf[i] = i + step
            cuda.syncthreads()
            t = 0
            for j in range(n_live):
                t += buf[j]
            cuda.syncthreads()  # everyone read buf before the next step overwrites it
            out[i, step] = t
        out[i, 3] = cuda.syncthreads_count(i % 3 == 0)

    for n_live in (64, 40):
        out = cuda.to_device(np.full((64, 4), -7, np.int64))
        kernel[1, 64](out, n_live)
        got = out.copy_to_host()
        want = [sum(range(n_live)) + step * n_live for step in range(3)]
        want.append(len(range(0, n_live, 3)))
        assert (got[:n_live] == want).all(), n_live
        assert (got[n_live:] == -7).all()


def test_block_barrier_raises_a_threads_exception():
    """One thread's error (an out-of-bounds index) ends the block's launch with that error,
    while the others wait at a barrier or a shuffle: no hang, not the others' abort."""
    @cuda.jit
    def kernel(out):
        i = cuda.threadIdx.x
        if i == 37:
            out[1000] = 1
        v = cuda.shfl_xor_sync(0xFFFFFFFF, i, 1) if i < 32 else i
        cuda.syncthreads()
        out[i] = v

    out = cuda.to_device(np.zeros(64, np.int64))
    with pytest.raises(IndexError, match="tid=.37"):
        kernel[1, 64](out)


def test_shared_arrays_one_per_line_shared_by_the_whole_block():
    """cuda.shared.array (gpuce's lookup by the caller's frame): every thread of the block
    gets the same array for one line, and two lines get two arrays."""
    @cuda.jit
    def kernel(out):
        a = cuda.shared.array(64, np.int64)
        b = cuda.shared.array(64, np.int64)
        i = cuda.threadIdx.x
        a[i] = i + 1
        b[i] = -(i + 1)
        cuda.syncthreads()
        ta = 0
        tb = 0
        for j in range(64):
            ta += a[j]
            tb += b[j]
        out[i, 0] = ta
        out[i, 1] = tb

    out = cuda.to_device(np.zeros((64, 2), np.int64))
    kernel[1, 64](out)
    assert (out.copy_to_host() == [64 * 65 // 2, -64 * 65 // 2]).all()


def test_a_missing_barrier_shows_in_one_direction_or_the_other():
    """The simulated block runs its threads one at a time, and the two blocks run them in
    opposite orders after the barrier: a read of shared memory another thread writes without
    a barrier between sees the unwritten value -- in the lower half of the threads in one
    block, the upper half in the other."""
    @cuda.jit
    def kernel(out):
        buf = cuda.shared.array(64, np.int64)
        i = cuda.threadIdx.x
        b = cuda.blockIdx.x
        buf[i] = -1
        cuda.syncthreads()
        buf[i] = i          # (no barrier before the read: the bug)
        out[b, i] = buf[63 - i]

    out = cuda.to_device(np.zeros((2, 64), np.int64))
    kernel[2, 64](out)
    got = out.copy_to_host()
    unwritten = [set(np.flatnonzero(got[b] == -1)) for b in range(2)]
    assert sorted(map(min, unwritten)) == [0, 32] and all(len(u) == 32 for u in unwritten)
    seen = got != -1
    assert (got[seen] == (63 - np.arange(64))[np.nonzero(seen)[1]]).all()


def test_a_shuffle_some_lanes_never_reach_raises():
    """A full-mask shuffle that lane 5 never reaches (it returned): RuntimeError at once."""
    @cuda.jit
    def kernel(out):
        i = cuda.threadIdx.x
        if i == 5:
            return
        out[i] = cuda.shfl_xor_sync(0xFFFFFFFF, i, 1)

    out = cuda.to_device(np.zeros(32, np.int64))
    with pytest.raises(RuntimeError, match="not every lane of the warp"):
        kernel[1, 32](out)


def test_block_reductions():
    """The shared reduction module across 3 warps (blocks are whole warps: a full-mask shuffle
    needs every lane), with -inf values and threads that hold nothing."""
    from gpuce.kernels.cuda_reduce import reductions
    RD = reductions(np.float32)

    @cuda.jit
    def kernel(vals, out):
        buf_m = cuda.shared.array(32, np.float32)
        buf_s = cuda.shared.array(32, np.float32)
        i = cuda.threadIdx.x
        v = vals[i]
        mx = RD.block_max(v, buf_m)
        sm = RD.block_sum(v if v > np.float32(-np.inf) else np.float32(0), buf_s)
        m, s = RD.block_merge(v, np.float32(1) if v > np.float32(-np.inf) else np.float32(0),
                              buf_m, buf_s)
        out[i, 0] = mx
        out[i, 1] = sm
        out[i, 2] = m
        out[i, 3] = s

    vals = np.random.default_rng(5).standard_normal(96).astype(np.float32)
    vals[::3] = -np.inf
    vals[70:] = -np.inf
    out = cuda.to_device(np.zeros((96, 4), np.float32))
    kernel[1, 96](cuda.to_device(vals), out)
    got = out.copy_to_host()
    finite = vals[np.isfinite(vals)].astype(np.float64)
    np.testing.assert_allclose(got[:, 0], finite.max())
    np.testing.assert_allclose(got[:, 1], finite.sum(), rtol=1e-6)
    np.testing.assert_allclose(got[:, 2], finite.max())
    np.testing.assert_allclose(got[:, 3], np.exp(finite - finite.max()).sum(), rtol=1e-6)
    allneg = cuda.to_device(np.full(96, -np.inf, np.float32))
    kernel[1, 96](allneg, out)
    got = out.copy_to_host()
    assert (got[:, 2] == -np.inf).all() and (got[:, 3] == 0).all()
