"""PyTorch integration: gpuce's fused cross-entropy as an autograd-aware, compile-friendly op.

``import gpuce.torch`` (``import gpuce`` alone never imports torch)::

    import gpuce.torch as gt
    loss = gt.cross_entropy(logits, target)          # like F.cross_entropy, class axis last
    loss.backward()

    criterion = gt.CrossEntropyLoss(ignore_index=-100, label_smoothing=0.1, z_loss=1e-4)

How it works
------------
The forward runs gpuce's fused kernel, which produces the loss *and* the gradient with
respect to the logits in one pass over them; the gradient is saved for the backward, which
owns that buffer: it returns it as is when ``grad_output`` is 1 (read on the CPU only),
and otherwise scales it in place in one pass (on CUDA always, without a host sync). Only
when the graph is kept (``retain_graph=True``) does the product go to a new buffer. Eagerly
this runs as plain autograd Functions (cheapest per call; a small CPU call with the default
options goes straight to the short-row kernel on the tensors' addresses, see
``_short_rows_call``); under ``torch.compile`` the
kernels run behind ``torch.library.custom_op`` operators, so the compiler (``fullgraph=True``
included) treats them as opaque calls with a fake (meta) implementation and never breaks
the graph:

- ``gpuce::cross_entropy_fwd``   (logits, target, ...) -> (loss, grad)   the training op
- ``gpuce::cross_entropy``       (logits, target, ...) -> loss           no gradient wanted
- ``gpuce::cross_entropy_fwd_``  mutates logits into the gradient, -> loss  (inplace=True)
- ``gpuce::scale_grad``          (grad, grad_output) -> grad * grad_output   the backward

Differences from ``torch.nn.functional.cross_entropy``
------------------------------------------------------
- The class axis is *last*: logits ``(..., C)``, class-index targets ``logits.shape[:-1]``
  or probability targets ``logits.shape``. (PyTorch puts classes on axis 1 for
  ``(N, C, d1, ...)``; use ``logits.movedim(1, -1)`` to convert.)
- The loss is float32 for float16/bfloat16/float32 logits, float64 for float64 logits:
  it is accumulated in fp32 and not rounded back to a half type. PyTorch returns the
  logits' dtype (except under autocast, where its cross entropy runs in fp32, as here).
  ``loss.to(logits.dtype)`` gives PyTorch's dtype. The gradient has the logits' dtype.
- A mean over rows that are all ``ignore_index`` is 0.0 with a zero gradient (PyTorch: NaN).
- ``z_loss``, ``softcap`` and ``class_mask`` are extra options (see ``gpuce.cross_entropy``).
- Gradients flow to the logits only. A ``weight`` or probability ``target`` that requires
  grad is refused with a ValueError rather than silently getting no gradient.
- It is differentiable once: differentiating the gradient again (double backward, e.g. a
  gradient penalty built with ``create_graph=True``) raises a RuntimeError.

``inplace=True``
----------------
The gradient is written into the logits' own memory during the forward, so no gradient
buffer is allocated; the logits tensor then holds d(loss)/d(logits) (unscaled), and autograd
is told (``ctx.mark_dirty``). This is safe only when nothing else needs the logits' values:
- logits that are a leaf requiring grad are refused (ValueError);
- if another op saved the logits for its own backward (e.g. ``logits = torch.tanh(h)``, or
  the logits were also fed to another differentiable op), PyTorch's version counter raises
  "one of the variables needed for gradient computation has been modified by an inplace
  operation" at backward, instead of computing a wrong gradient;
- using the overwritten logits in later differentiable computation raises at backward.
When no gradient is needed (``torch.no_grad()``, or logits that don't require grad) the
logits are left untouched and only the loss is computed. Under ``torch.compile``,
``inplace=True`` runs the functional op and leaves the logits untouched (a mutation inside a
compiled graph would be functionalised into a copy anyway). So the logits' contents after an
``inplace=True`` call are unspecified: never read them.
"""
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

import gpuce
from gpuce import _cpu

__all__ = ["cross_entropy", "CrossEntropyLoss"]

_REDUCTIONS = ("none", "mean", "sum")


def _loss_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _fake_loss(logits, reduction):
    shape = tuple(logits.shape[:-1]) if reduction == "none" else ()
    return logits.new_empty(shape, dtype=_loss_dtype(logits))


