"""Every public function x dtype x reduction x option against the float64 reference.

Outputs are poisoned before each run: fresh CPU allocations start as NaN
(``poison_allocations``), and ``out=`` buffers are prefilled with NaN or garbage.
Default calls must leave their inputs untouched, bit for bit.
"""
import numpy as np
import pytest

import gpuce
from helpers import (LOSS_DTYPE, assert_array_of, assert_bitwise_equal, assert_grad_close,
                     assert_log_softmax_close, assert_loss_close, check_cross_entropy,
                     dtype_name, fresh, make_hard_target, make_logits, make_soft_target,
                     make_weight, np_dtype, poison, shares_memory)
from reference import ref_log_softmax, ref_logsumexp, ref_softmax

pytestmark = pytest.mark.usefixtures("poison_allocations")

DTYPES = ["float16", "bfloat16", "float32", "float64"]
REDUCTIONS = ["none", "mean", "sum"]
IGNORE = -100

# name -> (soft target?, options); "ignore" sets ~30% of the targets to ignore_index.
OPTIONS = {
    "plain": (False, {}),
    "weight": (False, {"weight": True}),
    "ignore": (False, {"ignore": True}),
    "smoothing": (False, {"label_smoothing": 0.15}),
    "z_loss": (False, {"z_loss": 0.05}),
    "softcap": (False, {"softcap": 4.0}),
    "all": (False, {"weight": True, "ignore": True, "label_smoothing": 0.1, "z_loss": 0.02,
                    "softcap": 5.0}),
    "soft": (True, {}),
    "soft_all": (True, {"weight": True, "label_smoothing": 0.2, "z_loss": 0.03,
                        "softcap": 6.0}),
}


class Case:
    """Inputs of one cross-entropy call: numpy originals and the reference keywords."""

    def __init__(self, rng, dtype, option, shape=(4, 6, 37), ignore_index=IGNORE,
                 target_dtype=np.int64):
        soft, opts = OPTIONS[option]
        n_cls = shape[-1]
        self.dtype = dtype
        self.x = make_logits(rng, shape, dtype)
        if soft:
            self.t = make_soft_target(rng, shape, dtype)
        else:
            self.t = make_hard_target(rng, shape[:-1], n_cls, target_dtype, ignore_index,
                                      0.3 if opts.get("ignore") else 0.0)
        self.ref_kw = {}
        if opts.get("weight"):
            self.ref_kw["weight"] = make_weight(rng, n_cls)
        for key in ("label_smoothing", "z_loss", "softcap"):
            if key in opts:
                self.ref_kw[key] = opts[key]
        if ignore_index != -100:
            self.ref_kw["ignore_index"] = ignore_index

    def kw(self, kind):
        """gpuce keywords, arrays handed to ``kind``."""
        return {k: fresh(kind, v) if isinstance(v, np.ndarray) else v
                for k, v in self.ref_kw.items()}

    def check(self, loss, grad, reduction, x=None, **extra):
        """Compare numpy results with the reference (``x``: the numpy view used)."""
        return check_cross_entropy(loss, grad, self.x if x is None else x, self.t, self.dtype,
                                   reduction, **self.ref_kw, **extra)


def loss_shape(reduction, shape):
    return tuple(shape[:-1]) if reduction == "none" else ()


# ---- cross entropy: the full matrix ------------------------------------------------------

