"""Every bad-input case of the contract: the exact exception type, and a message that names
the offending argument. A failed call writes nothing."""
import re

import numpy as np
import pytest

import gpuce
from helpers import assert_bitwise_equal, fresh, make_hard_target, make_logits, poison

N, C = 6, 9
CE_FUNCS = {"cross_entropy": gpuce.cross_entropy,
            "cross_entropy_with_grad": gpuce.cross_entropy_with_grad}
SOFTMAX_FUNCS = {"softmax": gpuce.softmax, "log_softmax": gpuce.log_softmax,
                 "logsumexp": gpuce.logsumexp}


def assert_raises(exc, name, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` raises exactly ``exc`` with ``name`` as a word in the message."""
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    err = info.value
    assert type(err) is exc, f"raised {type(err).__name__}({err}), expected {exc.__name__}"
    assert re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", str(err)), \
        f"message does not name {name!r}: {err}"
    return err


@pytest.fixture
def data(kind, rng):
    """(numpy logits, numpy hard targets, kind logits, kind targets)."""
    x = make_logits(rng, (N, C), "float32")
    t = make_hard_target(rng, (N,), C)
    return x, t, fresh(kind, x), fresh(kind, t)


@pytest.fixture(params=list(CE_FUNCS))
def ce(request):
    return CE_FUNCS[request.param]


# ---- ValueError -------------------------------------------------------------------------

BAD_TARGETS = [("too_big", C, -100), ("far_too_big", 2 ** 40, -100), ("negative", -1, -100),
               ("default_ignore_when_other_set", -100, -1), ("minus_two", -2, -1)]


@pytest.mark.parametrize("validate", [True, None, False])
@pytest.mark.parametrize("name,bad,ignore_index", BAD_TARGETS, ids=[b[0] for b in BAD_TARGETS])
def test_target_out_of_range(kind, data, ce, rng, name, bad, ignore_index, validate):
    if kind.device and not validate:
        pytest.skip("the GPU checks targets only with validate=True")
    x, t, xk, _ = data
    t = t.copy()
    t[rng.integers(N)] = bad
    assert_raises(ValueError, "target", ce, xk, fresh(kind, t), ignore_index=ignore_index,
                  validate=validate)


@pytest.mark.parametrize("target_dtype", ["int8", "int16", "int32", "uint8"])
def test_target_out_of_range_small_int_dtypes(kind, data, ce, target_dtype):
    x, t, xk, _ = data
    t = t.astype(target_dtype)
    t[2] = np.iinfo(target_dtype).max  # >= C
    assert_raises(ValueError, "target", ce, xk, fresh(kind, t), validate=True)


def test_bad_target_writes_nothing(kind, data, rng):
    """The target check comes before any output is written (inplace logits, out=)."""
    x, t, xk, _ = data
    t = t.copy()
    t[3] = C + 1
    out = fresh(kind, poison((N, C), "float32"))
    assert_raises(ValueError, "target", gpuce.cross_entropy_with_grad, xk, fresh(kind, t),
                  out=out, validate=True)
    assert_bitwise_equal(kind.back(out), poison((N, C), "float32"), "out")
    assert_raises(ValueError, "target", gpuce.cross_entropy_with_grad, xk, fresh(kind, t),
                  inplace=True, validate=True)
    assert_bitwise_equal(kind.back(xk), x, "logits")


TARGET_SHAPES = [(N + 1,), (N, 1), (1, N), (N * C,), ()]


@pytest.mark.parametrize("shape", TARGET_SHAPES, ids=str)
def test_hard_target_shape_mismatch(kind, data, ce, rng, shape):
    _, _, xk, _ = data
    t = rng.integers(0, C, size=shape)
    assert_raises(ValueError, "target", ce, xk, fresh(kind, t))


@pytest.mark.parametrize("shape", [(N, C + 1), (N + 1, C), (C,), (N, C, 1)], ids=str)
def test_soft_target_shape_mismatch(kind, data, ce, rng, shape):
    _, _, xk, _ = data
    q = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1]).astype(np.float32)
    assert_raises(ValueError, "target", ce, xk, fresh(kind, q))


@pytest.mark.parametrize("ignore_index", [0, 1, C - 1, C + 5])
def test_ignore_index_with_probability_targets(kind, data, ce, rng, ignore_index):
    """As PyTorch: no ignore_index >= 0 with probability targets (negative ones are allowed)."""
    _, _, xk, _ = data
    q = rng.dirichlet(np.ones(C), size=N).astype(np.float32)
    assert_raises(ValueError, "ignore_index", ce, xk, fresh(kind, q), ignore_index=ignore_index)
    ce(xk, fresh(kind, q), ignore_index=-1)


def test_ignore_index_with_probability_targets_torch(rng):
    torch = pytest.importorskip("torch")
    import gpuce.torch as gt
    x = torch.from_numpy(make_logits(rng, (N, C), "float32"))
    q = torch.from_numpy(rng.dirichlet(np.ones(C), size=N).astype(np.float32))
    assert_raises(ValueError, "ignore_index", gt.CrossEntropyLoss(ignore_index=1), x, q)
    assert_raises(ValueError, "ignore_index", gt.cross_entropy, x.requires_grad_(), q,
                  ignore_index=0)


def test_target_shape_mismatch_leading_dims(kind, rng, ce):
    x = make_logits(rng, (2, 3, C), "float32")
    t = make_hard_target(rng, (6,), C)  # the right count, flattened
    assert_raises(ValueError, "target", ce, fresh(kind, x), fresh(kind, t))
    t = make_hard_target(rng, (3, 2), C)  # the right count, transposed shape
    assert_raises(ValueError, "target", ce, fresh(kind, x), fresh(kind, t))


@pytest.mark.parametrize("reduction", ["avg", "MEAN", "", "elementwise_mean", None, 1])
def test_unknown_reduction(kind, data, ce, reduction):
    _, _, xk, tk = data
    assert_raises(ValueError, "reduction", ce, xk, tk, reduction=reduction)


@pytest.mark.parametrize("eps", [-0.1, -1e-12, 1.0 + 1e-9, 2.0, float("nan"), float("inf")])
def test_label_smoothing_outside_unit_interval(kind, data, ce, eps):
    _, _, xk, tk = data
    assert_raises(ValueError, "label_smoothing", ce, xk, tk, label_smoothing=eps)


@pytest.mark.parametrize("shape", [(C + 1,), (C - 1,), (1, C), (C, 1), (), (1,)], ids=str)
def test_weight_wrong_shape(kind, data, ce, rng, shape):
    _, _, xk, tk = data
    w = rng.uniform(0.5, 2.0, size=shape).astype(np.float32)
    assert_raises(ValueError, "weight", ce, xk, tk, weight=fresh(kind, w))


@pytest.mark.parametrize("reduction,shape", [("none", (N + 1,)), ("none", ()), ("none", (N, 1)),
                                             ("mean", (1,)), ("mean", (N,)), ("sum", (1, 1))])
def test_grad_output_wrong_shape(kind, data, rng, reduction, shape):
    _, _, xk, tk = data
    go = rng.uniform(0.5, 2.0, size=shape).astype(np.float32)
    assert_raises(ValueError, "grad_output", gpuce.cross_entropy_with_grad, xk, tk,
                  reduction=reduction, grad_output=fresh(kind, go))


@pytest.mark.parametrize("shape", [(N, C + 1), (N + 1, C), (C, N), (N * C,)], ids=str)
def test_out_wrong_shape(kind, data, shape):
    _, _, xk, tk = data
    out = fresh(kind, poison(shape, "float32"))
    assert_raises(ValueError, "out", gpuce.cross_entropy_with_grad, xk, tk, out=out)
    assert_raises(ValueError, "out", gpuce.softmax, xk, out=out)
    assert_raises(ValueError, "out", gpuce.log_softmax, xk, out=out)


def test_out_with_inplace(kind, data):
    _, _, xk, tk = data
    out = fresh(kind, poison((N, C), "float32"))
    assert_raises(ValueError, "out", gpuce.cross_entropy_with_grad, xk, tk, out=out,
                  inplace=True)


def test_read_only_destinations():
    """numpy: inplace=True on read-only logits, or a read-only out=, is a ValueError naming
    the argument (nothing can be written there)."""
    rng = np.random.default_rng(5)
    x = make_logits(rng, (N, C), "float32")
    t = make_hard_target(rng, (N,), C)
    x.flags.writeable = False
    assert_raises(ValueError, "logits", gpuce.cross_entropy_with_grad, x, t, inplace=True)
    out = np.zeros((N, C), np.float32)
    out.flags.writeable = False
    assert_raises(ValueError, "out", gpuce.cross_entropy_with_grad, x, t, out=out)
    assert_raises(ValueError, "out", gpuce.softmax, x, out=out)
    assert_raises(ValueError, "out", gpuce.log_softmax, x, out=out)


@pytest.mark.parametrize("z", [-0.1, float("nan"), float("inf")])
def test_z_loss_invalid(kind, data, ce, z):
    _, _, xk, tk = data
    assert_raises(ValueError, "z_loss", ce, xk, tk, z_loss=z)


@pytest.mark.parametrize("cap", [0.0, -3.0, float("nan"), float("inf")])
def test_softcap_invalid(kind, data, ce, cap):
    _, _, xk, tk = data
    assert_raises(ValueError, "softcap", ce, xk, tk, softcap=cap)


@pytest.mark.parametrize("func", list(SOFTMAX_FUNCS))
@pytest.mark.parametrize("axis", [2, -3, 10])
def test_axis_out_of_range(kind, data, func, axis):
    _, _, xk, _ = data
    assert_raises(ValueError, "axis", SOFTMAX_FUNCS[func], xk, axis=axis)


def test_logits_without_class_axis(kind, ce, rng):
    x0 = fresh(kind, np.asarray(np.float32(rng.standard_normal())))
    assert_raises(ValueError, "logits", ce, x0, fresh(kind, np.asarray(0)))
    empty = fresh(kind, np.zeros((N, 0), dtype=np.float32) + 1.5)
    assert_raises(ValueError, "logits", ce, empty, fresh(kind, np.zeros(N, dtype=np.int64)))


# ---- TypeError ---------------------------------------------------------------------------

NON_FLOAT = ["int32", "int64", "uint8", "bool", "complex64"]


@pytest.mark.parametrize("dtype", NON_FLOAT)
def test_non_float_logits(kind, ce, rng, dtype):
    x = (rng.standard_normal((N, C)) * 3).astype(dtype)
    t = make_hard_target(rng, (N,), C)
    assert_raises(TypeError, "logits", ce, fresh(kind, x), fresh(kind, t))


@pytest.mark.parametrize("dtype", NON_FLOAT)
@pytest.mark.parametrize("func", list(SOFTMAX_FUNCS))
def test_non_float_softmax_input(kind, rng, func, dtype):
    x = (rng.standard_normal((N, C)) * 3).astype(dtype)
    assert_raises(TypeError, "x", SOFTMAX_FUNCS[func], fresh(kind, x))


class _Duck:
    """Looks like an array (shape, dtype) but is none of the supported array types."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, np.dtype(dtype)


def _unsupported(shape, dtype):
    return {"list": np.atleast_1d(np.zeros(shape, dtype=dtype)).tolist(),
            "tuple": tuple(np.zeros(shape, dtype=dtype).ravel().tolist()),
            "object": object(),
            "duck": _Duck(shape, dtype),
            "string": "logits"}


UNSUPPORTED = ["list", "tuple", "object", "duck", "string"]


@pytest.mark.parametrize("what", UNSUPPORTED)
def test_unsupported_logits_type(kind, data, ce, what):
    _, _, _, tk = data
    assert_raises(TypeError, "logits", ce, _unsupported((N, C), np.float32)[what], tk)


@pytest.mark.parametrize("what", UNSUPPORTED)
@pytest.mark.parametrize("func", list(SOFTMAX_FUNCS))
def test_unsupported_softmax_input_type(func, what):
    assert_raises(TypeError, "x", SOFTMAX_FUNCS[func], _unsupported((N, C), np.float32)[what])


@pytest.mark.parametrize("what", UNSUPPORTED)
def test_unsupported_target_type(kind, data, ce, what):
    _, t, xk, _ = data
    assert_raises(TypeError, "target", ce, xk, _unsupported((N,), np.int64)[what])


@pytest.mark.parametrize("what", UNSUPPORTED)
def test_unsupported_weight_type(kind, data, ce, what):
    _, _, xk, tk = data
    assert_raises(TypeError, "weight", ce, xk, tk, weight=_unsupported((C,), np.float32)[what])


@pytest.mark.parametrize("what", [w for w in UNSUPPORTED if w != "string"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_unsupported_grad_output_type(kind, data, what, reduction):
    _, _, xk, tk = data
    shape = (N,) if reduction == "none" else ()
    go = _unsupported(shape, np.float32)[what]
    assert_raises(TypeError, "grad_output", gpuce.cross_entropy_with_grad, xk, tk,
                  reduction=reduction, grad_output=go)


@pytest.mark.parametrize("what", UNSUPPORTED)
def test_unsupported_out_type(kind, data, what):
    _, _, xk, tk = data
    out = _unsupported((N, C), np.float32)[what]
    assert_raises(TypeError, "out", gpuce.cross_entropy_with_grad, xk, tk, out=out)
    assert_raises(TypeError, "out", gpuce.softmax, xk, out=out)
    assert_raises(TypeError, "out", gpuce.log_softmax, xk, out=out)


@pytest.mark.parametrize("dtype", ["float64", "float16", "int32"])
def test_out_wrong_dtype(kind, data, dtype):
    _, _, xk, tk = data
    out = fresh(kind, np.zeros((N, C), dtype=dtype))
    assert_raises(TypeError, "out", gpuce.cross_entropy_with_grad, xk, tk, out=out)
    assert_raises(TypeError, "out", gpuce.softmax, xk, out=out)


@pytest.mark.parametrize("dtype", ["bool", "complex64"])
def test_target_neither_int_nor_float(kind, data, dtype):
    _, t, xk, _ = data
    assert_raises(TypeError, "target", gpuce.cross_entropy, xk, fresh(kind, t.astype(dtype)))


def test_weight_not_float(kind, data, ce):
    _, _, xk, tk = data
    assert_raises(TypeError, "weight", ce, xk, tk, weight=fresh(kind, np.ones(C, np.int32)))


def test_grad_output_not_float(kind, data):
    _, _, xk, tk = data
    assert_raises(TypeError, "grad_output", gpuce.cross_entropy_with_grad, xk, tk,
                  reduction="none", grad_output=fresh(kind, np.ones(N, np.int64)))


@pytest.mark.parametrize("keyword,value", [
    ("ignore_index", 1.0), ("ignore_index", True), ("ignore_index", "x"),
    ("label_smoothing", "0.1"), ("label_smoothing", None), ("z_loss", "1"),
    ("softcap", "5"), ("validate", 1), ("validate", "yes")])
def test_bad_keyword_types(kind, data, ce, keyword, value):
    _, _, xk, tk = data
    assert_raises(TypeError, keyword, ce, xk, tk, **{keyword: value})


def test_inplace_not_bool(kind, data):
    _, _, xk, tk = data
    assert_raises(TypeError, "inplace", gpuce.cross_entropy_with_grad, xk, tk, inplace=1)


@pytest.mark.parametrize("func", list(SOFTMAX_FUNCS))
def test_axis_not_int(kind, data, func):
    _, _, xk, _ = data
    assert_raises(TypeError, "axis", SOFTMAX_FUNCS[func], xk, axis=1.0)


# ---- different devices -------------------------------------------------------------------
# No CUDA tensor can be made here: a torch 'meta' tensor and an object exposing
# __cuda_array_interface__ stand in for arrays on another device.

class _FakeCudaArray:
    """Claims to be a CUDA array through __cuda_array_interface__ (never dereferenced)."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.__cuda_array_interface__ = {"shape": shape, "typestr": self.dtype.str,
                                         "data": (0, False), "version": 3, "strides": None}


def _elsewhere(how, shape, dtype):
    if how == "meta":
        torch = pytest.importorskip("torch")
        return torch.empty(shape, dtype=getattr(torch, np.dtype(dtype).name), device="meta")
    return _FakeCudaArray(shape, dtype)


DEVICES = ["meta", "fake_cuda"]
# A __cuda_array_interface__ object as the *logits* would be routed to the CUDA backend
# (which then needs a driver); it stands in for a foreign device only beside CPU logits.


@pytest.fixture
def cpu_data(kind, data):
    if kind.device:
        pytest.skip("stand-ins for a second device are only foreign to the CPU backend")
    return data


@pytest.mark.parametrize("how", DEVICES)
def test_target_on_another_device(cpu_data, ce, how):
    _, _, xk, _ = cpu_data
    assert_raises(TypeError, "target", ce, xk, _elsewhere(how, (N,), np.int64))


@pytest.mark.parametrize("how", DEVICES)
def test_soft_target_on_another_device(cpu_data, ce, how):
    _, _, xk, _ = cpu_data
    assert_raises(TypeError, "target", ce, xk, _elsewhere(how, (N, C), np.float32))


@pytest.mark.parametrize("how", ["meta"])
def test_logits_on_another_device(cpu_data, ce, how):
    _, _, _, tk = cpu_data
    assert_raises(TypeError, "logits", ce, _elsewhere(how, (N, C), np.float32), tk)


@pytest.mark.parametrize("how", DEVICES)
def test_weight_on_another_device(cpu_data, ce, how):
    _, _, xk, tk = cpu_data
    assert_raises(TypeError, "weight", ce, xk, tk, weight=_elsewhere(how, (C,), np.float32))


@pytest.mark.parametrize("how", DEVICES)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_grad_output_on_another_device(cpu_data, how, reduction):
    _, _, xk, tk = cpu_data
    shape = (N,) if reduction == "none" else ()
    assert_raises(TypeError, "grad_output", gpuce.cross_entropy_with_grad, xk, tk,
                  reduction=reduction, grad_output=_elsewhere(how, shape, np.float32))


@pytest.mark.parametrize("how", DEVICES)
def test_out_on_another_device(cpu_data, how):
    _, _, xk, tk = cpu_data
    out = _elsewhere(how, (N, C), np.float32)
    assert_raises(TypeError, "out", gpuce.cross_entropy_with_grad, xk, tk, out=out)
    assert_raises(TypeError, "out", gpuce.softmax, xk, out=out)
    assert_raises(TypeError, "out", gpuce.log_softmax, xk, out=out)


@pytest.mark.parametrize("how", ["meta"])
@pytest.mark.parametrize("func", list(SOFTMAX_FUNCS))
def test_softmax_input_on_another_device(func, how):
    assert_raises(TypeError, "x", SOFTMAX_FUNCS[func], _elsewhere(how, (N, C), np.float32))


def test_errors_name_the_argument_first(kind, data):
    """Messages start with the argument's name (``name: ...``), so users see it first."""
    _, _, xk, tk = data
    err = assert_raises(ValueError, "reduction", gpuce.cross_entropy, xk, tk, reduction="avg")
    assert str(err).startswith("reduction")
