"""class_mask= on the CPU (numpy and torch inputs) and in gpuce.torch: results against the
float64 reference (which drops masked classes), masked classes exactly 0 (softmax, gradient)
or -inf (log_softmax), outputs poisoned first, and the errors. The CUDA kernels' masks are
tested under the simulator in tests/test_cuda_sim_reliability.py.
"""
import numpy as np
import pytest

import gpuce
from helpers import (DTYPES, assert_grad_close, assert_log_softmax_close, assert_loss_close,
                     ce_grad_row_scale, fresh, make_logits, make_soft_target, make_weight,
                     poison)
from kinds import cpu_kinds
from reference import live_classes, ref_cross_entropy, ref_log_softmax, ref_softmax

CPU_KINDS = cpu_kinds()
SHAPE = (3, 4, 70)   # C = 70: the per-row (C >= 64) loops; SHAPE_SHORT: the block-of-rows loops
SHAPE_SHORT = (5, 9)


def make_mask(rng, shape, per_row, keep=0.6):
    """A random class mask with at least two live classes in every row."""
    m = rng.random(shape if per_row else shape[-1:]) < keep
    m[..., :2] = True
    return np.ascontiguousarray(np.moveaxis(rng.permuted(np.moveaxis(m, -1, 0), axis=0), 0, -1))


def live_target(rng, mask, row_shape):
    """A class index per row that the mask lets take part."""
    live = np.broadcast_to(mask, row_shape + mask.shape[-1:])
    scores = np.where(live, rng.random(live.shape), -1.0)
    return scores.argmax(-1).astype(np.int64)


def _np(a):
    if hasattr(a, "detach"):
        from kinds import torch_to_numpy
        return torch_to_numpy(a)
    return np.asarray(a)


# ---- the reference itself: masking a class is dropping its column ---------------------------

@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_reference_mask_equals_dropping_the_columns(rng, soft):
    n, c = 6, 11
    x = rng.standard_normal((n, c)) * 3
    mask = make_mask(rng, (n, c), per_row=True)
    w = make_weight(rng, c, np.float64)
    kw = dict(weight=w, label_smoothing=0.3, z_loss=1e-2, reduction="none")
    if soft:
        t = make_soft_target(rng, (n, c), np.float64) * mask
        t /= t.sum(-1, keepdims=True)
    else:
        t = live_target(rng, mask, (n,))
    loss, grad = ref_cross_entropy(x, t, class_mask=mask, **kw)
    for i in range(n):
        cols = np.flatnonzero(mask[i])
        ti = t[i, cols][None] if soft else np.searchsorted(cols, t[i:i + 1])
        kw_i = dict(kw, weight=w[cols])
        li, gi = ref_cross_entropy(x[i:i + 1, cols], ti, **kw_i)
        np.testing.assert_allclose(loss[i], li[0], rtol=1e-13)
        np.testing.assert_allclose(grad[i, cols], gi[0], rtol=1e-12, atol=1e-15)
        assert np.all(grad[i, ~mask[i]] == 0)
        np.testing.assert_allclose(ref_softmax(x[i], class_mask=mask[i])[cols],
                                   ref_softmax(x[i, cols]), rtol=1e-13)


# ---- softmax / log_softmax ----------------------------------------------------------------