def _fake_check(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                softcap, class_mask, want_grad, inplace=False):
    """The shape/dtype checks of the real call, for fake tensors (torch.compile tracing)."""
    from gpuce import _checks
    _checks.check_cross_entropy(logits, target, weight, ignore_index, reduction,
                                label_smoothing, z_loss, softcap, None, want_grad,
                                inplace=inplace, class_mask=class_mask)
    for name, t in (("target", target), ("weight", weight), ("class_mask", class_mask)):
        if t is not None and t.device != logits.device:
            raise TypeError(f"{name}: is on a different device than the logits "
                            f"({t.device} vs {logits.device})")


def _contiguous(t):
    return t if t.is_contiguous() else t.contiguous()


# ---- the operators --------------------------------------------------------------------

@torch.library.custom_op("gpuce::cross_entropy_fwd", mutates_args=())
def _ce_fwd(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
            reduction: str, label_smoothing: float, z_loss: float,
            softcap: Optional[float],
            class_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    loss, grad = gpuce.cross_entropy_with_grad(
        logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, class_mask=class_mask)
    return loss, _contiguous(grad)


@_ce_fwd.register_fake
def _ce_fwd_fake(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                 softcap, class_mask=None):
    _fake_check(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                softcap, class_mask, True)
    return _fake_loss(logits, reduction), torch.empty_like(logits,
                                                           memory_format=torch.contiguous_format)


@torch.library.custom_op("gpuce::cross_entropy", mutates_args=())
def _ce_loss(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
             reduction: str, label_smoothing: float, z_loss: float,
             softcap: Optional[float], class_mask: Optional[Tensor] = None) -> Tensor:
    return gpuce.cross_entropy(
        logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, class_mask=class_mask)


@_ce_loss.register_fake
def _ce_loss_fake(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                  softcap, class_mask=None):
    _fake_check(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                softcap, class_mask, False)
    return _fake_loss(logits, reduction)


@torch.library.custom_op("gpuce::cross_entropy_fwd_", mutates_args=("logits",))
def _ce_fwd_inplace(logits: Tensor, target: Tensor, weight: Optional[Tensor],
                    ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
                    softcap: Optional[float],
                    class_mask: Optional[Tensor] = None) -> Tensor:
    loss, _ = gpuce.cross_entropy_with_grad(
        logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, inplace=True,
        class_mask=class_mask)
    return loss


@_ce_fwd_inplace.register_fake
def _ce_fwd_inplace_fake(logits, target, weight, ignore_index, reduction, label_smoothing,
                         z_loss, softcap, class_mask=None):
    _fake_check(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                softcap, class_mask, True, inplace=True)
    return _fake_loss(logits, reduction)


@torch.library.custom_op("gpuce::scale_grad", mutates_args=())
def _scale_grad(grad: Tensor, grad_output: Tensor) -> Tensor:
    """grad * grad_output, broadcast over the class axis, rounded once to grad's dtype.

    grad_output is a scalar (mean/sum) or has the row shape (none). The product is formed
    in the wider dtype (fp32 loss gradients stay fp32 until the store), so a large
    GradScaler factor does not overflow a half-precision grad_output on the way.
    """
    out = torch.empty_like(grad, memory_format=torch.contiguous_format)
    go = grad_output.reshape(tuple(grad_output.shape) + (1,) * (grad.dim() - grad_output.dim()))
    if go.dim() == 0:  # 0-d logits cannot occur; keep the product well defined anyway
        go = go.reshape(1)
    torch.mul(grad, go, out=out)
    return out


@_scale_grad.register_fake
def _scale_grad_fake(grad, grad_output):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


_DOUBLE_BACKWARD = (
    "gpuce.torch.cross_entropy is differentiable only once: its backward scales a gradient "
    "that the forward already computed, and that gradient has no derivative here. A second "
    "derivative (double backward, e.g. a gradient penalty through torch.autograd.grad(..., "
    "create_graph=True)) is not supported; use torch.nn.functional.cross_entropy for it.")


def _scale_grad_backward(ctx, _):
    raise RuntimeError(_DOUBLE_BACKWARD)


_scale_grad.register_autograd(_scale_grad_backward)


def _fwd_setup_context(ctx, inputs, output):
    _, grad = output
    ctx.save_for_backward(grad)
    ctx.set_materialize_grads(False)


def _fwd_backward(ctx, grad_loss, grad_grad):
    if grad_grad is not None:
        raise RuntimeError("gpuce::cross_entropy_fwd: its gradient output cannot be "
                           "differentiated. " + _DOUBLE_BACKWARD)
    if grad_loss is None:
        return (None,) * 9
    (grad,) = ctx.saved_tensors
    return (_scale_grad(grad, grad_loss),) + (None,) * 8


_ce_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def _keep_graph():
    """True when this backward runs with retain_graph (the saved gradient is needed again)."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else query()


def _go_is_one(grad_output, reduction):
    # read only on the CPU: on CUDA, reading the value would be a host sync
    return (reduction != "none" and grad_output.is_cpu
            and grad_output.numel() == 1 and grad_output.item() == 1.0)


def _backward_scale(grad, grad_output, reduction):
    """The gradient times grad_output, reusing the forward's gradient buffer.

    - grad_output == 1 (every ``loss.backward()`` on the CPU): the saved gradient as is.
    - otherwise one in-place pass over it, unless the graph is kept (retain_graph=True:
      the saved gradient is needed again), where the product goes to a new buffer.
    On CUDA the scale is always one in-place pass, launched without reading grad_output
    on the host. With create_graph the product is the differentiable-once scale_grad op.
    """
    if torch.is_grad_enabled():
        return _DifferentiableOnce.apply(grad, grad_output, torch.empty(0, requires_grad=True))
    if _go_is_one(grad_output, reduction):
        return grad
    if _keep_graph():
        return _scale_grad(grad, grad_output)
    return grad.mul_(_broadcastable(grad_output, grad))


def _broadcastable(grad_output, grad):
    """grad_output with the class axis added; never 0-d, so it takes part in type promotion
    and the product is formed in fp32 (a GradScaler factor would overflow a half go)."""
    return grad_output.reshape(tuple(grad_output.shape) + (1,) * (grad.dim() - grad_output.dim()))


class _DifferentiableOnce(torch.autograd.Function):
    """grad * grad_output under create_graph: the result requires grad (through ``anchor``),
    so that differentiating it again raises instead of silently giving zero."""

    @staticmethod
    def forward(ctx, grad, grad_output, anchor):
        return grad * _broadcastable(grad_output, grad)

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(_DOUBLE_BACKWARD)


class _FusedCrossEntropy(torch.autograd.Function):
    """The eager training path: one fused call in the forward; the backward reuses its
    gradient buffer (see _backward_scale). torch.compile traces gpuce::cross_entropy_fwd.

    The arguments other than the logits come as one tuple ``call``: (target, weight,
    ignore_index, reduction, label_smoothing, z_loss, softcap, class_mask), or (target,
    ignore_index, reduction) for the short-row kernel (_short_rows_call). Autograd handles each
    argument of apply, forward and backward, which a tiny call feels. Neither tensor in it gets
    a gradient (cross_entropy refuses ones that require grad)."""

    @staticmethod
    def forward(ctx, logits, call):
        if len(call) == 3:  # (target, ignore_index, reduction): the short-row kernel
            loss, grad = _short_rows_call(logits, *call)
            reduction = call[2]
        else:
            (target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
             class_mask) = call
            loss, grad = gpuce.cross_entropy_with_grad(
                logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                class_mask=class_mask)
        ctx.save_for_backward(grad)
        ctx.reduction = reduction
        ctx.set_materialize_grads(False)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if grad_loss is None:
            return None, None
        grad = ctx.saved_tensors[0]
        if (ctx.reduction != "none" and grad_loss.is_cpu and grad_loss.item() == 1.0
                and not torch.is_grad_enabled()):
            return grad, None  # every CPU loss.backward(): _backward_scale's first case, inline
        return _backward_scale(grad, grad_loss, ctx.reduction), None


_SHORT_ROW_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def _short_rows_ok(logits, target):
    """Whether gpuce's short-row kernel takes these tensors directly (see _short_rows_call):
    C-contiguous float32/float64 CPU logits with at most SMALL_MAX_C classes, contiguous int64
    class indices of the row shape. Anything else takes the general path, whose checks raise
    the errors."""
    shape = logits.shape
    return (logits.dtype in _SHORT_ROW_DTYPES and logits.is_cpu and len(shape) > 0
            and 0 < shape[-1] <= _cpu.SMALL_MAX_C and logits.is_contiguous()
            and target.dtype == torch.int64 and target.is_cpu and target.is_contiguous()
            and target.shape == shape[:-1])


def _short_rows_call(logits, target, ignore_index, reduction):
    """gpuce.cross_entropy_with_grad for a call _short_rows_ok accepts: the short-row kernel
    (the same one the general path runs) called once on the tensors' addresses, without the
    general path's checks and numpy views, which cost more than the kernel on small
    batches."""
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    n_cls = logits.shape[-1]
    n_rows = grad.numel() // n_cls
    kernel = _cpu.small_kernel_at(_SHORT_ROW_DTYPES[logits.dtype], n_cls)
    if reduction == "none":
        loss = torch.empty(logits.shape[:-1], dtype=logits.dtype)
        loss_at = loss.data_ptr() if n_rows else 0
    else:
        loss_at = 0  # the kernel sums the row losses in float64
    total, bad = kernel(logits.data_ptr(), grad.data_ptr(), target.data_ptr(), loss_at, n_rows,
                        ignore_index, reduction == "mean")
    if bad >= 0:
        _cpu.bad_target(target.reshape(-1).numpy(), bad, n_cls, ignore_index)
    if reduction != "none":
        loss = torch.from_numpy(np.asarray(_cpu.ACC[_SHORT_ROW_DTYPES[logits.dtype]](total)))
    return loss, grad


class _InplaceCrossEntropy(torch.autograd.Function):
    """Writes the gradient into the logits (mark_dirty) and scales it in the backward."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                softcap, class_mask):
        loss, _ = gpuce.cross_entropy_with_grad(
            logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, inplace=True,
            class_mask=class_mask)
        ctx.mark_dirty(logits)
        ctx.save_for_backward(logits)
        ctx.reduction = reduction
        ctx.set_materialize_grads(False)
        return loss, logits

    @staticmethod
    def backward(ctx, grad_loss, grad_logits):
        if grad_logits is not None:
            raise RuntimeError(
                "gpuce.torch.cross_entropy(inplace=True) overwrote the logits with the "
                "gradient, so they cannot be used in later differentiable computation; "
                "use inplace=False, or use the logits before calling it")
        if grad_loss is None:
            return (None,) * 9
        (grad,) = ctx.saved_tensors
        return (_backward_scale(grad, grad_loss, ctx.reduction),) + (None,) * 8


# ---- public API -----------------------------------------------------------------------

def _check_options(reduction, label_smoothing, z_loss, softcap, ignore_index):
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: {reduction!r} is not one of {_REDUCTIONS}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: {label_smoothing} is outside [0, 1]")
    z_loss = float(z_loss)
    if not z_loss >= 0.0:
        raise ValueError(f"z_loss: {z_loss} must be >= 0")
    if softcap is not None:
        softcap = float(softcap)
        if not softcap > 0.0:
            raise ValueError(f"softcap: {softcap} must be > 0 or None")
    return label_smoothing, z_loss, softcap


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                  ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                  softcap: Optional[float] = None, inplace: bool = False,
                  class_mask: Optional[Tensor] = None) -> Tensor:
    """Cross-entropy loss of ``input`` (..., C) -- class axis last -- against ``target``.

    Arguments follow ``torch.nn.functional.cross_entropy`` (``weight``, ``ignore_index``,
    ``reduction``, ``label_smoothing``); ``target`` holds class indices of shape
    ``input.shape[:-1]`` or class probabilities of shape ``input.shape``.

    z_loss : float >= 0 -- adds ``z_loss * logsumexp(row)**2`` per kept row.
    softcap : float > 0 or None -- the logits become ``softcap * tanh(input / softcap)``.
    inplace : write the gradient into ``input``'s memory (see the module docstring).
    class_mask : bool tensor of shape (C,) or ``input.shape``, or None -- True marks the
        classes that take part; the others get probability and gradient exactly 0, and
        label smoothing spreads over the live classes (see ``gpuce.cross_entropy``).

    Returns a 0-d tensor for 'mean'/'sum', a ``input.shape[:-1]`` tensor for 'none';
    float32 (float64 for float64 input). Works on CPU and CUDA tensors in float16, bfloat16,
    float32 and float64, under autograd and ``torch.compile``.
    """
    if (weight is None and class_mask is None and softcap is None and inplace is False
            and label_smoothing.__class__ is float and label_smoothing == 0.0
            and z_loss.__class__ is float and z_loss == 0.0 and ignore_index.__class__ is int
            and reduction in _REDUCTIONS and isinstance(input, Tensor)
            and isinstance(target, Tensor) and input.requires_grad and torch.is_grad_enabled()
            and _short_rows_ok(input, target) and not torch.compiler.is_compiling()):
        # the common small training call, with nothing left to check (an int64 target
        # cannot require grad): the short-row kernel, by its own short argument tuple
        return _apply_fused(input, (target, ignore_index, reduction))
    label_smoothing, z_loss, softcap = _check_options(reduction, label_smoothing, z_loss,
                                                      softcap, ignore_index)
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError("gpuce.torch.cross_entropy: input and target must be torch tensors")
    grad_mode = torch.is_grad_enabled()
    if grad_mode and (target.requires_grad or (weight is not None and weight.requires_grad)):
        name = "target" if target.requires_grad else "weight"
        raise ValueError(f"{name}: requires grad, but gpuce.torch.cross_entropy differentiates "
                         f"only with respect to the input (logits); pass {name}.detach()")
    args = (target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
            class_mask)
    compiling = torch.compiler.is_compiling()
    if grad_mode and not (inplace or compiling) and input.requires_grad:
        if (weight is None and class_mask is None and softcap is None
                and label_smoothing == 0.0 and z_loss == 0.0 and _short_rows_ok(input, target)):
            return _apply_fused(input, (target, ignore_index, reduction))
        return _apply_fused(input, args)
    if not (grad_mode and input.requires_grad):
        if compiling:
            return _ce_loss(input, *args)
        return gpuce.cross_entropy(input, target, weight=weight, ignore_index=ignore_index,
                                   reduction=reduction, label_smoothing=label_smoothing,
                                   z_loss=z_loss, softcap=softcap, class_mask=class_mask)
    if compiling:  # the opaque custom ops; eagerly, plain autograd Functions cost less per call
        loss, _ = _ce_fwd(input, *args)
        return loss
    # here inplace=True, eagerly
    if input.is_leaf:
        raise ValueError(
            "inplace=True: the input is a leaf tensor that requires grad; overwriting it "
            "with the gradient would destroy it. Use inplace=False")
    loss, _ = _InplaceCrossEntropy.apply(input, *args)
    return loss


