"""Extreme inputs against the float64 reference: +-1e4 spreads, -inf masks, all-equal rows,
a row with one finite logit, all -inf rows, C=1, N=0, a vocabulary of 300k."""
import numpy as np
import pytest

import gpuce
from helpers import (LOSS_DTYPE, assert_array_of, assert_grad_close, assert_log_softmax_close,
                     assert_loss_close, check_cross_entropy, fresh, make_hard_target,
                     make_logits, make_soft_target, make_weight, np_dtype, poison)
from reference import ref_log_softmax, ref_logsumexp, ref_softmax

pytestmark = pytest.mark.usefixtures("poison_allocations")

DTYPES = ["float16", "bfloat16", "float32", "float64"]
REDUCTIONS = ["none", "mean", "sum"]


def run_all(kind, x, t, dtype, reductions=REDUCTIONS, **kw):
    """cross_entropy_with_grad and cross_entropy for each reduction, against the reference."""
    ref_kw = dict(kw)
    call_kw = {k: fresh(kind, v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    for reduction in reductions:
        xk = fresh(kind, x)
        loss, grad = gpuce.cross_entropy_with_grad(xk, fresh(kind, t), reduction=reduction,
                                                   **call_kw)
        check_cross_entropy(kind.back(loss), kind.back(grad), x, t, dtype, reduction, **ref_kw)
        loss_only = gpuce.cross_entropy(xk, fresh(kind, t), reduction=reduction, **call_kw)
        check_cross_entropy(kind.back(loss_only), None, x, t, dtype, reduction, **ref_kw)


def check_softmax_family(kind, x, dtype):
    xk = fresh(kind, x)
    assert_grad_close(kind.back(gpuce.softmax(xk)), ref_softmax(x), dtype, "softmax")
    with np.errstate(invalid="ignore"):
        ref_ls = ref_log_softmax(x)
    assert_log_softmax_close(kind.back(gpuce.log_softmax(xk)), ref_ls, dtype, x=x)
    assert_loss_close(kind.back(gpuce.logsumexp(xk)), ref_logsumexp(x), dtype, "logsumexp")


# ---- large spreads -------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1, "z_loss": 1e-4},
                                  {"weight": True}, {"softcap": 30.0}],
                         ids=["plain", "smoothing_z", "weight", "softcap"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_spread_1e4(kind, dtype, opts, rng):
    """Logits spread over [-1e4, 1e4], every two at least ~300 apart: exp underflows for all
    but the top logit of a row, and the losses are 0 or hundreds of nats. (Close logits at
    this scale: test_large_offset_loss.)"""
    grid = np.tile(np.linspace(-1e4, 1e4, 40), (12, 1))
    x = (rng.permuted(grid, axis=1) + rng.uniform(-100, 100, grid.shape)).astype(np_dtype(dtype))
    t = make_hard_target(rng, (12,), 40)
    t[:4] = np.argmax(x[:4].astype(np.float64), axis=1)  # some rows right, with loss ~0
    kw = dict(opts)
    if kw.pop("weight", False):
        kw["weight"] = make_weight(rng, 40)
    run_all(kind, x, t, dtype, **kw)
    check_softmax_family(kind, x, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_spread_1e4_soft(kind, dtype, rng):
    x = rng.uniform(-1e4, 1e4, size=(9, 33)).astype(np_dtype(dtype))  # soft: ties are harmless
    q = make_soft_target(rng, (9, 33), dtype)
    run_all(kind, x, q, dtype, label_smoothing=0.05)


@pytest.mark.parametrize("offset", [1e4, -1e4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_offset_softmax(kind, dtype, offset, rng):
    """A large common offset: the max is subtracted before exp, nothing overflows."""
    x = (offset + rng.standard_normal((10, 50)) * 40).astype(np_dtype(dtype))
    check_softmax_family(kind, x, dtype)


@pytest.mark.parametrize("offset", [1e4, -1e4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_offset_loss(kind, dtype, offset, rng):
    """Logits near +-1e4 and a target tied with the row's max: each loss is about log 2 and
    must still be accurate to 1e-5 relative."""
    x = (offset + rng.standard_normal((10, 50)) * 40).astype(np_dtype(dtype))
    t = make_hard_target(rng, (10,), 50)
    x[np.arange(10), t] = x.max(axis=1)
    run_all(kind, x, t, dtype, reductions=["none"])


# ---- subnormal probabilities ------------------------------------------------------------------

@pytest.mark.parametrize("n_cls", [2, 80])  # both sides of the CPU's block-at-once exp
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_subnormal_probabilities(kind, dtype, n_cls):
    """Gaps that take exp(z - max) through the smallest normal into the subnormals and to 0:
    each probability is the reference's rounded value there too, not flushed to 0 (a bf16
    softmax of [0.369, 89.5] gave 0 for 1.9e-39). Elementwise, unlike the row criterion."""
    top = {"float64": (690.0, 750.0)}.get(dtype, (80.0, 106.0))
    gaps = np.linspace(*top, 61)
    x = np.zeros((gaps.size, n_cls))
    x[:, 1:] = -gaps[:, None]  # a row: one logit at 0, the rest at -gap
    x = x.astype(np_dtype(dtype))
    got = kind.back(gpuce.softmax(fresh(kind, x)))
    ref = ref_softmax(x)
    if dtype == "bfloat16":  # one ulp, the subnormal spacing at the bottom
        assert_grad_close(got, ref, dtype, "softmax")
        return
    fi = np.finfo(np_dtype(dtype))
    # GRAD_RTOL per element, and the spacing of the subnormals for the one rounding there
    tol = {"float32": 2e-5, "float64": 1e-12}[dtype] * np.abs(ref) + 2 * fi.smallest_subnormal
    err = np.abs(got.astype(np.float64) - ref)
    worst = np.unravel_index(np.argmax(err - tol), err.shape)
    assert np.all(err <= tol), f"gap {gaps[worst[0]]}: got {got[worst]!r}, ref {ref[worst]!r}"
    assert np.sum((ref[:, 1:] > 0) & (ref[:, 1:] < fi.tiny)) > 0  # the range was crossed


# ---- -inf masks ---------------------------------------------------------------------------

@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_neg_inf_mask_hard(kind, dtype, smoothing, rng):
    """Masked (-inf) classes that are not the target: finite loss without smoothing, +inf
    with smoothing (as in PyTorch); zero gradient on the masked classes."""
    x = make_logits(rng, (16, 30), dtype)
    t = make_hard_target(rng, (16,), 30, ignore_index=-100, ignore_frac=0.2)
    mask = rng.random(x.shape) < 0.4
    mask[np.arange(16), np.where(t >= 0, t, 0)] = False
    x[mask] = -np.inf
    run_all(kind, x, t, dtype, label_smoothing=smoothing, z_loss=0.01)
    check_softmax_family(kind, x, dtype)
    _, grad = gpuce.cross_entropy_with_grad(fresh(kind, x), fresh(kind, t))
    assert np.all(kind.back(grad)[mask] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_neg_inf_mask_soft(kind, dtype, rng):
    """Soft targets put no mass on the masked classes: 0 * -inf counts as 0."""
    x = make_logits(rng, (12, 25), dtype)
    mask = rng.random(x.shape) < 0.3
    mask[:, 0] = False
    x[mask] = -np.inf
    q = make_soft_target(rng, (12, 25), "float64")
    q[mask] = 0.0
    q = (q / q.sum(axis=1, keepdims=True)).astype(np_dtype(dtype))
    run_all(kind, x, q, dtype, weight=make_weight(rng, 25))


@pytest.mark.parametrize("dtype", DTYPES)
def test_target_class_masked(kind, dtype, rng):
    """The target's own logit is -inf: that row's loss is +inf, the others are unaffected."""
    x = make_logits(rng, (8, 12), dtype)
    t = make_hard_target(rng, (8,), 12)
    x[3, t[3]] = -np.inf
    run_all(kind, x, t, dtype, reductions=["none", "sum"])


# ---- all-equal rows and single finite logits -------------------------------------------------

@pytest.mark.parametrize("n_cls", [2, 7, 300])
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_equal_rows(kind, dtype, n_cls, rng):
    """Rows of one repeated value: softmax is 1/C, the loss log C, whatever the value."""
    vals = np.concatenate([rng.standard_normal(6) * 3, [0.0, 40.0, -60.0]])
    x = np.repeat(vals[:, None], n_cls, axis=1).astype(np_dtype(dtype))
    t = make_hard_target(rng, (len(vals),), n_cls)
    run_all(kind, x, t, dtype, label_smoothing=0.1, weight=make_weight(rng, n_cls))
    run_all(kind, x, make_soft_target(rng, x.shape, dtype), dtype)
    check_softmax_family(kind, x, dtype)


@pytest.mark.parametrize("value", [1e4, -1e4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_equal_rows_large(kind, dtype, value, rng):
    """All-equal rows at +-1e4: the loss is log C, accurate to 1e-5 relative."""
    x = np.full((3, 7), value, dtype=np_dtype(dtype))
    t = make_hard_target(rng, (3,), 7)
    run_all(kind, x, t, dtype, reductions=["none"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_equal_rows_large_softmax(kind, dtype):
    x = np.concatenate([np.full((2, 7), 1e4), np.full((2, 7), -1e4)]).astype(np_dtype(dtype))
    check_softmax_family(kind, x, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_finite_logit(kind, dtype, rng):
    """Rows with one finite logit: softmax is one-hot; loss 0 and zero gradient on that
    class, +inf loss on any other class."""
    n, c = 6, 10
    x = np.full((n, c), -np.inf)
    hot = rng.integers(0, c, n)
    x[np.arange(n), hot] = rng.standard_normal(n) * 3
    x = x.astype(np_dtype(dtype))
    t = hot.copy()
    t[4] = (hot[4] + 1) % c  # this row's target is masked
    run_all(kind, x, t, dtype, reductions=["none", "sum"])
    t_all_right = hot.copy()
    run_all(kind, x, t_all_right, dtype, z_loss=0.01)
    check_softmax_family(kind, x, dtype)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("z_loss", [0.0, 0.1])  # 0.0: once NaN from z_loss * lse**2 = 0 * inf
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_neg_inf_row(kind, dtype, z_loss, soft, rng):
    """A row of -inf only: loss +inf, softmax 0, logsumexp -inf, zero gradient; the other
    rows are unaffected (the documented deviation from PyTorch, which gives NaN)."""
    x = make_logits(rng, (5, 9), dtype)
    x[2] = -np.inf
    t = make_soft_target(rng, x.shape, dtype) if soft else make_hard_target(rng, (5,), 9)
    xk = fresh(kind, x)
    loss, grad = gpuce.cross_entropy_with_grad(xk, fresh(kind, t), reduction="none",
                                               z_loss=z_loss)
    loss, grad = kind.back(loss), kind.back(grad)
    assert np.isposinf(loss[2])
    assert np.all(grad[2].astype(np.float64) == 0)
    keep = [0, 1, 3, 4]
    check_cross_entropy(loss[keep], grad[keep], x[keep], t[keep], dtype, "none", z_loss=z_loss)
    sm = kind.back(gpuce.softmax(xk)).astype(np.float64)
    assert np.all(sm[2] == 0)
    assert_grad_close(sm, ref_softmax(x), dtype, "softmax")
    lse = kind.back(gpuce.logsumexp(xk))
    assert np.isneginf(lse[2])
    assert_loss_close(lse, ref_logsumexp(x), dtype, "logsumexp")


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_logit_stays_in_its_row(kind, dtype, rng):
    x = make_logits(rng, (4, 11), dtype)
    x[1, 5] = np.nan
    t = make_hard_target(rng, (4,), 11)
    run_all(kind, x, t, dtype, reductions=["none"])


# ---- sizes: C=1, N=0, C=300k ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_single_class(kind, dtype, rng):
    """C=1: softmax 1, log_softmax 0, loss 0 and zero gradient (z_loss still counts)."""
    x = make_logits(rng, (7, 1), dtype)
    t = np.zeros(7, dtype=np.int64)
    run_all(kind, x, t, dtype, label_smoothing=0.2, weight=make_weight(rng, 1))
    run_all(kind, x, t, dtype, z_loss=0.1, softcap=2.0)
    q = np.ones((7, 1), dtype=np_dtype(dtype))
    run_all(kind, x, q, dtype)
    check_softmax_family(kind, x, dtype)


EMPTY_SHAPES = [(0, 13), (0, 3, 13), (3, 0, 13)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_no_rows(kind, dtype, shape, rng):
    """N=0: per-row outputs are empty; mean and sum are 0.0; gradients are empty arrays."""
    x = np.zeros(shape, dtype=np_dtype(dtype))
    t = np.zeros(shape[:-1], dtype=np.int64)
    q = np.zeros(shape, dtype=np_dtype(dtype))
    for target in (t, q):
        for reduction in REDUCTIONS:
            xk = fresh(kind, x)
            loss, grad = gpuce.cross_entropy_with_grad(xk, fresh(kind, target),
                                                       reduction=reduction, z_loss=0.1)
            want = shape[:-1] if reduction == "none" else ()
            assert_array_of(loss, xk, LOSS_DTYPE[dtype], want, "loss")
            assert_array_of(grad, xk, dtype, shape, "grad")
            check_cross_entropy(kind.back(loss), kind.back(grad), x, target, dtype, reduction,
                                z_loss=0.1)
            out = fresh(kind, poison(shape, dtype))
            _, g2 = gpuce.cross_entropy_with_grad(xk, fresh(kind, target), reduction=reduction,
                                                  out=out)
            assert g2 is out
            _, g3 = gpuce.cross_entropy_with_grad(xk, fresh(kind, target), reduction=reduction,
                                                  inplace=True)
            assert tuple(g3.shape) == shape
    xk = fresh(kind, x)
    for fn in (gpuce.softmax, gpuce.log_softmax):
        assert_array_of(fn(xk), xk, dtype, shape, fn.__name__)
    assert_array_of(gpuce.logsumexp(xk), xk, LOSS_DTYPE[dtype], shape[:-1], "logsumexp")


@pytest.mark.parametrize("axis", [-1, 0])
def test_empty_reduction_axis(kind, axis):
    """A reduction axis of length 0: logsumexp is -inf (SciPy's and PyTorch's answer),
    softmax and log_softmax are empty arrays of the input's shape."""
    from scipy.special import logsumexp as scipy_lse
    shape = (4, 0) if axis == -1 else (0, 4)
    x = np.zeros(shape, dtype=np.float32)
    xk = fresh(kind, x)
    expect = scipy_lse(x.astype(np.float64), axis=axis)
    assert_loss_close(kind.back(gpuce.logsumexp(xk, axis=axis)), expect, "float32",
                      "logsumexp")
    for fn in (gpuce.softmax, gpuce.log_softmax):
        assert tuple(fn(xk, axis=axis).shape) == shape


VOCAB = 300_000


@pytest.mark.parametrize("dtype", DTYPES)
def test_vocabulary_300k(kind, dtype, rng):
    """A 300k vocabulary (3 rows), loss and gradient; fp32 loss within 1e-5."""
    if kind.device and kind.name.startswith("sim"):
        pytest.skip("too large for the simulator")
    x = make_logits(rng, (3, VOCAB), dtype, scale=4.0)
    t = make_hard_target(rng, (3,), VOCAB)
    t[0] = int(np.argmax(x[0].astype(np.float64)))
    run_all(kind, x, t, dtype, reductions=["none", "mean"], label_smoothing=0.1,
            z_loss=1e-4)
    if dtype in ("float32", "bfloat16"):
        run_all(kind, x, make_soft_target(rng, x.shape, dtype), dtype, reductions=["none"])
        check_softmax_family(kind, x, dtype)
