"""torch: linear layer + cross-entropy by row chunks, with autograd (``gpuce.torch.linear_cross_entropy``).

Each chunk of rows: ``logits = hidden_c @ classifier.T (+ bias)`` (torch's matmul, into one
reused buffer), gpuce's fused kernel in place, ``grad_hidden_c = g @ classifier`` (written
into its rows of grad_hidden) and ``grad_classifier += g.T @ hidden_c`` summed in one fp32
(fp64 for fp64) buffer (``ClassifierGrad``): ``addmm_`` for fp32/fp64; for bf16/fp16 every
matmul runs in the input dtype (fp32 accumulation inside the GEMM, each chunk's product
rounded once) and the products are added in fp32 -- no [V, H] temporary per chunk. The
full (N, V) logits never exist.

For 'mean' and 'sum' the forward computes the gradients (with grad_output 1) and the
backward scales them by grad_output, as gpuce.torch.cross_entropy does. For 'none' the
gradients depend on the per-row grad_output, so the forward computes only the loss and the
backward recomputes each chunk's logits with the real grad_output.

Operators (``torch.library.custom_op``, with fake implementations for torch.compile):
- ``gpuce::linear_ce_fwd``  -> (loss, grad_hidden, grad_classifier, grad_bias)   mean/sum
- ``gpuce::linear_ce``      -> loss                                             no grads
- ``gpuce::linear_ce_bwd``  (…, grad_output) -> (grad_hidden, grad_classifier, grad_bias)
"""
from typing import Optional

import torch
from torch import Tensor

from . import _cpu
from ._chunking import check_chunking, kernel_on_chunk, mean_plan, rows_per_chunk

_NO_BIAS = (0,)  # custom ops cannot return None: "no bias" gives an empty grad_bias


def acc_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class ClassifierGrad:
    """``Σ_chunks g.T @ h_c`` (and ``Σ g`` for the bias), summed in fp32 (fp64 for fp64).

    fp32/fp64: ``addmm_`` into the accumulator. Half dtypes: each chunk's product is one
    GEMM in the input dtype, which accumulates in fp32 inside and rounds once (torch's CPU
    has no half GEMM with an fp32 output, and its fp32 GEMM is ~4x slower than bf16). The
    product goes into the returned gradient's own buffer, then into the fp32 sum; the buffer
    receives the rounded sum at the end. No [V, H] temporary besides the accumulator.
    """

    def __init__(self, classifier, bias):
        acc = acc_dtype(classifier)
        dev = classifier.device
        self.half = classifier.dtype != acc
        self.sum_c = torch.zeros(classifier.shape, dtype=acc, device=dev)
        self.sum_b = None if bias is None else torch.zeros(bias.shape, dtype=acc, device=dev)
        if self.half:
            self.out_c = torch.empty(classifier.shape, dtype=classifier.dtype, device=dev)
            self.out_b = None if bias is None else torch.empty(bias.shape, dtype=bias.dtype,
                                                               device=dev)

    def add(self, g, h_c):
        """Adds one chunk: g (rows, V) and h_c (rows, H), both in the classifier's dtype."""
        if not self.half:
            self.sum_c.addmm_(g.t(), h_c)
            if self.sum_b is not None:
                self.sum_b += g.sum(0)
            return
        torch.matmul(g.t(), h_c, out=self.out_c)
        _widening_add(self.sum_c, self.out_c)
        if self.sum_b is not None:
            torch.sum(g, 0, out=self.out_b)  # fp32 inside, rounded once, as the GEMM
            self.sum_b += self.out_b

    def result(self):
        """(grad_classifier, grad_bias or None) in the classifier's dtype."""
        if not self.half:
            return self.sum_c, self.sum_b
        self.out_c.copy_(self.sum_c)
        if self.out_b is not None:
            self.out_b.copy_(self.sum_b)
        return self.out_c, self.out_b