# (each dtype is a numba compile of the masked kernels: a few seconds of CI each, so the
# other dtypes' masked paths are covered by the cross-entropy cases below)
@pytest.mark.parametrize("shape", [SHAPE, SHAPE_SHORT], ids=["C70", "C9"])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", CPU_KINDS, ids=repr)
def test_softmax_with_mask(kind, dtype, log, per_row, shape, rng):
    x = make_logits(rng, shape, dtype)
    x[..., 0] = 1e4 if dtype != "float16" else 6e4  # masked below in some rows: must not count
    mask = make_mask(rng, shape, per_row)
    if per_row:
        mask[..., 0] = False
    out = fresh(kind, poison(shape, dtype, garbage=True, rng=rng))
    fn = gpuce.log_softmax if log else gpuce.softmax
    res = fn(fresh(kind, x), out=out, class_mask=fresh(kind, mask))
    assert res is out
    got = _np(res).astype(np.float64)
    dead = ~np.broadcast_to(mask, shape)
    if log:
        assert np.all(np.isneginf(got[dead]))
        assert_log_softmax_close(got, ref_log_softmax(x, class_mask=mask), dtype, x=x)
    else:
        assert np.all(got[dead] == 0)
        assert_grad_close(got, ref_softmax(x, class_mask=mask), dtype, "softmax")
    fresh_out = fn(fresh(kind, x), class_mask=fresh(kind, mask))  # allocating path: same bits
    assert np.array_equal(_np(fresh_out).view(np.uint8), _np(res).view(np.uint8))


def test_softmax_mask_on_another_axis(rng):
    x = make_logits(rng, (7, 3, 5), "float32")
    mask = make_mask(rng, (3, 5, 7), per_row=True)          # class axis last ...
    got = gpuce.softmax(x, axis=0, class_mask=np.moveaxis(mask, -1, 0))  # ... moved like x
    assert_grad_close(got, ref_softmax(x, axis=0, class_mask=np.moveaxis(mask, -1, 0)),
                      "float32", "softmax", axis=0)
    shared = gpuce.softmax(x, axis=0, class_mask=mask[0, 0])
    assert_grad_close(shared, ref_softmax(x, axis=0, class_mask=mask[0, 0]), "float32",
                      "softmax", axis=0)


# ---- cross entropy -------------------------------------------------------------------------

OPTIONS = {
    "plain": {},
    "smooth_weight": {"label_smoothing": 0.2, "weight": True},
    "softcap_zloss_smooth": {"softcap": 8.0, "z_loss": 1e-3, "label_smoothing": 0.1},
    "soft": {"soft": True, "label_smoothing": 0.1, "weight": True},
}


# every option and output path in float32; the other dtypes' load/store/-inf words once each
CE_CASES = [("float32", opt, path) for opt in OPTIONS for path in ("alloc", "out", "inplace")
            if path != "inplace" or opt in ("smooth_weight", "soft")]
CE_CASES += [("bfloat16", "plain", "alloc"), ("bfloat16", "soft", "out"),
             ("float64", "smooth_weight", "alloc"), ("float16", "plain", "alloc")]


@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
@pytest.mark.parametrize("dtype, option, path", CE_CASES)
def test_cross_entropy_with_mask(dtype, per_row, option, path, rng):
    shape = SHAPE if option != "plain" else SHAPE_SHORT
    x = make_logits(rng, shape, dtype)
    x[..., 1] = np.nan  # a masked NaN logit is never read into a sum
    mask = make_mask(rng, shape, per_row)
    mask[..., 1] = False
    kw = dict(OPTIONS[option])
    soft = kw.pop("soft", False)
    if kw.pop("weight", False):
        kw["weight"] = make_weight(rng, shape[-1])
    if soft:
        t = make_soft_target(rng, shape, "float32") * mask
        t = (t / t.sum(-1, keepdims=True)).astype(np.float32)
    else:
        t = live_target(rng, mask, shape[:-1])
        t.reshape(-1)[1] = -100   # an ignored row
        if per_row:
            mask.reshape(-1, shape[-1])[1] = False  # ... may have every class masked
    reduction = "none" if path == "alloc" else "mean"
    call = dict(kw, reduction=reduction, class_mask=mask)
    logits = x.copy()
    if path == "out":
        call["out"] = poison(shape, dtype, garbage=True, rng=rng)
    if path == "inplace":
        call["inplace"] = True
    loss, grad = gpuce.cross_entropy_with_grad(logits, t, **call)
    ref_loss, ref_grad = ref_cross_entropy(x, t, class_mask=mask, **dict(kw, reduction=reduction))
    assert_loss_close(loss, ref_loss, dtype)
    scale = ce_grad_row_scale(np.where(np.isnan(x), 0, x), t, reduction, **kw)
    assert_grad_close(grad, ref_grad, dtype, row_scale=scale)
    assert np.all(_np(grad)[~np.broadcast_to(mask, shape)] == 0)
    if path == "alloc":  # the loss alone: the same bits
        alone = gpuce.cross_entropy(x, t, **dict(kw, reduction=reduction, class_mask=mask))
        assert np.array_equal(np.asarray(alone), np.asarray(loss))


