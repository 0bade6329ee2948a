"""Reliability of the CUDA kernels under Numba's simulator (NUMBA_ENABLE_CUDASIM=1):
softcap at fp32 accuracy, bitwise determinism across runs, and batch invariance (a row's
loss and gradient do not depend on the other rows) for each strategy forced.

    NUMBA_ENABLE_CUDASIM=1 python -m pytest -q -p no:cacheprovider tests/test_cuda_sim_reliability.py

Shapes are tiny: the simulator runs each CUDA thread as a Python thread.
"""

import numpy as np
import pytest

from helpers import rng_for
from kinds import SIMULATOR, available_kinds
from reference import ref_cross_entropy, ref_log_softmax, ref_softmax

pytestmark = pytest.mark.skipif(not SIMULATOR, reason="simulator tests: set NUMBA_ENABLE_CUDASIM=1")

if SIMULATOR:
    import gpuce
    from gpuce import _cuda

    KIND = available_kinds()[0]

# strategy forced -> a row length it holds (the split count is fixed by C in the simulator)
STRATEGY_C = {"warp": 77, "block_cached": 150, "block": 203, "split": 257}


def _ce(x, t, strategy, **kw):
    kw = {k: KIND.to(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    with _cuda.force_strategy(strategy):
        loss, grad = gpuce.cross_entropy_with_grad(KIND.to(x), KIND.to(t), **kw)
    return KIND.back(loss), KIND.back(grad)


# ---- softcap at fp32 accuracy --------------------------------------------------------------

SOFTCAP_OPTIONS = {
    "alone": {},
    "smoothing_weights_zloss": {"label_smoothing": 0.2, "weight": True, "z_loss": 1e-4},
}


@pytest.mark.parametrize("option", SOFTCAP_OPTIONS)
@pytest.mark.parametrize("strategy", STRATEGY_C)
def test_softcap_fp32_accuracy(strategy, option):
    c = STRATEGY_C[strategy]
    rng = rng_for("softcap", strategy, option)
    x = (rng.standard_normal((3, c)) * 10).astype(np.float32)
    t = rng.integers(0, c, 3)
    kw = dict(SOFTCAP_OPTIONS[option])
    if kw.pop("weight", False):
        kw["weight"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    loss, grad = _ce(x, t, strategy, softcap=20.0, reduction="none", **kw)
    ref_loss, ref_grad = ref_cross_entropy(x, t, softcap=20.0, reduction="none", **kw)
    rel = np.abs(loss.astype(np.float64) - ref_loss) / np.abs(ref_loss)
    assert rel.max() <= 1e-6, rel.max()
    scale = np.abs(ref_grad).max(axis=1, keepdims=True)
    assert (np.abs(grad - ref_grad) / scale).max() <= 2e-5


# ---- determinism and batch invariance -----------------------------------------------------

def _case(rng, n, c, soft):
    x = (rng.standard_normal((n, c)) * 4).astype(np.float32)
    x[1, rng.integers(0, c, c // 3)] = -np.inf  # a masked row
    if soft:
        t = rng.dirichlet(np.ones(c), size=n).astype(np.float32)
    else:
        t = rng.integers(0, c, n)
        t[2] = -100
    w = rng.uniform(0.5, 2.0, c).astype(np.float32)
    return x, t, dict(weight=w, label_smoothing=0.1, z_loss=1e-3, softcap=15.0, reduction="none")


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("strategy", STRATEGY_C)
def test_bitwise_across_runs_and_batches(strategy, soft):
    """Same call twice: the same bits. A row's loss and gradient are bitwise the same in a
    batch of 5, of 3 (rows removed) and permuted (a fixed strategy; see the README for
    where the automatic choice or the split count depends on N)."""
    c = STRATEGY_C[strategy]
    rng = rng_for("bits", strategy, soft)
    x, t, kw = _case(rng, 5, c, soft)
    loss, grad = _ce(x, t, strategy, **kw)
    loss2, grad2 = _ce(x, t, strategy, **kw)
    assert loss.tobytes() == loss2.tobytes() and grad.tobytes() == grad2.tobytes()
    for rows in ([3, 1, 2], [4, 0, 2, 1, 3]):
        sub_loss, sub_grad = _ce(x[rows], t[rows], strategy, **kw)
        assert sub_loss.tobytes() == loss[rows].tobytes(), rows
        assert sub_grad.tobytes() == grad[rows].tobytes(), rows


@pytest.mark.parametrize("strategy", STRATEGY_C)
def test_softmax_bitwise_across_batches(strategy):
    c = STRATEGY_C[strategy]
    rng = rng_for("softmax", strategy)
    x = (rng.standard_normal((4, c)) * 4).astype(np.float32)
    with _cuda.force_strategy(strategy):
        full = KIND.back(gpuce.softmax(KIND.to(x)))
        again = KIND.back(gpuce.softmax(KIND.to(x)))
        part = KIND.back(gpuce.softmax(KIND.to(x[[2, 0]])))
    assert full.tobytes() == again.tobytes()
    assert part.tobytes() == full[[2, 0]].tobytes()
    np.testing.assert_allclose(full, ref_softmax(x), rtol=2e-5, atol=1e-7)


# ---- class masks ----------------------------------------------------------------------------

def _mask(rng, shape, keep=0.6):
    m = rng.random(shape) < keep
    m[..., 0] = True
    return m


@pytest.mark.parametrize("strategy", STRATEGY_C)
def test_class_mask(strategy):
    """Each strategy's masked kernels against the reference (which drops masked classes):
    a per-row mask with hard targets (smoothing over the live classes, softcap, weights,
    z-loss; an ignored row with every class masked; a row whose target is masked gives a NaN
    loss and a zero gradient, as a bad target does), a shared (C,) mask with soft targets (a
    row with probability on a masked class: the same), and log_softmax (-inf where masked)."""
    c = STRATEGY_C[strategy]
    rng = rng_for("mask", strategy)
    x = (rng.standard_normal((3, c)) * 4).astype(np.float32)
    mask = _mask(rng, (3, c))
    x[~mask] = np.nan  # masked logits are never read into a sum
    t = np.array([int(rng.choice(np.flatnonzero(mask[i]))) for i in range(3)])
    t[1] = -100
    mask[1] = False
    t[2] = int(np.flatnonzero(~mask[2])[0])  # a masked target
    w = rng.uniform(0.5, 2.0, c).astype(np.float32)
    kw = dict(weight=w, label_smoothing=0.2, softcap=15.0, z_loss=1e-3, reduction="none")
    loss, grad = _ce(x, t, strategy, class_mask=mask, **kw)
    good = np.array([0, 1])
    ref_loss, ref_grad = ref_cross_entropy(x[good], t[good], class_mask=mask[good], **kw)
    np.testing.assert_allclose(loss[good], ref_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad[good], ref_grad, rtol=1e-4, atol=2e-6)
    assert np.isnan(loss[2]) and np.all(grad[2] == 0)
    assert np.all(grad[~mask] == 0)

    shared = _mask(rng, c)
    q = rng.dirichlet(np.ones(c), size=2).astype(np.float32) * shared
    q /= q.sum(-1, keepdims=True)
    q[1, np.flatnonzero(~shared)[0]] = 0.25  # probability on a masked class
    x2 = (rng.standard_normal((2, c)) * 4).astype(np.float32)
    x2[:, ~shared] = np.inf
    kw = dict(label_smoothing=0.1, reduction="none")
    loss, grad = _ce(x2, q, strategy, class_mask=shared, **kw)
    ref_loss, ref_grad = ref_cross_entropy(x2[:1], q[:1], class_mask=shared, **kw)
    np.testing.assert_allclose(loss[:1], ref_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad[:1], ref_grad, rtol=1e-4, atol=2e-6)
    assert np.isnan(loss[1]) and np.all(grad[1] == 0) and np.all(grad[:, ~shared] == 0)

    keep = _mask(rng, (2, c))
    keep[1] = False  # every class masked: -inf everywhere (the CPU raises)
    x2 = np.where(keep, rng.standard_normal((2, c)) * 4, np.nan).astype(np.float32)
    with _cuda.force_strategy(strategy):
        lsm = KIND.back(gpuce.log_softmax(KIND.to(x2), class_mask=KIND.to(keep)))
    ref = ref_log_softmax(x2[:1], class_mask=keep[:1])
    assert np.all(np.isneginf(lsm[~keep]))
    np.testing.assert_allclose(lsm[:1][keep[:1]], ref[keep[:1]], rtol=1e-5, atol=1e-5)


def test_class_mask_validate_and_device():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 20)).astype(np.float32)
    mask = np.ones(20, bool)
    mask[5] = False
    t = np.array([0, 5, 7])
    with pytest.raises(ValueError, match="class_mask: the target class 5 of row 1 is masked"):
        _ce(x, t, "warp", class_mask=mask, validate=True)
    with pytest.raises(TypeError, match="class_mask"):  # a host mask with device logits
        gpuce.cross_entropy(KIND.to(x), KIND.to(t), class_mask=mask)
    with pytest.raises(TypeError, match="class_mask"):
        gpuce.softmax(KIND.to(x), class_mask=mask)
    with pytest.raises(TypeError, match="class_mask: dtype uint8"):
        gpuce.softmax(KIND.to(x), class_mask=KIND.to(mask.astype(np.uint8)))
    with _cuda.force_strategy("warp"):  # ignore_index rows' targets may be masked
        loss = gpuce.cross_entropy(KIND.to(x), KIND.to(np.array([0, -100, 7])),
                                   class_mask=KIND.to(mask), validate=True, reduction="sum")
    ref = ref_cross_entropy(x, np.array([0, -100, 7]), class_mask=mask, reduction="sum")[0]
    np.testing.assert_allclose(KIND.back(loss), ref, rtol=1e-5)
