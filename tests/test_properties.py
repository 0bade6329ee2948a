"""Hypothesis properties: softmax rows sum to 1; shifting a row by a constant changes
nothing; gradient rows sum to 0 (hard and soft targets, without softcap and z_loss);
the loss is >= 0.

The examples are derandomized (the same on every run, so CI is stable) and few; set
GPUCE_HYPOTHESIS_EXAMPLES=500 to search harder.
"""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpuce
from helpers import (FP32_EPS, LOW_PRECISION, assert_grad_close, assert_log_softmax_close,
                     assert_loss_close, ce_grad_row_scale, check_cross_entropy, fresh, np_dtype,
                     ulp)
from reference import ref_cross_entropy, ref_log_softmax, ref_softmax

pytestmark = pytest.mark.usefixtures("poison_allocations")

_EXAMPLES = int(os.environ.get("GPUCE_HYPOTHESIS_EXAMPLES", "0"))
PROPERTY = settings(
    max_examples=_EXAMPLES or 25,
    derandomize=not _EXAMPLES,
    deadline=None,  # numba compiles on first use
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)

DTYPES = ["float16", "bfloat16", "float32", "float64"]
EPS = {"float16": FP32_EPS, "bfloat16": FP32_EPS, "float32": FP32_EPS,
       "float64": float(np.finfo(np.float64).eps)}


@st.composite
def logits_cases(draw, min_cls=1, masks=True):
    """(numpy logits in dtype, dtype, rng) with random shape, scale and optional -inf masks
    (never a whole row)."""
    dtype = draw(st.sampled_from(DTYPES))
    lead = draw(st.lists(st.integers(1, 5), min_size=1, max_size=2))
    n_cls = draw(st.integers(min_cls, 48))
    scale = draw(st.sampled_from([0.01, 0.5, 2.0, 5.0, 30.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    x = rng.standard_normal(tuple(lead) + (n_cls,)) * scale
    if masks and n_cls > 1 and draw(st.booleans()):
        mask = rng.random(x.shape) < draw(st.sampled_from([0.1, 0.5, 0.9]))
        mask[..., rng.integers(n_cls)] = False
        x[mask] = -np.inf
    return x.astype(np_dtype(dtype)), dtype, rng


@st.composite
def ce_cases(draw, soft=None, allow_softcap=True, allow_z=True):
    """(x, target, dtype, reference keywords)."""
    x, dtype, rng = draw(logits_cases(masks=False))
    n_cls = x.shape[-1]
    soft = draw(st.booleans()) if soft is None else soft
    kw = {}
    if soft:
        alpha = draw(st.sampled_from([0.05, 0.5, 3.0]))
        q = rng.dirichlet(np.full(n_cls, alpha), size=x.shape[:-1])
        if draw(st.booleans()):  # one-hot rows
            q = np.eye(n_cls)[rng.integers(0, n_cls, x.shape[:-1])]
        t = q.astype(np_dtype(dtype))
    else:
        t = rng.integers(0, n_cls, x.shape[:-1])
        if draw(st.booleans()):
            t[rng.random(t.shape) < 0.3] = -100
    if draw(st.booleans()):
        kw["weight"] = rng.uniform(0.0, 3.0, n_cls).astype(np.float32)
    kw["label_smoothing"] = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0]))
    if allow_z and draw(st.booleans()):
        kw["z_loss"] = draw(st.sampled_from([1e-4, 0.1]))
    if allow_softcap and draw(st.booleans()):
        kw["softcap"] = draw(st.sampled_from([1.0, 10.0, 50.0]))
    return x, t, dtype, kw


