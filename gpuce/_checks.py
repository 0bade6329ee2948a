"""Argument checks shared by every backend. They read only shapes and dtypes: no sync."""
import math
from dataclasses import dataclass
from typing import Any, Optional

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
REDUCTIONS = ("none", "mean", "sum")


_DTYPE_NAMES = {}


def dtype_name(a):
    """'float32', 'bfloat16', 'int64', ... for numpy, ml_dtypes, torch and CuPy arrays."""
    dt = a.dtype
    try:
        return _DTYPE_NAMES[dt]
    except (KeyError, TypeError):  # TypeError: an unhashable dtype object
        name = str(dt).replace("torch.", "")
        if len(_DTYPE_NAMES) < 64:  # dtype objects are few; str() is slow on the hot path
            try:
                _DTYPE_NAMES[dt] = name
            except TypeError:
                pass
        return name


def is_integer_dtype(name):
    return name.startswith(("int", "uint"))


def check_float_logits(x, name="logits"):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
    dt = dtype_name(x)
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype {dt} is not supported; expected one of {', '.join(FLOAT_DTYPES)}")
    return dt


def normalize_axis(axis, ndim, name="axis"):
    if ndim == 0:
        raise ValueError(f"{name}: a 0-d array has no class axis")
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise TypeError(f"{name}: expected an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}: {axis} is out of range for an array with {ndim} dimensions")
    return axis % ndim


def check_out(out, shape, dtype, name="out"):
    if out is None:
        return
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
        raise TypeError(f"{name}: expected an array, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(out.shape)} does not match the logits' shape {tuple(shape)}")
    if dtype_name(out) != dtype:
        raise TypeError(f"{name}: dtype {dtype_name(out)} does not match the logits' dtype {dtype}")


def check_class_mask(class_mask, shape, axis=-1):
    """A ``(C,)`` or logits-shaped bool mask (True: the class takes part). Returns whether
    it is per row (logits-shaped) or None without a mask."""
    if class_mask is None:
        return None
    if not hasattr(class_mask, "shape") or not hasattr(class_mask, "dtype"):
        raise TypeError(f"class_mask: expected a bool array, got {type(class_mask).__name__}")
    if dtype_name(class_mask) != "bool":
        raise TypeError(f"class_mask: dtype {dtype_name(class_mask)} is not bool (True marks "
                        "the classes that take part)")
    mshape = tuple(class_mask.shape)
    n_cls = shape[axis]
    if mshape == (n_cls,) and len(shape) != 1:
        return False
    if mshape == tuple(shape):
        return len(shape) != 1  # a 1-d logits row: both forms are the same
    raise ValueError(f"class_mask: expected shape ({n_cls},) (one per class) or the logits' "
                     f"shape {tuple(shape)}, got {mshape}")


@dataclass
class CERequest:
    """A cross-entropy call after its arguments were checked."""
    logits: Any
    target: Any
    dtype: str               # storage dtype of the logits
    soft: bool               # target holds probabilities
    weight: Optional[Any]
    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float
    softcap: Optional[float]
    validate: Optional[bool]
    want_grad: bool
    grad_output: Optional[Any] = None
    inplace: bool = False
    out: Optional[Any] = None
    class_mask: Optional[Any] = None
    mask_per_row: bool = False   # class_mask has the logits' shape (else (C,))

    @property
    def n_classes(self):
        return int(tuple(self.logits.shape)[-1])

    @property
    def row_shape(self):
        return tuple(self.logits.shape)[:-1]


def check_cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing,
                        z_loss, softcap, validate, want_grad, grad_output=None, inplace=False,
                        out=None, class_mask=None):
    dt = check_float_logits(logits)
    shape = tuple(logits.shape)
    if len(shape) == 0:
        raise ValueError("logits: expected shape (..., C), got a 0-d array")
    if shape[-1] == 0:
        raise ValueError("logits: the class axis (last) has size 0")
    if not hasattr(target, "shape") or not hasattr(target, "dtype"):
        raise TypeError(f"target: expected an array, got {type(target).__name__}")
    tdt = dtype_name(target)
    tshape = tuple(target.shape)
    if is_integer_dtype(tdt):
        soft = False
        if tshape != shape[:-1]:
            raise ValueError(f"target: class indices need shape {shape[:-1]} (logits.shape[:-1]), got {tshape}")
    elif tdt in FLOAT_DTYPES:
        soft = True
        if tshape != shape:
            raise ValueError(f"target: class probabilities need the logits' shape {shape}, got {tshape}")
    else:
        raise TypeError(f"target: dtype {tdt} is neither an integer (class indices) nor a float "
                        "(class probabilities)")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction: {reduction!r} is not one of {REDUCTIONS}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if soft and ignore_index >= 0:  # as PyTorch: no row of probabilities can be ignored
        raise ValueError(f"ignore_index: {ignore_index} is not supported with class-probability "
                         "targets; leave it negative (the default is -100)")
    label_smoothing = _real("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: {label_smoothing} is outside [0, 1]")
    z_loss = _real("z_loss", z_loss)
    if not (z_loss >= 0.0 and math.isfinite(z_loss)):
        raise ValueError(f"z_loss: {z_loss} must be a finite number >= 0")
    if softcap is not None:
        softcap = _real("softcap", softcap)
        if not (softcap > 0.0 and math.isfinite(softcap)):
            raise ValueError(f"softcap: {softcap} must be a finite number > 0 or None")
    if weight is not None:
        if not hasattr(weight, "shape") or not hasattr(weight, "dtype"):
            raise TypeError(f"weight: expected an array, got {type(weight).__name__}")
        if tuple(weight.shape) != (shape[-1],):
            raise ValueError(f"weight: expected shape ({shape[-1]},) (one per class), got {tuple(weight.shape)}")
        if dtype_name(weight) not in FLOAT_DTYPES:
            raise TypeError(f"weight: dtype {dtype_name(weight)} is not a float dtype")
    if validate is not None and not isinstance(validate, bool):
        raise TypeError(f"validate: expected a bool or None, got {type(validate).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace: expected a bool, got {type(inplace).__name__}")
    if grad_output is not None and not isinstance(grad_output, (int, float)):
        if not hasattr(grad_output, "shape"):
            raise TypeError(f"grad_output: expected a number or an array, got {type(grad_output).__name__}")
        want = shape[:-1] if reduction == "none" else ()
        if tuple(grad_output.shape) != want:
            raise ValueError(f"grad_output: expected shape {want} for reduction={reduction!r}, "
                             f"got {tuple(grad_output.shape)}")
        if dtype_name(grad_output) not in FLOAT_DTYPES:
            raise TypeError(f"grad_output: dtype {dtype_name(grad_output)} is not a float dtype")
    if inplace and out is not None:
        raise ValueError("out: cannot be combined with inplace=True (the gradient goes into logits)")
    check_out(out, shape, dt)
    per_row = check_class_mask(class_mask, shape)
    return CERequest(logits, target, dt, soft, weight, ignore_index, reduction, label_smoothing,
                     z_loss, softcap, validate, want_grad, grad_output, inplace, out,
                     class_mask, bool(per_row))


def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            import numpy as np
            if isinstance(value, np.generic) and np.issubdtype(type(value), np.floating):
                return float(value)
        except ImportError:  # pragma: no cover
            pass
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    return float(value)