@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_with_grad(kind, dtype, reduction, option, rng):
    c = Case(rng, dtype, option)
    xk, tk = fresh(kind, c.x), fresh(kind, c.t)
    loss, grad = gpuce.cross_entropy_with_grad(xk, tk, reduction=reduction, **c.kw(kind))
    assert_array_of(loss, xk, LOSS_DTYPE[dtype], loss_shape(reduction, c.x.shape), "loss")
    assert_array_of(grad, xk, dtype, c.x.shape, "grad")
    c.check(kind.back(loss), kind.back(grad), reduction)
    assert not shares_memory(grad, xk)
    assert_bitwise_equal(kind.back(xk), c.x, "logits")
    assert_bitwise_equal(kind.back(tk), c.t, "target")


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_loss(kind, dtype, reduction, option, rng):
    c = Case(rng, dtype, option, shape=(29, 53))
    xk = fresh(kind, c.x)
    loss = gpuce.cross_entropy(xk, fresh(kind, c.t), reduction=reduction, **c.kw(kind))
    assert_array_of(loss, xk, LOSS_DTYPE[dtype], loss_shape(reduction, c.x.shape), "loss")
    c.check(kind.back(loss), None, reduction)
    assert_bitwise_equal(kind.back(xk), c.x, "logits")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_only_matches_loss_with_grad(kind, dtype, reduction, rng):
    """cross_entropy and cross_entropy_with_grad give the same loss, bit for bit."""
    c = Case(rng, dtype, "all")
    xk, tk = fresh(kind, c.x), fresh(kind, c.t)
    a = gpuce.cross_entropy(xk, tk, reduction=reduction, **c.kw(kind))
    b, _ = gpuce.cross_entropy_with_grad(xk, tk, reduction=reduction, **c.kw(kind))
    assert_bitwise_equal(kind.back(a), kind.back(b), "loss")


# ---- grad_output ---------------------------------------------------------------------