@pytest.mark.parametrize("kind", CPU_KINDS, ids=repr)
def test_cross_entropy_mask_kinds_agree(kind, rng):
    x = make_logits(rng, (4, 40), "bfloat16")
    mask = make_mask(rng, (4, 40), per_row=True)
    t = live_target(rng, mask, (4,))
    loss, grad = gpuce.cross_entropy_with_grad(fresh(kind, x), fresh(kind, t),
                                               class_mask=fresh(kind, mask), label_smoothing=0.1)
    ref_loss, ref_grad = ref_cross_entropy(x, t, class_mask=mask, label_smoothing=0.1)
    assert_loss_close(_np(loss), ref_loss, "bfloat16")
    assert_grad_close(_np(grad), ref_grad, "bfloat16",
                      row_scale=ce_grad_row_scale(x, t, label_smoothing=0.1))


def test_no_mask_and_all_true_mask_agree(rng):
    """An all-True mask is the unmasked computation (to rounding: other kernels)."""
    x = make_logits(rng, (6, 50), "float32")
    t = rng.integers(0, 50, 6)
    base = gpuce.cross_entropy_with_grad(x, t, label_smoothing=0.1, reduction="none")
    masked = gpuce.cross_entropy_with_grad(x, t, label_smoothing=0.1, reduction="none",
                                           class_mask=np.ones(50, bool))
    np.testing.assert_allclose(masked[0], base[0], rtol=1e-6)
    np.testing.assert_allclose(masked[1], base[1], rtol=1e-5, atol=1e-8)


# ---- errors --------------------------------------------------------------------------------

def _ce(**kw):
    x = np.zeros((2, 5), np.float32)
    return gpuce.cross_entropy(x, np.array([0, 1]), **kw)


@pytest.mark.parametrize("bad, exc, words", [
    (np.ones(5, np.uint8), TypeError, "class_mask: dtype uint8 is not bool"),
    (np.ones(4, bool), ValueError, "class_mask: expected shape (5,)"),
    (np.ones((2, 4), bool), ValueError, "class_mask: expected shape (5,)"),
    ([True] * 5, TypeError, "class_mask"),
])
def test_bad_mask_arguments(bad, exc, words):
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        _ce(class_mask=bad)
    with pytest.raises(exc, match="class_mask"):
        gpuce.softmax(np.zeros((2, 5), np.float32), class_mask=bad)


def test_masked_target_raises():
    mask = np.array([True, False, True, True, True])
    with pytest.raises(ValueError, match="class_mask: the target class 1 of row 1 is masked"):
        _ce(class_mask=mask)
    per_row = np.ones((2, 5), bool)
    per_row[0, 0] = False
    with pytest.raises(ValueError, match="class_mask: the target class 0 of row 0"):
        gpuce.cross_entropy_with_grad(np.zeros((2, 5), np.float32), np.array([0, 1]),
                                      class_mask=per_row)
    # an ignored row's target may be masked
    loss = gpuce.cross_entropy(np.zeros((2, 5), np.float32), np.array([1, -100]),
                               class_mask=np.array([False, True, False, False, False]),
                               reduction="none")
    np.testing.assert_array_equal(loss, [0.0, 0.0])


