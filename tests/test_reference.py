"""The float64 reference (tests/reference.py) against PyTorch in float64.

Where PyTorch has the same definition (hard and soft targets, weight, label smoothing,
ignore_index, every reduction, grad_output) the two must agree to float64 accuracy.
z_loss and softcap are not PyTorch options; they are checked against a PyTorch composition
of the contract's words (z * lse**2 per kept row, s * tanh(x / s) first), differentiated by
autograd. The reference's documented deviations from PyTorch are checked to hold.
"""
import numpy as np
import pytest

from helpers import (assert_grad_close, assert_loss_close, check_cross_entropy, make_hard_target,
                     make_logits, make_soft_target, make_weight)
from reference import (ref_cross_entropy, ref_log_softmax, ref_logsumexp, ref_softmax)

torch = pytest.importorskip("torch")
F = torch.nn.functional

REDUCTIONS = ["none", "mean", "sum"]
IGNORE = -100


def torch_cross_entropy(x, target, weight=None, ignore_index=IGNORE, reduction="mean",
                        label_smoothing=0.0, z_loss=0.0, softcap=None, grad_output=None):
    """(loss, grad) from PyTorch autograd, float64, class axis last like gpuce."""
    xt = torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=True)
    z = xt if softcap is None else softcap * torch.tanh(xt / softcap)
    soft = np.issubdtype(np.asarray(target).dtype, np.floating)
    tt = torch.tensor(np.asarray(target, dtype=np.float64 if soft else np.int64))
    zc = z if z.ndim <= 2 else z.movedim(-1, 1)           # PyTorch: class axis 1
    tc = tt if (not soft or tt.ndim <= 2) else tt.movedim(-1, 1)
    w = None if weight is None else torch.tensor(np.asarray(weight, dtype=np.float64))
    kw = dict(weight=w, label_smoothing=label_smoothing)
    if not soft:
        kw["ignore_index"] = ignore_index
    ce = F.cross_entropy(zc, tc, reduction=reduction, **kw)
    if z_loss:
        lse = torch.logsumexp(z, dim=-1)
        kept = torch.ones_like(lse, dtype=torch.bool) if soft else tt != ignore_index
        zpart = torch.where(kept, z_loss * lse ** 2, torch.zeros_like(lse))
        if reduction == "none":
            loss = ce + zpart
        elif reduction == "sum":
            loss = ce + zpart.sum()
        else:
            loss = ce + zpart.sum() / kept.sum()
    else:
        loss = ce
    go = torch.ones_like(loss) if grad_output is None else \
        torch.tensor(np.asarray(grad_output, dtype=np.float64)).expand_as(loss)
    loss.backward(go)
    return loss.detach().numpy(), xt.grad.numpy()


# name -> (soft?, reference keywords builder)
OPTIONS = {
    "plain": (False, {}),
    "weight": (False, {"weight": True}),
    "ignore": (False, {"ignore": True}),
    "smoothing": (False, {"label_smoothing": 0.2}),
    "weight_smoothing_ignore": (False, {"weight": True, "ignore": True,
                                        "label_smoothing": 0.1}),
    "full_smoothing": (False, {"label_smoothing": 1.0, "weight": True}),
    "soft": (True, {}),
    "soft_weight_smoothing": (True, {"weight": True, "label_smoothing": 0.3}),
    "z_loss": (False, {"z_loss": 0.05, "ignore": True}),
    "softcap": (False, {"softcap": 3.0, "weight": True}),
    "soft_z_softcap": (True, {"z_loss": 0.02, "softcap": 4.0}),
    "all": (False, {"weight": True, "ignore": True, "label_smoothing": 0.1, "z_loss": 0.01,
                    "softcap": 5.0}),
}


def _case(rng, option, shape):
    soft, opts = OPTIONS[option]
    x = make_logits(rng, shape, "float64", scale=4.0)
    if soft:
        t = make_soft_target(rng, shape, "float64")
    else:
        t = make_hard_target(rng, shape[:-1], shape[-1], ignore_index=IGNORE,
                             ignore_frac=0.3 if opts.get("ignore") else 0.0)
    kw = {k: v for k, v in opts.items() if k not in ("weight", "ignore")}
    if opts.get("weight"):
        kw["weight"] = make_weight(rng, shape[-1], np.float64)
    return x, t, kw