@pytest.mark.parametrize("option", ["plain", "all", "soft_all"])
@pytest.mark.parametrize("reduction,form", [("none", "array"), ("mean", "python"),
                                            ("mean", "array"), ("sum", "python"),
                                            ("sum", "array")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_output(kind, dtype, reduction, form, option, rng):
    """grad_output scales the gradient: per row for 'none', a scalar (a number or a 0-d
    array) for mean and sum. It never changes the loss."""
    c = Case(rng, dtype, option, shape=(3, 5, 19))
    if reduction == "none":
        go = rng.uniform(-2.0, 3.0, size=c.x.shape[:-1]).astype(np.float32)
        go_k = fresh(kind, go)
    else:
        go = np.float32(rng.uniform(0.3, 3.0) * (-1 if rng.random() < 0.3 else 1))
        go_k = float(go) if form == "python" else fresh(kind, np.asarray(go))
    loss, grad = gpuce.cross_entropy_with_grad(fresh(kind, c.x), fresh(kind, c.t),
                                               reduction=reduction, grad_output=go_k,
                                               **c.kw(kind))
    c.check(kind.back(loss), kind.back(grad), reduction, grad_output=go)


@pytest.mark.parametrize("sliced", [False, True], ids=["contiguous", "sliced"])
@pytest.mark.parametrize("go_dtype", DTYPES)
def test_grad_output_dtypes(kind, go_dtype, sliced, rng):
    """grad_output may have any float dtype, whatever the logits' dtype, and any stride."""
    c = Case(rng, "float32", "ignore", shape=(12, 15))
    go = rng.uniform(-2, 2, size=12).astype(np_dtype(go_dtype))
    go_k = fresh(kind, np.repeat(go, 2))[::2] if sliced and not kind.device else fresh(kind, go)
    loss, grad = gpuce.cross_entropy_with_grad(fresh(kind, c.x), fresh(kind, c.t),
                                               reduction="none", grad_output=go_k)
    c.check(kind.back(loss), kind.back(grad), "none", grad_output=go)


# ---- out= and inplace ----------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("garbage", [False, True], ids=["nan", "garbage"])
@pytest.mark.parametrize("option", ["plain", "all", "soft_all"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_out_buffer(kind, dtype, option, garbage, layout, rng):
    """out= receives the gradient (every element overwritten) and is what is returned."""
    c = Case(rng, dtype, option, shape=(23, 31))
    if layout == "transposed":  # a non-contiguous buffer
        out = fresh(kind, poison((31, 23), dtype, garbage, rng)).T
    else:
        out = fresh(kind, poison((23, 31), dtype, garbage, rng))
    xk = fresh(kind, c.x)
    loss, grad = gpuce.cross_entropy_with_grad(xk, fresh(kind, c.t), reduction="mean", out=out,
                                               **c.kw(kind))
    assert grad is out
    c.check(kind.back(loss), kind.back(out), "mean")
    assert_bitwise_equal(kind.back(xk), c.x, "logits")


def _inplace_params():
    for dtype in DTYPES:
        for option in ["plain", "soft", "all", "soft_all"]:
            if option in ("all", "soft_all") and dtype != "float32":
                continue  # softcapped in-place kernels: one dtype is enough (compile time)
            for reduction in ["none", "mean"]:
                for layout in ["contiguous", "transposed"]:
                    # (transposed float32/float64 without softcap once gave a wrong loss)
                    yield dtype, option, reduction, layout


@pytest.mark.parametrize("dtype,option,reduction,layout", list(_inplace_params()))
def test_inplace(kind, dtype, reduction, option, layout, rng):
    """inplace=True: the gradient lands in the logits and the returned grad shares them."""
    c = Case(rng, dtype, option, shape=(17, 29))
    if layout == "transposed":
        xk = fresh(kind, np.ascontiguousarray(c.x.T)).T
    else:
        xk = fresh(kind, c.x)
    loss, grad = gpuce.cross_entropy_with_grad(xk, fresh(kind, c.t), reduction=reduction,
                                               inplace=True, **c.kw(kind))
    assert shares_memory(grad, xk)
    assert tuple(grad.shape) == c.x.shape and dtype_name(grad) == dtype
    _, ref_grad = c.check(kind.back(loss), kind.back(grad), reduction)
    assert_bitwise_equal(kind.back(xk), kind.back(grad), "logits after inplace")


def test_inplace_numpy_returns_the_logits(rng):
    x = make_logits(rng, (9, 21), "float32")
    t = make_hard_target(rng, (9,), 21)
    _, grad = gpuce.cross_entropy_with_grad(x, t, inplace=True)
    assert grad is x


# ---- strides and leading dimensions ------------------------------------------------------

def _strided(kind, a, layout):
    """(view as handed to gpuce, the same view in numpy) for a numpy array ``a``."""
    if layout == "contiguous":
        return fresh(kind, a), a
    if layout == "transposed":  # class axis last but with a large stride
        base = np.ascontiguousarray(np.moveaxis(a, -1, 0))
        base_k = fresh(kind, base)
        view = np.moveaxis(base_k, 0, -1) if isinstance(base_k, np.ndarray) else \
            base_k.movedim(0, -1)
        return view, np.moveaxis(base, 0, -1)
    if layout == "sliced":  # every other row and a window of the columns
        pad = np.zeros((2 * a.shape[0],) + a.shape[1:-1] + (a.shape[-1] + 5,), dtype=a.dtype)
        sl = (slice(None, None, 2),) + (slice(None),) * (a.ndim - 2) + \
            (slice(3, 3 + a.shape[-1]),)
        pad[sl] = a
        return fresh(kind, pad)[sl], pad[sl]
    raise AssertionError(layout)


def _strided_target(kind, t):
    if t.ndim == 0:
        return fresh(kind, t)
    return fresh(kind, np.repeat(t, 2, axis=0))[::2]  # every other row is t


def _is_contiguous(a):
    return a.flags.c_contiguous if isinstance(a, np.ndarray) else a.is_contiguous()


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("option", ["plain", "all", "soft_all"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs(kind, dtype, option, layout, rng):
    if kind.device:
        pytest.skip("strided views are built with numpy/torch indexing")
    c = Case(rng, dtype, option, shape=(6, 3, 23))
    xk, x_view = _strided(kind, c.x, layout)
    tk = _strided_target(kind, c.t)
    assert not _is_contiguous(xk) and not _is_contiguous(tk)
    for reduction in REDUCTIONS:
        loss, grad = gpuce.cross_entropy_with_grad(xk, tk, reduction=reduction, **c.kw(kind))
        assert_array_of(grad, xk, dtype, c.x.shape, "grad")
        c.check(kind.back(loss), kind.back(grad), reduction, x=x_view)
        assert_bitwise_equal(kind.back(xk), c.x, "logits")


@pytest.mark.parametrize("how", ["readonly", "broadcast"])
def test_readonly_and_zero_stride_logits(how, rng):
    """numpy logits that cannot be written (read-only, or a zero-stride broadcast view)."""
    c = Case(rng, "float32", "all", shape=(9, 26))
    if how == "broadcast":
        c.x = np.broadcast_to(c.x[3], c.x.shape)  # every row the same, strides (0, 4)
    x = c.x.copy() if how == "readonly" else c.x
    x.flags.writeable = False
    loss, grad = gpuce.cross_entropy_with_grad(x, c.t, reduction="none", **c.ref_kw)
    c.check(loss, grad, "none")
    assert_grad_close(gpuce.softmax(x), ref_softmax(c.x), "float32", "softmax")


@pytest.mark.parametrize("shape", [(37,), (5, 37), (2, 3, 4, 37)], ids=str)
@pytest.mark.parametrize("option", ["plain", "soft"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_leading_dims(kind, dtype, option, shape, rng):
    c = Case(rng, dtype, option, shape=shape)
    for reduction in REDUCTIONS:
        loss, grad = gpuce.cross_entropy_with_grad(fresh(kind, c.x), fresh(kind, c.t),
                                                   reduction=reduction, **c.kw(kind))
        assert tuple(loss.shape) == loss_shape(reduction, shape)
        c.check(kind.back(loss), kind.back(grad), reduction)


# ---- targets --------------------------------------------------------------------------

INT_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]


@pytest.mark.parametrize("target_dtype", INT_DTYPES)
def test_target_integer_dtypes(kind, target_dtype, rng):
    if kind.name == "torch" and target_dtype in ("uint16", "uint32", "uint64"):
        pytest.skip("torch has only limited support for these unsigned dtypes")
    info = np.iinfo(target_dtype)
    ignore = -1 if info.min < 0 else min(int(info.max), 65535)  # one the dtype can hold
    c = Case(rng, "float32", "ignore", shape=(40, 50), ignore_index=ignore,
             target_dtype=target_dtype)
    assert str(c.t.dtype) == target_dtype and np.any(c.t == ignore)
    loss, grad = gpuce.cross_entropy_with_grad(fresh(kind, c.x), fresh(kind, c.t),
                                               reduction="mean", validate=True, **c.kw(kind))
    c.check(kind.back(loss), kind.back(grad), "mean")


@pytest.mark.parametrize("ignore_index", [-1, 0, 7])
def test_ignore_index_values(kind, ignore_index, rng):
    """A non-default ignore_index, including one that is a valid class."""
    c = Case(rng, "float32", "ignore", shape=(30, 11), ignore_index=ignore_index)
    for reduction in REDUCTIONS:
        loss, grad = gpuce.cross_entropy_with_grad(fresh(kind, c.x), fresh(kind, c.t),
                                                   reduction=reduction, **c.kw(kind))
        c.check(kind.back(loss), kind.back(grad), reduction)
        assert np.all(kind.back(grad)[c.t == ignore_index] == 0)


# each pair is a kernel variant (compile time): wider and narrower targets, half logits
SOFT_PAIRS = [("bfloat16", "float32"), ("float16", "float64"), ("float32", "float16"),
              ("float64", "float32")]


@pytest.mark.parametrize("logit_dtype,target_dtype", SOFT_PAIRS)
def test_soft_target_other_float_dtype(kind, logit_dtype, target_dtype, rng):
    """Soft targets may have their own float dtype; the probabilities are used as given
    (fp32 probabilities with bf16 logits are not rounded to bf16)."""
    x = make_logits(rng, (16, 40), logit_dtype)
    q = make_soft_target(rng, (16, 40), target_dtype)
    w = make_weight(rng, 40)
    for reduction in REDUCTIONS:
        loss, grad = gpuce.cross_entropy_with_grad(fresh(kind, x), fresh(kind, q),
                                                   weight=fresh(kind, w), reduction=reduction)
        check_cross_entropy(kind.back(loss), kind.back(grad), x, q, logit_dtype, reduction,
                            weight=w)


@pytest.mark.parametrize("sliced", [False, True], ids=["contiguous", "sliced"])
@pytest.mark.parametrize("weight_dtype", DTYPES)
def test_weight_dtypes(kind, weight_dtype, sliced, rng):
    """weight may have any float dtype and any stride."""
    x = make_logits(rng, (20, 33), "float32")
    t = make_hard_target(rng, (20,), 33, ignore_index=IGNORE, ignore_frac=0.2)
    w = make_weight(rng, 33, weight_dtype)
    wk = fresh(kind, np.repeat(w, 2))[::2] if sliced and not kind.device else fresh(kind, w)
    loss, grad = gpuce.cross_entropy_with_grad(fresh(kind, x), fresh(kind, t), weight=wk,
                                               label_smoothing=0.1)
    check_cross_entropy(kind.back(loss), kind.back(grad), x, t, "float32", "mean", weight=w,
                        label_smoothing=0.1)


# ---- all rows ignored ------------------------------------------------------------------

@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_ignored(kind, dtype, reduction, weighted, rng):
    """Every row ignored: mean gives 0.0 (PyTorch: NaN) and the gradient is exactly zero."""
    x = make_logits(rng, (7, 13), dtype)
    t = np.full(7, IGNORE, dtype=np.int64)
    w = make_weight(rng, 13) if weighted else None
    kw = {"weight": fresh(kind, w)} if weighted else {}
    out = fresh(kind, poison(x.shape, dtype))
    xk = fresh(kind, x)
    loss, grad = gpuce.cross_entropy_with_grad(xk, fresh(kind, t), reduction=reduction,
                                               z_loss=0.1, out=out, **kw)
    assert_array_of(loss, xk, LOSS_DTYPE[dtype], loss_shape(reduction, x.shape), "loss")
    ref_loss, ref_grad = check_cross_entropy(kind.back(loss), kind.back(grad), x, t, dtype,
                                             reduction, weight=w, z_loss=0.1)
    assert np.all(ref_grad == 0) and np.all(np.asarray(ref_loss) == 0)  # the reference's rule
    assert np.all(kind.back(loss) == 0)  # exactly 0.0, not NaN
    assert np.all(kind.back(grad).astype(np.float64) == 0)
    loss2 = gpuce.cross_entropy(xk, fresh(kind, t), reduction=reduction, **kw)
    assert np.all(kind.back(loss2) == 0) and tuple(loss2.shape) == tuple(loss.shape)


# ---- softmax, log_softmax, logsumexp ----------------------------------------------------

def _check_softmax(func, got, x, dtype, axis):
    if func == "softmax":
        assert_grad_close(got, ref_softmax(x, axis=axis), dtype, func, axis=axis)
    else:
        assert_log_softmax_close(got, ref_log_softmax(x, axis=axis), dtype, func, x=x,
                                 axis=axis)


SOFTMAX_FUNCS = {"softmax": gpuce.softmax, "log_softmax": gpuce.log_softmax}


@pytest.mark.parametrize("axis", [-1, 0, 1, 2, -2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("func", list(SOFTMAX_FUNCS))
def test_softmax_family(kind, func, dtype, axis, rng):
    x = make_logits(rng, (5, 19, 12), dtype)
    xk = fresh(kind, x)
    y = SOFTMAX_FUNCS[func](xk, axis=axis)
    assert_array_of(y, xk, dtype, x.shape, func)
    _check_softmax(func, kind.back(y), x, dtype, axis)
    assert_bitwise_equal(kind.back(xk), x, "x")


@pytest.mark.parametrize("axis", [-1, 0, 1, -2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_logsumexp(kind, dtype, axis, rng):
    x = make_logits(rng, (5, 19, 12), dtype)
    xk = fresh(kind, x)
    r = gpuce.logsumexp(xk, axis=axis)
    shape = tuple(np.delete(np.array(x.shape), axis))
    assert_array_of(r, xk, LOSS_DTYPE[dtype], shape, "logsumexp")
    assert_loss_close(kind.back(r), ref_logsumexp(x, axis=axis), dtype, "logsumexp")
    assert_bitwise_equal(kind.back(xk), x, "x")


def test_softmax_family_default_axis_is_last(kind, rng):
    x = make_logits(rng, (6, 9), "float32")
    assert_grad_close(kind.back(gpuce.softmax(fresh(kind, x))), ref_softmax(x, -1), "float32")
    assert_loss_close(kind.back(gpuce.log_softmax(fresh(kind, x))), ref_log_softmax(x, -1),
                      "float32")
    assert_loss_close(kind.back(gpuce.logsumexp(fresh(kind, x))), ref_logsumexp(x, -1),
                      "float32")


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_family_strided(kind, dtype, layout, rng):
    if kind.device:
        pytest.skip("strided views are built with numpy/torch indexing")
    x = make_logits(rng, (8, 3, 21), dtype)
    xk, view = _strided(kind, x, layout)
    for axis in (-1, 0):
        for func, fn in SOFTMAX_FUNCS.items():
            _check_softmax(func, kind.back(fn(xk, axis=axis)), view, dtype, axis)
        assert_loss_close(kind.back(gpuce.logsumexp(xk, axis=axis)), ref_logsumexp(view, axis),
                          dtype, "logsumexp")
    assert_bitwise_equal(kind.back(xk), x, "x")


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("func", list(SOFTMAX_FUNCS))
def test_softmax_family_out(kind, func, dtype, axis, layout, rng):
    """out= is filled completely (NaN poison) and is the returned object."""
    x = make_logits(rng, (14, 25), dtype)
    if layout == "transposed":
        out = fresh(kind, poison((25, 14), dtype)).T
    else:
        out = fresh(kind, poison((14, 25), dtype))
    xk = fresh(kind, x)
    y = SOFTMAX_FUNCS[func](xk, axis=axis, out=out)
    assert y is out
    _check_softmax(func, kind.back(out), x, dtype, axis)
    assert_bitwise_equal(kind.back(xk), x, "x")


@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("func", list(SOFTMAX_FUNCS))
def test_softmax_family_out_is_input(kind, func, dtype, axis, rng):
    """out=x computes in place and returns x."""
    x = make_logits(rng, (14, 25), dtype)
    xk = fresh(kind, x)
    y = SOFTMAX_FUNCS[func](xk, axis=axis, out=xk)
    assert y is xk
    _check_softmax(func, kind.back(xk), x, dtype, axis)


# ---- the poisoning itself ----------------------------------------------------------------

def test_poisoned_allocations_are_nan():
    """The fixture really poisons the CPU backend's allocations (so the tests can fail)."""
    from gpuce import _cpu
    assert np.all(np.isnan(_cpu.np.empty(5, dtype=np.float32)))
    assert np.all(_cpu.np.empty(3, dtype=np.uint16) == 0xFFFF)
    assert np.isnan(np.uint16(0xFFFF).view(np.float16))
    assert np.isnan(np.uint16(0xFFFF).view(np_dtype("bfloat16")).astype(np.float64))