def _apply_fused(input, call):
    """_FusedCrossEntropy.apply(input, call) without autograd.Function.apply's Python layer,
    which costs more than a small call's kernel (binding default arguments, a walk over the
    arguments for functorch's dead wrappers: done here for the tensors). Under functorch
    transforms, the full apply."""
    if _C_APPLY is None or torch._C._are_functorch_transforms_active():
        return _FusedCrossEntropy.apply(input, call)
    target = _unwrap_if_dead(call[0])
    if len(call) == 3:
        return _C_APPLY(_unwrap_if_dead(input), (target,) + call[1:])
    weight = call[1] if call[1] is None else _unwrap_if_dead(call[1])
    return _C_APPLY(_unwrap_if_dead(input), (target, weight) + call[2:])


try:  # what autograd.Function.apply calls once its Python layer is done
    _C_APPLY = super(torch.autograd.Function, _FusedCrossEntropy).apply
    from torch._C._functorch import unwrap_if_dead as _unwrap_if_dead
except (AttributeError, ImportError):  # pragma: no cover  (another torch layout)
    _C_APPLY = None


class CrossEntropyLoss(nn.Module):
    """``torch.nn.CrossEntropyLoss`` on gpuce's fused kernel, class axis last.

    Arguments: ``weight``, ``ignore_index``, ``reduction``, ``label_smoothing`` as in
    PyTorch, plus ``z_loss``, ``softcap``, ``inplace`` and ``class_mask`` (see
    :func:`cross_entropy`). ``weight`` and ``class_mask`` are registered as buffers, so
    ``.to(device)`` moves them with the module; ``forward(input, target, class_mask=...)``
    takes a mask for one call (a per-row mask, say), which replaces the module's.
    """

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, *,
                 z_loss: float = 0.0, softcap: Optional[float] = None,
                 inplace: bool = False, class_mask: Optional[Tensor] = None):
        super().__init__()
        self.label_smoothing, self.z_loss, self.softcap = _check_options(
            reduction, label_smoothing, z_loss, softcap, ignore_index)
        self.register_buffer("weight", weight)
        self.register_buffer("class_mask", class_mask)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.inplace = bool(inplace)

    def forward(self, input: Tensor, target: Tensor,
                class_mask: Optional[Tensor] = None) -> Tensor:
        return cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                             self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                             inplace=self.inplace,
                             class_mask=self.class_mask if class_mask is None else class_mask)

    def extra_repr(self):
        parts = [f"ignore_index={self.ignore_index}", f"reduction={self.reduction!r}"]
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        if self.inplace:
            parts.append("inplace=True")
        if self.class_mask is not None:
            parts.append(f"class_mask=<{tuple(self.class_mask.shape)} bool>")
        return ", ".join(parts)

# Scale (chunked linear + CE, vocab-parallel CE): separate modules, exposed here.
from .torch_linear import linear_cross_entropy  # noqa: E402
from .torch_vocab_parallel import (  # noqa: E402
    vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy)
__all__ += ["linear_cross_entropy", "vocab_parallel_cross_entropy",
            "vocab_parallel_linear_cross_entropy"]