@pytest.mark.parametrize("shape", [(12, 17), (3, 4, 17), (17,), (2, 1, 3, 5)], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_reference_matches_torch(option, reduction, shape, rng):
    x, t, kw = _case(rng, option, shape)
    go = rng.uniform(-2, 2, size=shape[:-1]) if reduction == "none" else rng.uniform(0.5, 2)
    got_loss, got_grad = torch_cross_entropy(x, t, reduction=reduction, grad_output=go, **kw)
    # the reference is the "ref" side; PyTorch's float64 result must be within float64 tolerance
    check_cross_entropy(got_loss, got_grad, x, t, "float64", reduction, grad_output=go, **kw)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_default_grad_output_is_one(reduction, rng):
    x, t, _ = _case(rng, "weight_smoothing_ignore", (9, 7))
    a = ref_cross_entropy(x, t, reduction=reduction)[1]
    b = ref_cross_entropy(x, t, reduction=reduction,
                          grad_output=np.ones(9) if reduction == "none" else 1.0)[1]
    assert np.array_equal(a, b)
    assert np.any(a != 0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_masked_logits_match_torch(reduction, rng):
    """-inf logits (a mask) that are not the target: PyTorch and the reference agree."""
    x = make_logits(rng, (10, 13), "float64")
    t = make_hard_target(rng, (10,), 13)
    mask = rng.random((10, 13)) < 0.4
    mask[np.arange(10), t] = False
    x[mask] = -np.inf
    for eps in (0.0, 0.1):  # with smoothing a masked class makes the loss +inf in both
        got_loss, got_grad = torch_cross_entropy(x, t, reduction=reduction,
                                                 label_smoothing=eps)
        check_cross_entropy(got_loss, got_grad, x, t, "float64", reduction,
                            label_smoothing=eps)
        if eps:
            assert np.all(np.isposinf(got_loss))


def test_reference_masked_target_matches_torch(rng):
    """The target class itself masked: loss +inf in both, same finite gradient."""
    x = make_logits(rng, (6, 8), "float64")
    t = make_hard_target(rng, (6,), 8)
    x[2, t[2]] = -np.inf
    got_loss, got_grad = torch_cross_entropy(x, t, reduction="none")
    check_cross_entropy(got_loss, got_grad, x, t, "float64", "none")
    assert np.isposinf(got_loss[2])


@pytest.mark.parametrize("axis", [-1, 0, 1, 2])
def test_reference_softmax_family_matches_torch(axis, rng):
    x = make_logits(rng, (4, 7, 9), "float64", scale=5.0)
    x[rng.random(x.shape) < 0.1] = -np.inf  # partial masks
    xt = torch.tensor(x)
    assert_grad_close(torch.softmax(xt, axis).numpy(), ref_softmax(x, axis), "float64",
                      axis=axis)
    assert_loss_close(torch.log_softmax(xt, axis).numpy(), ref_log_softmax(x, axis),
                      "float64", "log_softmax")
    assert_loss_close(torch.logsumexp(xt, axis).numpy(), ref_logsumexp(x, axis), "float64",
                      "logsumexp")


def test_reference_accepts_torch_inputs(rng):
    x = make_logits(rng, (5, 6), "float32")
    t = make_hard_target(rng, (5,), 6)
    a = ref_cross_entropy(x, t, label_smoothing=0.1)
    b = ref_cross_entropy(torch.from_numpy(x), torch.from_numpy(t), label_smoothing=0.1)
    assert a[0] == b[0] and np.array_equal(a[1], b[1])


# ---- the documented deviations from PyTorch ------------------------------------------------

@pytest.mark.parametrize("weighted", [False, True])
def test_deviation_all_ignored_mean_is_zero(weighted, rng):
    """All rows ignored: the reference gives 0 and a zero gradient, PyTorch NaN."""
    x = make_logits(rng, (5, 7), "float64")
    t = np.full(5, IGNORE)
    w = make_weight(rng, 7, np.float64) if weighted else None
    loss, grad = ref_cross_entropy(x, t, weight=w, reduction="mean", z_loss=0.1,
                                   label_smoothing=0.1)
    assert loss == 0.0 and np.all(grad == 0)
    torch_loss, _ = torch_cross_entropy(x, t, weight=w, reduction="mean", label_smoothing=0.1)
    assert np.isnan(torch_loss)


@pytest.mark.parametrize("z_loss", [0.0, 0.1])
def test_deviation_all_masked_row(rng, z_loss):
    """A row of -inf logits: loss +inf, softmax 0 and a zero gradient (PyTorch: NaN)."""
    x = make_logits(rng, (4, 6), "float64")
    x[1] = -np.inf
    t = make_hard_target(rng, (4,), 6)
    loss, grad = ref_cross_entropy(x, t, reduction="none", z_loss=z_loss)
    assert np.isposinf(loss[1]) and np.all(np.isfinite(np.delete(loss, 1)))
    assert np.all(grad[1] == 0) and np.all(np.isfinite(grad))
    assert np.all(ref_softmax(x)[1] == 0)
    assert np.isneginf(ref_logsumexp(x)[1])
    torch_loss, torch_grad = torch_cross_entropy(x, t, reduction="none", z_loss=z_loss)
    assert np.isnan(torch_loss[1]) and np.all(np.isnan(torch_grad[1]))
    assert np.all(np.isnan(torch.softmax(torch.tensor(x), -1).numpy()[1]))
    # the other rows are unaffected and agree with PyTorch
    keep = [0, 2, 3]
    check_cross_entropy(torch_loss[keep], torch_grad[keep], x[keep], t[keep], "float64",
                        "none", z_loss=z_loss)


@pytest.mark.parametrize("z_loss", [0.0, 0.1])
def test_deviation_all_masked_row_soft_target(rng, z_loss):
    x = make_logits(rng, (3, 5), "float64")
    x[0] = -np.inf
    q = make_soft_target(rng, (3, 5), "float64")
    loss, grad = ref_cross_entropy(x, q, reduction="none", z_loss=z_loss)
    assert np.isposinf(loss[0]) and np.all(grad[0] == 0)
    assert np.all(np.isfinite(loss[1:])) and np.all(np.isfinite(grad))


def test_reference_class_axis_is_last(rng):
    """(..., C): the same rows give the same losses whatever the leading shape."""
    x = make_logits(rng, (2, 3, 11), "float64")
    t = make_hard_target(rng, (2, 3), 11)
    a, ga = ref_cross_entropy(x, t, reduction="none")
    b, gb = ref_cross_entropy(x.reshape(6, 11), t.reshape(6), reduction="none")
    assert np.array_equal(a.reshape(6), b) and np.array_equal(ga.reshape(6, 11), gb)
