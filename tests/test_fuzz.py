"""Fuzzing against the float64 reference (tests/reference.py) with Hypothesis: shapes
(empty and 1-class rows included), strides, dtypes, every option of cross_entropy(_with_grad)
and of softmax/log_softmax/logsumexp, extreme values (+-1e4 spreads, -inf masks up to whole
rows, denormals, one finite logit per row) and out-of-range targets, which must raise.

Examples are derandomized (a fixed seed), so CI sees the same ones every run.

    python -m pytest -q tests/test_fuzz.py                               # CI: ~500 examples
    GPUCE_FUZZ_EXAMPLES=10000 python -m pytest -q tests/test_fuzz.py \\
        --hypothesis-show-statistics                                     # the full run
    NUMBA_ENABLE_CUDASIM=1 python -m pytest -q -p no:cacheprovider tests/test_fuzz.py
                                              # the CUDA kernels: tiny shapes, 60 examples

GPUCE_FUZZ_EXAMPLES is the total over the tests below (CPU: 70% cross entropy, 20% softmax
family, 10% bad targets; GPUCE_FUZZ_SIM_EXAMPLES under the simulator).
GPUCE_FUZZ_PARALLEL=1 sends half the examples through the CPU's parallel build (slow: it
compiles per process); GPUCE_FUZZ_SEED=N draws another fixed stream of examples.
Results of the full runs: benchmarks/results/fuzz.md.
"""
import os
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, seed, settings
from hypothesis import strategies as st

import gpuce
from gpuce import _cpu as gpuce_cpu
from helpers import (assert_grad_close, assert_log_softmax_close, assert_loss_close,
                     check_cross_entropy, np_dtype, poison)
from kinds import BF16, SIMULATOR, available_kinds
from reference import ref_log_softmax, ref_logsumexp, ref_softmax

KINDS = available_kinds()
if SIMULATOR:
    TOTAL = int(os.environ.get("GPUCE_FUZZ_SIM_EXAMPLES", "60"))
    MAX_CLS, MAX_LEAD = 40, 3
else:
    TOTAL = int(os.environ.get("GPUCE_FUZZ_EXAMPLES", "500"))
    MAX_CLS, MAX_LEAD = 80, 6   # C crosses the CPU's SMALL_C = 64 (block-at-once exp)


# The CPU runs calls under gpuce._cpu.SERIAL_BELOW elements (all of these) on its serial
# build; with PARALLEL, half the examples go through the parallel build instead. Its kernels
# are compiled in each process (about 10 s a variant, and the short-row kernel has one per
# C), which takes most of an hour on a loaded 2-core machine: opt-in.
PARALLEL = not SIMULATOR and os.environ.get("GPUCE_FUZZ_PARALLEL") == "1"
BUILDS = st.booleans() if PARALLEL else st.just(False)  # just() draws nothing: same examples


@contextmanager
def cpu_build(parallel):
    """Calls inside take the CPU's parallel build (parallel=True) whatever their size."""
    if not parallel:
        yield
        return
    saved, gpuce_cpu.SERIAL_BELOW = gpuce_cpu.SERIAL_BELOW, 0
    try:
        yield
    finally:
        gpuce_cpu.SERIAL_BELOW = saved


SEED = os.environ.get("GPUCE_FUZZ_SEED")  # another fixed stream of examples, for more runs


def _settings(share):
    """Settings (share of TOTAL examples) and the seed: derandomized unless SEED is set."""
    chosen = settings(max_examples=max(1, int(TOTAL * share)), derandomize=SEED is None,
                      deadline=None, database=None, print_blob=True,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                             HealthCheck.filter_too_much])

    def apply(test):
        return chosen(test) if SEED is None else chosen(seed(int(SEED))(test))
    return apply


DTYPES = ["float16", "bfloat16", "float32", "float64"]
TINY = {"float16": 6e-8, "bfloat16": 1e-39, "float32": 1e-40, "float64": 1e-310}  # denormals
VALUES = ["normal", "wide", "spread_1e4", "masked", "denormal", "one_finite", "constant"]


