"""torch: vocab-parallel cross-entropy over torch.distributed (tensor-parallel classifiers).

``vocab_parallel_cross_entropy(local_logits, target, vocab_start=...)``: each rank holds the
classes [vocab_start, vocab_start + V_local) of every row (shards may be uneven). Forward:
per-row stats from the local logits, ONE all-gather of them (packed in one fp32 tensor,
fp64 for fp64), a merge in rank order on every rank (so the loss is bitwise the same
everywhere). Backward: each rank writes its slice of the gradient, with no collective.
The arithmetic lives in gpuce._vocab_parallel.

``vocab_parallel_linear_cross_entropy(hidden, local_classifier, target, vocab_start=...)``
adds the classifier, chunked as in gpuce.torch.linear_cross_entropy: the forward computes
each row chunk's local logits only to reduce them to stats (one all-gather in all); the
backward recomputes them, and sums grad_hidden over ranks with an asynchronous all-reduce
per row chunk, overlapped with that chunk's local grad_classifier update.

Work is queued on torch's current stream before each collective (NCCL on CUDA, gloo on CPU,
the same code); there is no host sync on the GPU path.
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import _vocab_parallel as vp
from ._chunking import check_chunking, rows_per_chunk
from .torch_linear import ClassifierGrad, acc_dtype


def _all_gather_stats(stats, group):
    """The one collective of the forward: every rank's stats, stacked in rank order."""
    world = dist.get_world_size(group)
    out = stats.new_empty((world * stats.shape[0], stats.shape[1]))  # gloo wants it flat
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch < 2.13
    gather(out, stats.contiguous(), group=group)
    return out.view(world, stats.shape[0], stats.shape[1])


def _kept(target, ignore_index):
    if target.is_floating_point():
        return torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
    return target != ignore_index


def _merge(stats, target, opts, group):
    comb = vp.combine(_all_gather_stats(stats, group), _kept(target, opts["ignore_index"]),
                      soft=target.is_floating_point(), weighted=opts["weight"] is not None,
                      label_smoothing=opts["label_smoothing"], z_loss=opts["z_loss"],
                      reduction=opts["reduction"])
    if stats.device.type == "cpu" and bool(comb.bad.any()):  # the CPU always checks targets
        row = int(comb.bad.nonzero()[0, 0])
        raise ValueError(f"target: class index {int(target[row])} (row {row}) is outside "
                         f"[0, {int(comb.n_classes)}) and is not ignore_index")
    return comb


def _local_stats(x, target, vocab_start, opts):
    z = vp.capped(x, opts["softcap"], acc_dtype(x))
    return z, vp.local_stats(z, target, vocab_start, opts["weight"], opts["ignore_index"],
                             opts["label_smoothing"])


def _local_grad(x, z, target, vocab_start, comb, opts, go):
    return vp.local_grad(z, x, target, vocab_start, opts["weight"], comb,
                         opts["label_smoothing"], opts["softcap"], go, x.dtype)


def _row_go(grad_loss, n):
    return grad_loss.reshape(-1) if grad_loss.dim() else grad_loss.expand(n)


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_logits, target, vocab_start, group, opts):
        shape = local_logits.shape
        x = local_logits.reshape(-1, shape[-1])
        t = target.reshape(-1, shape[-1]) if target.is_floating_point() else target.reshape(-1)
        _, stats = _local_stats(x, t, vocab_start, opts)
        comb = _merge(stats, t, opts, group)
        ctx.save_for_backward(x, t)
        ctx.comb, ctx.opts, ctx.vocab_start, ctx.shape = comb, opts, vocab_start, shape
        loss = comb.loss.reshape(shape[:-1]) if opts["reduction"] == "none" else comb.loss
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # no collective
        x, t = ctx.saved_tensors
        z = vp.capped(x, ctx.opts["softcap"], acc_dtype(x))
        g = _local_grad(x, z, t, ctx.vocab_start, ctx.comb, ctx.opts,
                        _row_go(grad_loss, x.shape[0]))
        return g.reshape(ctx.shape), None, None, None, None


class _VocabParallelLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, classifier, bias, target, vocab_start, group, opts, chunk):
        n_h = hidden.shape[-1]
        h2 = hidden.reshape(-1, n_h)
        v_local = classifier.shape[0]
        t = target.reshape(-1, v_local) if target.is_floating_point() else target.reshape(-1)
        n = h2.shape[0]
        parts = []
        for start in range(0, n, chunk):  # local logits exist one chunk at a time
            x = _logits(h2[start:start + chunk], classifier, bias)
            parts.append(_local_stats(x, _rows(t, start, chunk), vocab_start, opts)[1])
        if parts:
            stats = torch.cat([p[:-1] for p in parts] + [parts[-1][-1:]])
        else:
            stats = _local_stats(h2.new_empty((0, v_local)), t, vocab_start, opts)[1]
        comb = _merge(stats, t, opts, group)
        ctx.save_for_backward(h2, classifier, bias, t)
        ctx.comb, ctx.opts, ctx.vocab_start, ctx.group, ctx.chunk = comb, opts, vocab_start, group, chunk
        ctx.hidden_shape = hidden.shape
        return comb.loss.reshape(hidden.shape[:-1]) if opts["reduction"] == "none" else comb.loss

    @staticmethod
    def backward(ctx, grad_loss):
        h2, classifier, bias, t = ctx.saved_tensors
        comb, opts, chunk = ctx.comb, ctx.opts, ctx.chunk
        n = h2.shape[0]
        acc = acc_dtype(h2)
        go = _row_go(grad_loss, n)
        grad_h = torch.empty(h2.shape, dtype=acc, device=h2.device)  # summed over ranks in fp32
        weight_grad = ClassifierGrad(classifier, bias)
        pending = []
        for start in range(0, n, chunk):
            sl = slice(start, min(start + chunk, n))
            x = _logits(h2[sl], classifier, bias)
            z = vp.capped(x, opts["softcap"], acc)
            comb_c = _rows_of(comb, sl)
            g = _local_grad(x, z, _rows(t, start, chunk), ctx.vocab_start, comb_c, opts, go[sl])
            if g.dtype == acc:
                torch.matmul(g, classifier, out=grad_h[sl])
            else:
                grad_h[sl] = torch.matmul(g, classifier)
            # grad_hidden sums every rank's share: start that now, update grad_classifier meanwhile
            pending.append(dist.all_reduce(grad_h[sl], group=ctx.group, async_op=True))
            weight_grad.add(g, h2[sl])
        for work in pending:
            work.wait()
        grad_c, grad_b = weight_grad.result()
        return (grad_h.to(h2.dtype).reshape(ctx.hidden_shape), grad_c, grad_b,
                None, None, None, None, None)