def _scale_for(reduction, t2, weight, ignore_index, n_rows, soft, acc, device):
    """(weight for every chunk, loss factor): see gpuce._chunking.mean_plan."""
    w = None if weight is None else weight.to(acc)
    if reduction != "mean":
        return w, torch.ones((), dtype=acc, device=device)
    w, factor = mean_plan(t2, w, ignore_index, n_rows, soft, lambda a: a.to(acc))
    return w, torch.as_tensor(factor, dtype=acc, device=device)


def chunked_linear_ce(hidden, classifier, target, bias, weight, ignore_index, reduction,
                      label_smoothing, z_loss, softcap, chunk_rows, want_grad, grad_output=None):
    """The chunk loop. Returns (loss, grad_hidden, grad_classifier, grad_bias or None);
    the grads are None when ``want_grad`` is False. ``grad_output`` is None (ones) or a
    row-shaped tensor for reduction 'none', None (1) for mean/sum."""
    n_h = hidden.shape[-1]
    n_cls = classifier.shape[0]
    h2 = hidden.reshape(-1, n_h)
    n = h2.shape[0]
    soft = target.is_floating_point()
    t2 = target.reshape(-1, n_cls) if soft else target.reshape(-1)
    acc = acc_dtype(hidden)
    dev = hidden.device
    w, factor = _scale_for(reduction, t2, weight, ignore_index, n, soft, acc, dev)
    chunk_reduction = "none" if reduction == "none" else "sum"
    go_rows = None if grad_output is None else grad_output.reshape(-1)
    c = max(1, min(chunk_rows, n))
    logits_buf = torch.empty((c, n_cls), dtype=hidden.dtype, device=dev)
    loss_rows = torch.empty(n, dtype=acc, device=dev) if reduction == "none" else None
    loss_sum = torch.zeros((), dtype=acc, device=dev)
    loss_out, go_all = (loss_rows, go_rows) if reduction == "none" else (loss_sum, factor)
    grad_h = weight_grad = None
    if want_grad:
        grad_h = torch.empty((n, n_h), dtype=hidden.dtype, device=dev)
        weight_grad = ClassifierGrad(classifier, bias)
    kw = dict(weight=w, ignore_index=ignore_index, reduction=chunk_reduction,
              label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    cls_t = classifier.t()
    for start in range(0, n, c):
        stop = min(start + c, n)
        h_c = h2[start:stop]
        logits = logits_buf[:stop - start]
        if bias is None:
            torch.matmul(h_c, cls_t, out=logits)
        else:
            torch.addmm(bias, h_c, cls_t, out=logits)
        g = kernel_on_chunk(logits, t2, slice(start, stop), want_grad, go_all, loss_out, kw)
        if not want_grad:
            continue
        torch.matmul(g, classifier, out=grad_h[start:stop])
        weight_grad.add(g, h_c)
    loss = loss_rows.reshape(hidden.shape[:-1]) if reduction == "none" else loss_sum * factor
    if not want_grad:
        return loss, None, None, None
    del logits_buf  # freed before the accumulators are rounded to their dtypes
    grad_c, grad_b = weight_grad.result()
    return loss, grad_h.reshape(hidden.shape), grad_c, grad_b


def _widening_add(total, part):
    if total.device.type == "cpu":
        _cpu.add_into(total, part)  # torch's CPU add would widen all of part into a copy first
    else:
        total += part  # its GPU kernels widen on the fly


# ---- the operators --------------------------------------------------------------------

def _empty_bias(hidden):
    return hidden.new_empty(_NO_BIAS)


@torch.library.custom_op("gpuce::linear_ce_fwd", mutates_args=())
def _linear_ce_fwd(hidden: Tensor, classifier: Tensor, target: Tensor, bias: Optional[Tensor],
                   weight: Optional[Tensor], ignore_index: int, reduction: str,
                   label_smoothing: float, z_loss: float, softcap: Optional[float],
                   chunk_rows: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    loss, gh, gc, gb = chunked_linear_ce(hidden, classifier, target, bias, weight, ignore_index,
                                         reduction, label_smoothing, z_loss, softcap,
                                         chunk_rows, True)
    return loss, gh, gc, (_empty_bias(hidden) if gb is None else gb)


@_linear_ce_fwd.register_fake
def _linear_ce_fwd_fake(hidden, classifier, target, bias, weight, ignore_index, reduction,
                        label_smoothing, z_loss, softcap, chunk_rows):
    loss = hidden.new_empty((), dtype=acc_dtype(hidden))
    gb = _empty_bias(hidden) if bias is None else torch.empty_like(bias)
    return loss, torch.empty_like(hidden), torch.empty_like(classifier), gb


@torch.library.custom_op("gpuce::linear_ce", mutates_args=())
def _linear_ce_loss(hidden: Tensor, classifier: Tensor, target: Tensor, bias: Optional[Tensor],
                    weight: Optional[Tensor], ignore_index: int, reduction: str,
                    label_smoothing: float, z_loss: float, softcap: Optional[float],
                    chunk_rows: int) -> Tensor:
    return chunked_linear_ce(hidden, classifier, target, bias, weight, ignore_index, reduction,
                             label_smoothing, z_loss, softcap, chunk_rows, False)[0]


@_linear_ce_loss.register_fake
def _linear_ce_loss_fake(hidden, classifier, target, bias, weight, ignore_index, reduction,
                         label_smoothing, z_loss, softcap, chunk_rows):
    shape = tuple(hidden.shape[:-1]) if reduction == "none" else ()
    return hidden.new_empty(shape, dtype=acc_dtype(hidden))


@torch.library.custom_op("gpuce::linear_ce_bwd", mutates_args=())
def _linear_ce_bwd(hidden: Tensor, classifier: Tensor, target: Tensor, bias: Optional[Tensor],
                   weight: Optional[Tensor], ignore_index: int, reduction: str,
                   label_smoothing: float, z_loss: float, softcap: Optional[float],
                   chunk_rows: int, grad_output: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    _, gh, gc, gb = chunked_linear_ce(hidden, classifier, target, bias, weight, ignore_index,
                                      reduction, label_smoothing, z_loss, softcap, chunk_rows,
                                      True, grad_output=grad_output)
    return gh, gc, (_empty_bias(hidden) if gb is None else gb)


@_linear_ce_bwd.register_fake
def _linear_ce_bwd_fake(hidden, classifier, target, bias, weight, ignore_index, reduction,
                        label_smoothing, z_loss, softcap, chunk_rows, grad_output):
    gb = _empty_bias(hidden) if bias is None else torch.empty_like(bias)
    return torch.empty_like(hidden), torch.empty_like(classifier), gb


_ONCE = ("gpuce.torch.linear_cross_entropy is differentiable only once (its backward uses "
         "gradients the forward computed)")


def _fwd_setup(ctx, inputs, output):
    _, gh, gc, gb = output
    ctx.has_bias = inputs[3] is not None
    ctx.save_for_backward(gh, gc, gb)
    ctx.set_materialize_grads(False)


def _fwd_backward(ctx, grad_loss, *grad_grads):
    if any(g is not None for g in grad_grads):
        raise RuntimeError(_ONCE)
    if grad_loss is None:
        return (None,) * 11
    gh, gc, gb = ctx.saved_tensors
    # loss.backward() in eager mode: the gradients as computed (reading grad_loss is a
    # data-dependent guard when torch.compile traces this backward, so not there)
    if (grad_loss.device.type == "cpu" and not torch.compiler.is_compiling()
            and float(grad_loss) == 1.0):
        return (gh, gc, None, gb if ctx.has_bias else None) + (None,) * 7
    go = grad_loss.to(acc_dtype(gh))
    gb_out = (gb * go).to(gb.dtype) if ctx.has_bias else None
    return ((gh * go).to(gh.dtype), (gc * go).to(gc.dtype), None, gb_out) + (None,) * 7


_linear_ce_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


def _loss_setup(ctx, inputs, output):
    ctx.args = inputs[4:]
    ctx.has_bias = inputs[3] is not None
    ctx.save_for_backward(*inputs[:4])


def _loss_backward(ctx, grad_loss):
    hidden, classifier, target, bias = ctx.saved_tensors
    if ctx.args[2] != "none":  # mean/sum without a grad in the forward: cannot happen
        raise RuntimeError("gpuce::linear_ce: reduction 'mean'/'sum' uses linear_ce_fwd for grads")
    gh, gc, gb = _linear_ce_bwd(hidden, classifier, target, bias, *ctx.args, grad_loss)
    return (gh, gc, None, gb if ctx.has_bias else None) + (None,) * 7


_linear_ce_loss.register_autograd(_loss_backward, setup_context=_loss_setup)


# ---- public API -----------------------------------------------------------------------

def _check(hidden, classifier, target, bias, weight):
    for name, t in (("hidden", hidden), ("classifier", classifier), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch tensor, got {type(t).__name__}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden: dtype {hidden.dtype} is not a float dtype")
    if hidden.dim() < 1:
        raise ValueError("hidden: expected shape (..., H), got a 0-d tensor")
    n_h = hidden.shape[-1]
    if classifier.dim() != 2 or classifier.shape[1] != n_h:
        raise ValueError(f"classifier: expected shape (V, {n_h}) (nn.Linear.weight layout), "
                         f"got {tuple(classifier.shape)}")
    if classifier.dtype != hidden.dtype:
        raise TypeError(f"classifier: dtype {classifier.dtype} differs from hidden's {hidden.dtype}")
    n_cls = classifier.shape[0]
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (n_cls,):
            raise ValueError(f"bias: expected a tensor of shape ({n_cls},)")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias: dtype {bias.dtype} differs from hidden's {hidden.dtype}")
    want = tuple(hidden.shape[:-1]) + ((n_cls,) if target.is_floating_point() else ())
    if tuple(target.shape) != want:
        raise ValueError(f"target: expected shape {want}, got {tuple(target.shape)}")
    for name, t in (("target", target), ("weight", weight)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name}: requires grad, but gpuce.torch.linear_cross_entropy "
                             f"differentiates only hidden, classifier and bias; pass {name}.detach()")
    for name, t in (("classifier", classifier), ("target", target), ("bias", bias),
                    ("weight", weight)):
        if t is not None and t.device != hidden.device:
            raise TypeError(f"{name}: is on a different device than hidden")


def linear_cross_entropy(hidden: Tensor, classifier: Tensor, target: Tensor,
                         bias: Optional[Tensor] = None, *, weight: Optional[Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: Optional[float] = None, chunk_rows: Optional[int] = None,
                         memory_budget_bytes: Optional[int] = None) -> Tensor:
    """Cross-entropy of ``hidden @ classifier.T (+ bias)`` by row chunks, with autograd to
    hidden, classifier and bias; the (N, V) logits are never materialised.

    hidden (..., H); classifier (V, H) (``nn.Linear.weight``'s layout); bias (V,) or None;
    target: class indices of shape hidden.shape[:-1], or probabilities (..., V).
    weight, ignore_index, reduction, label_smoothing, z_loss, softcap: as in
    gpuce.torch.cross_entropy. chunk_rows: rows per chunk; by default as many as fit
    ``memory_budget_bytes`` (24 MiB) of chunk logits, evened out over the chunks. The
    classifier's and bias's gradients are summed over chunks in fp32 (fp64 for fp64) and
    rounded once; in bf16/fp16 each chunk's product is a GEMM in that dtype (fp32 inside,
    rounded once per chunk).
    Works under ``torch.compile(fullgraph=True)``.
    """
    from .torch import _check_options
    label_smoothing, z_loss, softcap = _check_options(reduction, label_smoothing, z_loss,
                                                      softcap, ignore_index)
    check_chunking(chunk_rows, memory_budget_bytes)
    _check(hidden, classifier, target, bias, weight)
    n_rows = hidden.numel() // max(1, hidden.shape[-1])
    rows = rows_per_chunk(n_rows, classifier.shape[0], hidden.element_size(), chunk_rows,
                          memory_budget_bytes)
    args = (hidden, classifier, target, bias, weight, ignore_index, reduction, label_smoothing,
            z_loss, softcap, rows)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, classifier, bias))
    if needs_grad and reduction != "none":
        return _linear_ce_fwd(*args)[0]
    return _linear_ce_loss(*args)