@st.composite
def logits(draw, dtype=None, lead_dims=None):
    """(logits in their dtype, possibly a strided view, dtype name, rng)."""
    dtype = dtype or draw(st.sampled_from(DTYPES))
    n_lead = draw(st.integers(0, 2)) if lead_dims is None else lead_dims
    lead = tuple(draw(st.lists(st.integers(0 if n_lead else 1, MAX_LEAD), min_size=n_lead,
                               max_size=n_lead)))
    n_cls = draw(st.integers(1, MAX_CLS))
    shape = lead + (n_cls,)
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    mode = draw(st.sampled_from(VALUES))
    x = rng.standard_normal(shape)
    if mode == "normal":
        x *= draw(st.sampled_from([1e-3, 1.0, 4.0]))
    elif mode == "wide":
        x *= draw(st.sampled_from([30.0, 300.0]))
    elif mode == "spread_1e4":
        x = rng.uniform(-1e4, 1e4, shape)
    elif mode == "masked":
        x *= 3
        mask = rng.random(shape) < draw(st.sampled_from([0.3, 0.9, 1.0]))
        x[mask] = -np.inf
    elif mode == "denormal":
        x = rng.integers(-3, 4, shape) * TINY[dtype]
    elif mode == "one_finite":
        keep = rng.integers(0, n_cls, lead) if lead else rng.integers(0, n_cls)
        finite = x * 5
        x = np.full(shape, -np.inf)
        np.put_along_axis(x, np.expand_dims(np.asarray(keep), -1), 
                          np.take_along_axis(finite, np.expand_dims(np.asarray(keep), -1), -1), -1)
    else:  # constant rows (ties everywhere)
        x = np.full(shape, draw(st.sampled_from([0.0, 7.0, -1e4])))
    x = x.astype(np_dtype(dtype))
    layout = draw(st.sampled_from(["c", "c", "step", "transposed"])) if not SIMULATOR else "c"
    if layout == "step":  # every other element of a larger buffer
        big = np.zeros(shape[:-1] + (2 * n_cls,), dtype=x.dtype)
        big[..., ::2] = x
        x = big[..., ::2]
    elif layout == "transposed" and x.ndim >= 2:  # class axis not the fastest in memory
        x = np.ascontiguousarray(np.swapaxes(x, -1, -2)).swapaxes(-1, -2)
    return x, dtype, rng


def _to(kind, a):
    """Hand ``a`` to the array kind keeping its strides where the kind can (numpy, torch).
    A strided view is handed over as itself (sharing memory: callers keep a copy)."""
    if kind.name == "numpy":
        return a.copy() if a.flags.c_contiguous else a
    if kind.name == "torch" and not a.flags.c_contiguous and a.size:
        import torch
        if a.dtype == BF16:  # numpy has no bf16 torch knows: its raw words, viewed back
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)
    r = kind.to(np.array(a, order="C", copy=True))  # torch.from_numpy would share memory
    return r if tuple(r.shape) == a.shape else r.reshape(a.shape)


def _hard_target(draw, rng, x, ignore_index):
    rows, n_cls = x.shape[:-1], x.shape[-1]
    t = rng.integers(0, n_cls, rows)
    if t.size and draw(st.booleans()):
        t[rng.random(rows) < draw(st.sampled_from([0.3, 1.0]))] = ignore_index
    return t.astype(draw(st.sampled_from([np.int64, np.int32, np.int16, np.uint8]))
                    if n_cls < 128 and ignore_index >= 0 else np.int64)


