"""Public functions: check arguments, pick the backend, hand over."""
from . import _checks
from ._dispatch import backend_for

_CE_DOC_KEYWORDS = """
    weight : (C,) float array or None -- per-class weights, as in PyTorch.
    ignore_index : int -- rows whose target equals it add no loss and get a zero gradient.
    reduction : 'mean' | 'sum' | 'none'.
    label_smoothing : float in [0, 1].
    z_loss : float >= 0 -- adds z_loss * logsumexp**2 per kept row.
    softcap : float > 0 or None -- logits become softcap * tanh(logits / softcap) first.
    validate : bool or None -- on the GPU, True checks the targets (a host sync). The CPU
        always checks them.
    class_mask : bool array of shape (C,) or logits.shape, or None -- True marks the classes
        that take part; the others are left out of the softmax (probability and gradient
        exactly 0) and of label smoothing (eps spreads over the live classes). A kept row
        whose target is masked, probability mass on a masked class, or a kept row with
        every class masked: ValueError on the CPU (and on the GPU with validate=True for
        masked targets); otherwise a NaN loss on the GPU (see the README).
"""

_MASK_DOC = """
    class_mask : bool array of shape (C,) or x.shape, or None -- True marks the classes
        that take part. Masked classes get softmax 0 and log_softmax -inf, and are never
        read into the sums. A row with every class masked: ValueError on the CPU; softmax
        0 and log_softmax -inf on the GPU.
"""


def softmax(x, axis=-1, *, out=None, class_mask=None):
    """Softmax along ``axis``; same array type, shape and dtype as ``x``."""
    return _softmax(x, axis, out, log=False, class_mask=class_mask)


def log_softmax(x, axis=-1, *, out=None, class_mask=None):
    """Log-softmax along ``axis``; same array type, shape and dtype as ``x``."""
    return _softmax(x, axis, out, log=True, class_mask=class_mask)


softmax.__doc__ += _MASK_DOC
log_softmax.__doc__ += _MASK_DOC


def _softmax(x, axis, out, log, class_mask=None):
    backend = backend_for(x, "x")
    dt = _checks.check_float_logits(x, "x")
    axis = _checks.normalize_axis(axis, len(x.shape))
    _checks.check_out(out, x.shape, dt)
    for name, arr in (("out", out), ("class_mask", class_mask)):
        if arr is not None:
            backend_for(arr, name) is backend or _different_devices(name)
            backend.check_same_device(x, arr, name)
    if class_mask is None:
        return backend.softmax(x, axis, dt, out, log)
    per_row = _checks.check_class_mask(class_mask, tuple(x.shape), axis)
    return backend.softmax(x, axis, dt, out, log, class_mask, per_row)


def logsumexp(x, axis=-1):
    """log(sum(exp(x))) along ``axis``, which is removed; float32 (float64 for float64)."""
    backend = backend_for(x, "x")
    dt = _checks.check_float_logits(x, "x")
    axis = _checks.normalize_axis(axis, len(x.shape))
    return backend.logsumexp(x, axis, dt)


def cross_entropy(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, softcap=None, validate=None, class_mask=None):
    """Cross-entropy loss of ``logits`` (..., C) against class indices or probabilities.

    Returns one loss per row for reduction='none', else a 0-d array of the input's library,
    float32 (float64 for float64 logits). A mean over rows that are all ignored is 0.0.
    """
    req = _request(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                   softcap, validate, want_grad=False, class_mask=class_mask)
    loss, _ = req_backend(req).cross_entropy(req)
    return loss


def cross_entropy_with_grad(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                            label_smoothing=0.0, z_loss=0.0, softcap=None, validate=None,
                            grad_output=None, inplace=False, out=None, class_mask=None):
    """Loss and its gradient with respect to ``logits`` in one fused pass: ``(loss, grad)``.

    grad_output : scaling of the gradient -- shape logits.shape[:-1] for reduction='none'
        (default ones), a scalar otherwise (default 1).
    inplace : write the gradient into ``logits`` itself; the returned grad shares its memory.
    out : a preallocated gradient buffer with the logits' shape and dtype.
    """
    req = _request(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                   softcap, validate, want_grad=True, grad_output=grad_output, inplace=inplace,
                   out=out, class_mask=class_mask)
    return req_backend(req).cross_entropy(req)


cross_entropy.__doc__ += _CE_DOC_KEYWORDS
cross_entropy_with_grad.__doc__ += _CE_DOC_KEYWORDS


def _request(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
             validate, want_grad, grad_output=None, inplace=False, out=None, class_mask=None):
    backend = backend_for(logits, "logits")
    req = _checks.check_cross_entropy(logits, target, weight, ignore_index, reduction,
                                      label_smoothing, z_loss, softcap, validate, want_grad,
                                      grad_output, inplace, out, class_mask)
    for name, arr in (("target", target), ("weight", weight), ("grad_output", grad_output),
                      ("out", out), ("class_mask", class_mask)):
        if arr is None or isinstance(arr, (int, float)):
            continue
        if backend_for(arr, name) is not backend:
            _different_devices(name)
        backend.check_same_device(logits, arr, name)
    req.backend = backend
    return req


def req_backend(req):
    return req.backend


def _different_devices(name):
    raise TypeError(f"{name}: is on a different device (or array library) than the logits")