def test_rows_with_every_class_masked_raise():
    x = np.zeros((2, 5), np.float32)
    dead = np.ones((2, 5), bool)
    dead[1] = False
    with pytest.raises(ValueError, match="class_mask: row 1 has every class masked"):
        gpuce.softmax(x, class_mask=dead)
    with pytest.raises(ValueError, match="class_mask: it has every class masked"):
        gpuce.log_softmax(x, class_mask=np.zeros(5, bool))
    q = np.full((2, 5), 0.2, np.float32)
    with pytest.raises(ValueError, match="class_mask: row 1 has every class masked"):
        gpuce.cross_entropy(x, q, class_mask=dead)


def test_probability_on_a_masked_class_raises():
    q = np.array([[0.5, 0.5, 0, 0, 0], [0, 0, 0.25, 0.75, 0]], np.float32)
    mask = np.ones((2, 5), bool)
    gpuce.cross_entropy(np.zeros((2, 5), np.float32), q, class_mask=mask)  # fine
    mask[1, 3] = False
    with pytest.raises(ValueError, match="target: row 1 puts probability on a class that "
                                         "class_mask masks"):
        gpuce.cross_entropy(np.zeros((2, 5), np.float32), q, class_mask=mask)


# ---- gpuce.torch ---------------------------------------------------------------------------

torch = pytest.importorskip("torch")


def test_torch_autograd_module_and_compile(rng):
    import gpuce.torch as gt
    x = make_logits(rng, (2, 5, 30), "float32")
    mask = make_mask(rng, (2, 5, 30), per_row=True)
    t = live_target(rng, mask, (2, 5))
    ref_loss, ref_grad = ref_cross_entropy(x, t, class_mask=mask, label_smoothing=0.1)
    xt, tt, mt = (torch.from_numpy(a) for a in (x, t, mask))

    def step(fn, *args):
        a = xt.clone().requires_grad_()
        loss = fn(a, *args)
        loss.backward()
        return loss.detach().numpy(), a.grad.numpy()

    eager = step(lambda a, y, m: gt.cross_entropy(a, y, label_smoothing=0.1, class_mask=m),
                 tt, mt)
    assert_loss_close(eager[0], ref_loss, "float32")
    assert_grad_close(eager[1], ref_grad, "float32",
                      row_scale=ce_grad_row_scale(x, t, label_smoothing=0.1))
    assert np.all(eager[1][~mask] == 0)
    module = gt.CrossEntropyLoss(label_smoothing=0.1)
    assert np.array_equal(step(module, tt, mt)[1], eager[1])
    shared = gt.CrossEntropyLoss(label_smoothing=0.1, class_mask=mt[0, 0])
    t0 = live_target(rng, mask[0, 0], (2, 5))
    got = step(shared, torch.from_numpy(t0))
    want = ref_cross_entropy(x, t0, class_mask=mask[0, 0], label_smoothing=0.1)
    assert_loss_close(got[0], want[0], "float32")
    compiled = torch.compile(
        lambda a, y, m: gt.cross_entropy(a, y, label_smoothing=0.1, class_mask=m),
        fullgraph=True, backend="aot_eager")
    assert np.array_equal(step(compiled, tt, mt)[1], eager[1])
    with pytest.raises(ValueError, match="class_mask"):
        gt.cross_entropy(xt, tt, class_mask=mt[..., :-1])


def test_torch_ops_opcheck_with_mask(rng):
    x = torch.from_numpy(make_logits(rng, (6, 5), "float64"))
    mask = torch.tensor([True, True, False, True, True])
    y = torch.tensor([0, 1, 3, 4, 0, 1])
    basic = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.gpuce.cross_entropy_fwd.default,
                          (x.clone().requires_grad_(), y, None, -100, "mean", 0.1, 0.0, None,
                           mask), test_utils=basic)
    torch.library.opcheck(torch.ops.gpuce.cross_entropy.default,
                          (x, y, None, 2, "none", 0.1, 0.01, 3.0, mask), test_utils=basic)


def test_masks_reference_helper_broadcasts():
    m = np.array([True, False, True])
    assert live_classes(m, (2, 3)).shape == (2, 3)
    assert live_classes(m, (3, 4), axis=0)[:, 0].tolist() == [True, False, True]