@st.composite
def ce_cases(draw):
    x, dtype, rng = draw(logits())
    n_cls = x.shape[-1]
    soft = draw(st.booleans())
    kw = {"reduction": draw(st.sampled_from(["mean", "sum", "none"]))}
    if draw(st.booleans()):
        kw["label_smoothing"] = draw(st.sampled_from([0.05, 0.5, 1.0]))
    if draw(st.booleans()):
        kw["z_loss"] = draw(st.sampled_from([1e-4, 0.1]))
    if draw(st.booleans()):
        kw["softcap"] = draw(st.sampled_from([0.5, 5.0, 30.0]))
    if draw(st.booleans()):
        kw["weight"] = rng.uniform(0.0, 2.0, n_cls).astype(
            draw(st.sampled_from([np.float32, np.float64])))
        if draw(st.booleans()):
            kw["weight"][rng.random(n_cls) < 0.3] = 0.0
    if soft:
        q = rng.dirichlet(np.full(n_cls, draw(st.sampled_from([0.05, 1.0]))),
                          size=x.shape[:-1])
        t = q.astype(np_dtype(draw(st.sampled_from(DTYPES))))
    else:
        ii = draw(st.sampled_from([-100, -1, 0, n_cls - 1]))
        kw["ignore_index"] = ii
        t = _hard_target(draw, rng, x, ii)
    if n_cls and draw(st.booleans()):
        kw["class_mask"], t = _class_mask(rng, x.shape, t, kw.get("ignore_index"),
                                          per_row=draw(st.booleans()))
    if draw(st.booleans()):  # the CPU checks targets whatever validate says
        kw["validate"] = draw(st.sampled_from([True, False]))
    with_grad = draw(st.booleans())
    where = draw(st.sampled_from(["new", "new", "out", "inplace"])) if with_grad else "new"
    if with_grad and draw(st.booleans()):
        rows = x.shape[:-1]
        kw["grad_output"] = (rng.uniform(-2, 2, rows).astype(np.float32)
                             if kw["reduction"] == "none" else float(rng.uniform(-2, 2)))
    return x, dtype, t, kw, with_grad, where


def _class_mask(rng, shape, t, ignore_index, per_row):
    """A valid class mask, (C,) or per row, and the target it fits: every row keeps a class,
    a hard target's class is kept, a soft target's masked classes get probability 0 (the row
    renormalised, or one-hot on a kept class if nothing was left)."""
    n_cls = shape[-1]
    mask = rng.random(shape if per_row else (n_cls,)) < 0.6
    rows = mask.reshape(-1, n_cls) if per_row else mask[None]
    rows[~rows.any(axis=1), 0] = True
    if ignore_index is None:  # probabilities
        q = np.where(np.broadcast_to(mask, shape), t.astype(np.float64), 0.0).reshape(-1, n_cls)
        live = np.broadcast_to(rows, q.shape)
        empty = q.sum(axis=1) == 0
        q[empty] = 0.0
        q[empty, np.argmax(live[empty], axis=1)] = 1.0
        return mask, (q / q.sum(axis=1, keepdims=True)).reshape(shape).astype(t.dtype)
    flat = t.reshape(-1).astype(np.int64)
    kept = flat != ignore_index
    rows[np.flatnonzero(kept) if per_row else 0, flat[kept]] = True
    return mask, t


# Found by this fuzz run (CPU kernels): a zero factor on a -inf target logit, (1-eps) w[y]
# with w[y] = 0 or eps = 1, gave 0 * inf = NaN instead of contributing 0.
_MASKED_ROWS = np.array([[-np.inf, -np.inf, -np.inf, 0.5244, -np.inf],
                         [0.1, 0.2, -np.inf, 0.3, 0.4]])
_ZERO_WEIGHTS = np.array([0.0, 1.46, 0.0, 1.87, 0.0], dtype=np.float32)
@pytest.mark.parametrize("kind", KINDS, ids=repr)
@_settings(0.7 / len(KINDS))
@given(case=ce_cases(), parallel=BUILDS)
@example(case=(_MASKED_ROWS.astype(np.float16), "float16", np.array([4, 2]),
               {"reduction": "mean", "weight": _ZERO_WEIGHTS, "ignore_index": -100}, False, "new"), parallel=False)
@example(case=(np.tile(_MASKED_ROWS.astype(np.float32), 20), "float32", np.array([4, 2]),
               {"reduction": "none", "weight": np.resize(_ZERO_WEIGHTS, 100),
                "label_smoothing": 0.1}, True, "new"), parallel=False)
@example(case=(_MASKED_ROWS, "float64", np.array([2, 2]),
               {"reduction": "sum", "label_smoothing": 1.0}, True, "inplace"), parallel=False)
def test_fuzz_cross_entropy(kind, case, parallel):
    with cpu_build(parallel):
        _check_cross_entropy_case(kind, case)