def _logits(h, classifier, bias):
    return h @ classifier.t() if bias is None else torch.addmm(bias, h, classifier.t())


def _rows(t, start, chunk):
    return t[start:start + chunk]


def _rows_of(comb, sl):
    return vp.Combined(None, comb.lse[sl], comb.coef_p[sl], comb.coef_q[sl], comb.n_classes,
                       comb.bad[sl])


# ---- public API -----------------------------------------------------------------------

def _options(weight, ignore_index, reduction, label_smoothing, z_loss, softcap, vocab_start):
    from .torch import _check_options
    label_smoothing, z_loss, softcap = _check_options(reduction, label_smoothing, z_loss,
                                                      softcap, ignore_index)
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise TypeError(f"vocab_start: expected an int >= 0, got {vocab_start!r}")
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight: requires grad, but only the logits are differentiated; "
                         "pass weight.detach()")
    return dict(weight=weight, ignore_index=ignore_index, reduction=reduction,
                label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)


def _check_target(target, lead_shape, v_local, weight):
    if not isinstance(target, Tensor):
        raise TypeError(f"target: expected a torch tensor, got {type(target).__name__}")
    want = tuple(lead_shape) + ((v_local,) if target.is_floating_point() else ())
    if tuple(target.shape) != want:
        raise ValueError(f"target: expected shape {want} (class ids, or this rank's slice of "
                         f"the probabilities), got {tuple(target.shape)}")
    if weight is not None and tuple(weight.shape) != (v_local,):
        raise ValueError(f"weight: expected this rank's slice, shape ({v_local},), "
                         f"got {tuple(weight.shape)}")


def vocab_parallel_cross_entropy(local_logits: Tensor, target: Tensor, *, vocab_start: int,
                                 group=None, weight: Optional[Tensor] = None,
                                 ignore_index: int = -100, reduction: str = "mean",
                                 label_smoothing: float = 0.0, z_loss: float = 0.0,
                                 softcap: Optional[float] = None) -> Tensor:
    """Cross-entropy over a vocabulary sharded across the ranks of ``group``.

    local_logits (..., V_local): this rank's classes [vocab_start, vocab_start + V_local).
    target: global class ids of shape local_logits.shape[:-1] (the same on every rank), or
    this rank's slice (..., V_local) of class probabilities. weight: this rank's (V_local,)
    slice of the class weights. Other keywords as gpuce.torch.cross_entropy; smoothing uses
    the global class count. One all-gather in the forward, none in the backward; the loss
    is bitwise the same on every rank. Autograd flows to local_logits.
    """
    opts = _options(weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                    vocab_start)
    if not isinstance(local_logits, Tensor) or not local_logits.is_floating_point():
        raise TypeError("local_logits: expected a float torch tensor")
    if local_logits.dim() < 1:
        raise ValueError("local_logits: expected shape (..., V_local)")
    _check_target(target, local_logits.shape[:-1], local_logits.shape[-1], weight)
    return _VocabParallelCE.apply(local_logits, target, vocab_start, group, opts)


def vocab_parallel_linear_cross_entropy(hidden: Tensor, local_classifier: Tensor, target: Tensor,
                                        *, vocab_start: int, group=None,
                                        bias: Optional[Tensor] = None,
                                        weight: Optional[Tensor] = None, ignore_index: int = -100,
                                        reduction: str = "mean", label_smoothing: float = 0.0,
                                        z_loss: float = 0.0, softcap: Optional[float] = None,
                                        chunk_rows: Optional[int] = None,
                                        memory_budget_bytes: Optional[int] = None) -> Tensor:
    """vocab_parallel_cross_entropy of ``hidden @ local_classifier.T (+ bias)``, by row chunks.

    hidden (..., H), the same on every rank; local_classifier (V_local, H) and bias (V_local,)
    are this rank's rows of the classifier. Forward: one all-gather. Backward: grad_hidden is
    summed over ranks by an all-reduce per row chunk (one when the rows fit one chunk), each
    overlapped with that chunk's grad_classifier update (fp32 accumulation).
    """
    opts = _options(weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                    vocab_start)
    check_chunking(chunk_rows, memory_budget_bytes)
    from .torch_linear import _check
    _check(hidden, local_classifier, target, bias, None)
    v_local = local_classifier.shape[0]
    _check_target(target, hidden.shape[:-1], v_local, weight)
    n_rows = hidden.numel() // max(1, hidden.shape[-1])
    per_logit = hidden.element_size() + 8  # the chunk's logits and its fp32 copies
    chunk = rows_per_chunk(n_rows, v_local, per_logit, chunk_rows, memory_budget_bytes)
    return _VocabParallelLinearCE.apply(hidden, local_classifier, bias, target, vocab_start,
                                        group, opts, chunk)