def _call_kw(kind, kw):
    return {k: fresh(kind, v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}


# ---- softmax rows sum to 1 ----------------------------------------------------------------

@PROPERTY
@given(case=logits_cases())
def test_softmax_rows_sum_to_one(kind, case):
    x, dtype, _ = case
    p = kind.back(gpuce.softmax(fresh(kind, x))).astype(np.float64)
    assert np.all(p >= 0) and np.all(p <= 1)
    n_cls = x.shape[-1]
    # each entry within one ulp of its storage dtype (plus fp32 rounding for half dtypes)
    tol = np.sum(ulp(p, dtype), axis=-1) + 4 * n_cls * EPS[dtype]
    err = np.abs(np.sum(p, axis=-1) - 1.0)
    assert np.all(err <= tol), f"row sums off by {err.max():.3g} (tol {tol.min():.3g})"
    assert np.all(p[np.isneginf(x.astype(np.float64))] == 0)


# ---- shift invariance ---------------------------------------------------------------------

@st.composite
def shifted_cases(draw):
    """Logits on a grid (multiples of 1/8, |x| <= 8) and a shift k on the same grid with
    |k| <= 16 (2**10 for float32/float64), so x and x + k are both exact in the dtype."""
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    shape = (draw(st.integers(1, 6)), draw(st.integers(1, 40)))
    x = np.round(rng.uniform(-8, 8, shape) * 8) / 8
    k_max = 16 if dtype in LOW_PRECISION else 2 ** 10
    k = draw(st.integers(-8 * k_max, 8 * k_max)) / 8
    xs, xks = x.astype(np_dtype(dtype)), (x + k).astype(np_dtype(dtype))
    assert np.array_equal(xs.astype(np.float64), x)
    assert np.array_equal(xks.astype(np.float64), x + k)
    return xs, xks, dtype, rng


@PROPERTY
@given(case=shifted_cases(), soft=st.booleans(), smoothing=st.sampled_from([0.0, 0.2]))
def test_shift_changes_nothing(kind, case, soft, smoothing):
    """gpuce(x + k) matches the reference at x (not x + k) for softmax, log_softmax and the
    cross entropy (loss and gradient); z_loss and softcap are not shift-invariant."""
    x, xk_, dtype, rng = case
    n_cls = x.shape[-1]
    t = (rng.dirichlet(np.ones(n_cls), x.shape[0]).astype(np_dtype(dtype)) if soft
         else rng.integers(0, n_cls, x.shape[0]))
    shifted = fresh(kind, xk_)
    assert_grad_close(kind.back(gpuce.softmax(shifted)), ref_softmax(x), dtype, "softmax")
    assert_log_softmax_close(kind.back(gpuce.log_softmax(shifted)), ref_log_softmax(x), dtype,
                             x=xk_)
    loss, grad = gpuce.cross_entropy_with_grad(shifted, fresh(kind, t), reduction="none",
                                               label_smoothing=smoothing)
    loss0, grad0 = gpuce.cross_entropy_with_grad(fresh(kind, x), fresh(kind, t),
                                                 reduction="none", label_smoothing=smoothing)
    for lo, g in ((loss, grad), (loss0, grad0)):
        # the loss of the shifted logits is computed from values up to |k| larger
        ref_loss, ref_grad = ref_cross_entropy(x, t, reduction="none",
                                               label_smoothing=smoothing)
        lo = kind.back(lo).astype(np.float64)
        slack = 4 * EPS[dtype] * (np.max(np.abs(xk_.astype(np.float64)), axis=-1) + 1)
        assert np.all(np.abs(lo - ref_loss) <= 1e-5 * np.maximum(np.abs(ref_loss), 1) + slack)
        assert_grad_close(kind.back(g), ref_grad, dtype,
                          row_scale=ce_grad_row_scale(x, t, "none",
                                                      label_smoothing=smoothing))


# ---- gradient rows sum to 0 ---------------------------------------------------------------

@PROPERTY
@given(case=ce_cases(allow_softcap=False, allow_z=False),
       reduction=st.sampled_from(["none", "mean", "sum"]))
def test_grad_rows_sum_to_zero(kind, case, reduction):
    """sum_c dL/dz_c = 0 for every row: d(lse)/dz sums to 1 and so does the target's mass
    (weights and smoothing scale both alike)."""
    x, t, dtype, kw = case
    _, grad = gpuce.cross_entropy_with_grad(fresh(kind, x), fresh(kind, t), reduction=reduction,
                                            **_call_kw(kind, kw))
    g = kind.back(grad).astype(np.float64)
    n_cls = x.shape[-1]
    scale = ce_grad_row_scale(x, t, reduction, **kw)[..., 0]
    tol = np.sum(ulp(g, dtype), axis=-1) + 4 * n_cls * EPS[dtype] * scale
    row_sum = np.abs(np.sum(g, axis=-1))
    assert np.all(row_sum <= tol), f"|row sum| up to {row_sum.max():.3g}"


# ---- the loss is >= 0 ---------------------------------------------------------------------

@PROPERTY
@given(case=ce_cases(), reduction=st.sampled_from(["none", "mean", "sum"]))
def test_loss_is_nonnegative(kind, case, reduction):
    """Non-negative weights, probabilities as targets, z_loss >= 0: every loss is >= 0,
    and it matches the reference."""
    x, t, dtype, kw = case
    loss, grad = gpuce.cross_entropy_with_grad(fresh(kind, x), fresh(kind, t),
                                               reduction=reduction, **_call_kw(kind, kw))
    lo = kind.back(loss).astype(np.float64)
    assert np.all(lo >= 0), f"negative loss {lo.min()!r}"
    check_cross_entropy(lo, kind.back(grad), x, t, dtype, reduction, **kw)
    assert_loss_close(kind.back(gpuce.cross_entropy(fresh(kind, x), fresh(kind, t),
                                                    reduction=reduction,
                                                    **_call_kw(kind, kw))), lo, dtype,
                      "loss of cross_entropy vs cross_entropy_with_grad")


# ---- counterexamples found by the search above, pinned ------------------------------------
# Losses whose true value is ~0 once came out slightly negative (to -4e-6 in fp32), formed
# as Q*lse - sum_c w_c q_c z_c or W*lse - sum_c w_c z_c.


def _one_class_smoothed(rng, dtype):
    """C=1 with a class weight and smoothing: the loss is exactly 0."""
    x = (rng.standard_normal((64, 1)) * 3).astype(np_dtype(dtype))
    return x, np.zeros(64, np.int64), {"weight": rng.uniform(0.25, 2, 1).astype(np.float32),
                                       "label_smoothing": 0.3}


def _soft_one_hot_confident(rng, dtype):
    """One-hot soft targets on a class 30-50 nats ahead, with class weights: loss ~1e-17."""
    x = rng.standard_normal((64, 8)) * 3
    x[:, 0] = 40 + rng.standard_normal(64) * 5
    q = np.zeros((64, 8), np_dtype(dtype))
    q[:, 0] = 1
    return x.astype(np_dtype(dtype)), q, {"weight": rng.uniform(0.25, 2, 8).astype(np.float32)}


@pytest.mark.parametrize("make", [_one_class_smoothed, _soft_one_hot_confident],
                         ids=["one_class_smoothed", "soft_one_hot_confident"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_is_nonnegative_pinned(kind, dtype, make, rng):
    x, t, kw = make(rng, dtype)
    loss = gpuce.cross_entropy(fresh(kind, x), fresh(kind, t), reduction="none",
                               **_call_kw(kind, kw))
    lo = kind.back(loss).astype(np.float64)
    check_cross_entropy(lo, None, x, t, dtype, "none", **kw)
    assert np.all(lo >= 0), f"{np.sum(lo < 0)} negative losses, down to {lo.min()!r}"