def _check_cross_entropy_case(kind, case):
    x, dtype, t, kw, with_grad, where = case
    x_view, x = x, x.copy()  # the reference reads a copy: inplace=True overwrites a strided x
    dev_kw = {k: (_to(kind, v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    kw = {k: v for k, v in kw.items() if k != "validate"}  # not a reference option
    xk = _to(kind, x_view)
    if not with_grad:
        loss = gpuce.cross_entropy(xk, _to(kind, t), **dev_kw)
        check_cross_entropy(kind.back(loss), None, x, t, dtype, **kw)
        return
    extra = {}
    if where == "out":
        extra["out"] = _to(kind, poison(x.shape, dtype))
    elif where == "inplace":
        extra["inplace"] = True
    loss, grad = gpuce.cross_entropy_with_grad(xk, _to(kind, t), **dev_kw, **extra)
    if where == "out":
        assert grad is extra["out"]
    check_cross_entropy(kind.back(loss), kind.back(grad), x, t, dtype, **kw)


# Found by the full run (CPU): exp(0.369 - 89.5) = 1.9e-39 is a bf16 (and float32)
# subnormal; the CPU exp built 2**n from exponent bits and flushed it to 0.
_SUBNORMAL_P = np.array([[0.369, 89.5], [89.5, -14.0]])


@pytest.mark.parametrize("kind", KINDS, ids=repr)
@_settings(0.2 / len(KINDS))
@given(case=logits(lead_dims=None), func=st.sampled_from(["softmax", "log_softmax", "logsumexp"]),
       axis=st.integers(-3, 2), with_out=st.booleans(), parallel=BUILDS)
@example(case=(_SUBNORMAL_P.astype(BF16), "bfloat16", None), func="softmax", axis=-1,
         with_out=False, parallel=False)
@example(case=(np.tile(_SUBNORMAL_P, 40).astype(BF16), "bfloat16", None), func="softmax",
         axis=-1, with_out=True, parallel=PARALLEL)  # C = 80: the CPU's exp over a whole row, not a block
def test_fuzz_softmax_family(kind, case, func, axis, with_out, parallel):
    with cpu_build(parallel):
        _check_softmax_case(kind, case, func, axis, with_out)


def _check_softmax_case(kind, case, func, axis, with_out):
    x, dtype, _ = case
    axis = axis % x.ndim  # any axis of this array
    xk = _to(kind, x)
    if func == "logsumexp":
        got = kind.back(gpuce.logsumexp(xk, axis=axis))
        ref = (np.full(np.delete(x.shape, axis), -np.inf) if x.shape[axis] == 0
               else ref_logsumexp(x, axis=axis))  # an empty sum: log 0
        assert_loss_close(got, ref, dtype, "logsumexp")
        return
    out = None
    if with_out:
        out = _to(kind, poison(x.shape, dtype))
    res = getattr(gpuce, func)(xk, axis=axis, out=out)
    if out is not None:
        assert res is out
    got = kind.back(res)
    if x.size == 0:  # nothing to compare (the reference cannot take a max over an empty axis)
        assert got.shape == x.shape, (got.shape, x.shape)
        return
    if func == "softmax":
        assert_grad_close(got, ref_softmax(x, axis=axis), dtype, "softmax", axis=axis)
    else:
        assert_log_softmax_close(got, ref_log_softmax(x, axis=axis), dtype, x=x, axis=axis)


@pytest.mark.parametrize("kind", KINDS, ids=repr)
@_settings(0.1 / len(KINDS))
@given(case=logits(), data=st.data())
def test_fuzz_out_of_range_targets_raise(kind, case, data):
    x, dtype, rng = case
    if x.ndim == 1 or x.size == 0:  # a batch that has rows to hold the bad target
        x = np.repeat(x.reshape(-1, x.shape[-1])[:1], 3, axis=0) if x.size else \
            np.zeros((3, x.shape[-1]), dtype=x.dtype)
    n_cls = x.shape[-1]
    ii = data.draw(st.sampled_from([-100, -1, 3]))
    t = rng.integers(0, n_cls, x.shape[:-1]).astype(np.int64)
    bad = data.draw(st.sampled_from([n_cls, n_cls + 7, -2, -101, 2 ** 40]))
    if bad == ii:
        bad = n_cls + 1
    t.reshape(-1)[rng.integers(t.size)] = bad
    func = data.draw(st.sampled_from([gpuce.cross_entropy, gpuce.cross_entropy_with_grad]))
    # the CPU checks targets whatever validate says; a device only when asked (a host sync)
    validate = True if kind.device else data.draw(st.sampled_from([None, True, False]))
    with pytest.raises(ValueError, match="target"):
        func(_to(kind, x), _to(kind, t), ignore_index=ii, validate=validate)
