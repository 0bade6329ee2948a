"""Linear layer + cross-entropy in row chunks, never holding the full (N, V) logits.

For numpy arrays (CPU) and CuPy arrays (GPU). Each chunk of rows runs
``logits = hidden_c @ classifier.T (+ bias)`` with the array library's own matmul, gpuce's
fused kernel in place on those logits, then ``grad_hidden_c = g @ classifier`` and
``grad_classifier += g.T @ hidden_c``, accumulated in fp32 (fp64 for fp64). numpy has no
bf16/fp16 BLAS, so half inputs run their matmuls in fp32 on upcast chunks (exact products,
slower than torch's half GEMMs). The torch version, with autograd, is
``gpuce.torch.linear_cross_entropy``.
"""
import numpy as np

from . import _checks
from ._chunking import check_chunking, kernel_on_chunk, mean_plan, rows_per_chunk

_HALF = ("float16", "bfloat16")
_V_BLOCK = 4096  # classifier rows per block of the weight-gradient update (bounds its temporary)


def _xp(a):
    if isinstance(a, np.ndarray):
        return np
    try:
        import cupy
        return cupy.get_array_module(a)
    except ImportError:
        raise TypeError(f"hidden: expected a numpy or CuPy array, got {type(a).__name__} "
                        "(torch tensors: use gpuce.torch.linear_cross_entropy)") from None


def _acc_dtype(dt):
    return np.float64 if dt == "float64" else np.float32


def _check(hidden, classifier, target, bias):
    dt = _checks.check_float_logits(hidden, "hidden")
    if len(hidden.shape) < 1:
        raise ValueError("hidden: expected shape (..., H), got a 0-d array")
    h = hidden.shape[-1]
    _checks.check_float_logits(classifier, "classifier")
    if len(classifier.shape) != 2 or classifier.shape[1] != h:
        raise ValueError(f"classifier: expected shape (V, {h}) (nn.Linear.weight layout), "
                         f"got {tuple(classifier.shape)}")
    if _checks.dtype_name(classifier) != dt:
        raise TypeError(f"classifier: dtype {_checks.dtype_name(classifier)} differs from "
                        f"hidden's {dt}")
    if bias is not None:
        _checks.check_float_logits(bias, "bias")
        if tuple(bias.shape) != (classifier.shape[0],):
            raise ValueError(f"bias: expected shape ({classifier.shape[0]},), got {tuple(bias.shape)}")
        if _checks.dtype_name(bias) != dt:
            raise TypeError(f"bias: dtype {_checks.dtype_name(bias)} differs from hidden's {dt}")
    if not hasattr(target, "shape"):
        raise TypeError(f"target: expected an array, got {type(target).__name__}")
    return dt


def linear_cross_entropy(hidden, classifier, target, *, bias=None, weight=None, ignore_index=-100,
                         reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
                         validate=None, chunk_rows=None, memory_budget_bytes=None):
    """Cross-entropy of ``hidden @ classifier.T (+ bias)`` against ``target``, by row chunks.

    hidden (..., H); classifier (V, H) (``nn.Linear.weight``'s layout); bias (V,) or None;
    target class indices of shape hidden.shape[:-1] or probabilities (..., V). The other
    keywords are gpuce.cross_entropy's. chunk_rows : rows per chunk; by default as many as
    fit ``memory_budget_bytes`` (24 MiB) of per-chunk logits.
    """
    return _run(hidden, classifier, target, bias, weight, ignore_index, reduction,
                label_smoothing, z_loss, softcap, validate, chunk_rows, memory_budget_bytes,
                None, want_grad=False)[0]


def linear_cross_entropy_with_grad(hidden, classifier, target, *, bias=None, weight=None,
                                   ignore_index=-100, reduction="mean", label_smoothing=0.0,
                                   z_loss=0.0, softcap=None, validate=None, grad_output=None,
                                   chunk_rows=None, memory_budget_bytes=None):
    """``(loss, grad_hidden, grad_classifier, grad_bias)``; grad_bias is None without a bias.

    grad_output scales the gradients as in gpuce.cross_entropy_with_grad (row shape for
    reduction='none'). Gradients have their input's dtype; the classifier's and the bias's
    are accumulated over chunks in fp32 (fp64 for fp64) and rounded once.
    """
    return _run(hidden, classifier, target, bias, weight, ignore_index, reduction,
                label_smoothing, z_loss, softcap, validate, chunk_rows, memory_budget_bytes,
                grad_output, want_grad=True)


def _run(hidden, classifier, target, bias, weight, ignore_index, reduction, label_smoothing,
         z_loss, softcap, validate, chunk_rows, memory_budget_bytes, grad_output, want_grad):
    xp = _xp(hidden)
    dt = _check(hidden, classifier, target, bias)
    check_chunking(chunk_rows, memory_budget_bytes)
    if not isinstance(reduction, str) or reduction not in _checks.REDUCTIONS:
        raise ValueError(f"reduction: {reduction!r} is not one of {_checks.REDUCTIONS}")
    acc = _acc_dtype(dt)
    n_h = hidden.shape[-1]
    n_cls = classifier.shape[0]
    row_shape = tuple(hidden.shape[:-1])
    h2 = hidden.reshape(-1, n_h)
    n = h2.shape[0]
    soft = not _checks.is_integer_dtype(_checks.dtype_name(target))
    want_t = row_shape + (n_cls,) if soft else row_shape
    if tuple(target.shape) != want_t:
        raise ValueError(f"target: expected shape {want_t}, got {tuple(target.shape)}")
    t2 = target.reshape(-1, n_cls) if soft else target.reshape(-1)

    # Half precision: numpy has no half BLAS, so matmuls run in fp32 on upcast operands.
    half = dt in _HALF
    mm_dt = acc if half else classifier.dtype
    cls = classifier.astype(acc) if half else classifier
    b = None if bias is None else bias.astype(acc)
    w = None if weight is None else xp.asarray(weight).astype(acc)

    if reduction == "mean":
        w, loss_factor = mean_plan(t2, w, ignore_index, n, soft, lambda a: xp.asarray(a, dtype=acc))
    else:
        loss_factor = 1.0
    chunk_reduction = "none" if reduction == "none" else "sum"
    go_rows, scale = None, xp.asarray(loss_factor, dtype=acc)
    if want_grad and grad_output is not None:
        if reduction == "none":
            go_rows = xp.asarray(grad_output)
            if tuple(go_rows.shape) != row_shape:
                raise ValueError(f"grad_output: expected shape {row_shape}, got {tuple(go_rows.shape)}")
            go_rows = go_rows.reshape(-1)
        else:
            go = xp.asarray(grad_output, dtype=acc)
            if go.shape != ():
                raise ValueError(f"grad_output: expected a scalar for reduction={reduction!r}, "
                                 f"got shape {tuple(go.shape)}")
            scale = xp.asarray(scale * go, dtype=acc)  # a 0-d array, not a numpy scalar

    # bytes per logit held per chunk: matmul output, plus the kernel's half copy
    per_logit = np.dtype(mm_dt).itemsize + (hidden.dtype.itemsize if half else 0)
    c = rows_per_chunk(n, n_cls, per_logit, chunk_rows, memory_budget_bytes) if n else 1
    logits_buf = xp.empty((c, n_cls), dtype=mm_dt)                              # matmul output
    ce_buf = xp.empty((c, n_cls), dtype=hidden.dtype) if half else logits_buf   # kernel, in place
    loss_rows = xp.empty(n, dtype=acc) if reduction == "none" else None
    loss_sum = xp.zeros((), dtype=np.float64 if xp is np else acc)
    loss_out, go_all = (loss_rows, go_rows) if reduction == "none" else (loss_sum, scale)
    if want_grad:
        grad_h = xp.empty((n, n_h), dtype=hidden.dtype)
        grad_c = xp.zeros((n_cls, n_h), dtype=acc)
        grad_b = None if bias is None else xp.zeros(n_cls, dtype=acc)
        block = xp.empty((min(_V_BLOCK, n_cls), n_h), dtype=acc)
    kw = dict(weight=w, ignore_index=ignore_index, reduction=chunk_reduction,
              label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, validate=validate)
    for start in range(0, n, c):
        stop = min(start + c, n)
        h_c = h2[start:stop].astype(acc) if half else h2[start:stop]
        logits = logits_buf[:stop - start]
        xp.matmul(h_c, cls.T, out=logits)
        if b is not None:
            logits += b
        ce_in = ce_buf[:stop - start]
        if half:
            ce_in[...] = logits  # the kernel sees logits rounded to the input dtype
        g = kernel_on_chunk(ce_in, t2, slice(start, stop), want_grad, go_all, loss_out, kw)
        if not want_grad:
            continue
        if half:
            logits[...] = g  # the matmuls run on the gradient upcast to fp32
            g = logits
            grad_h[start:stop] = xp.matmul(g, cls)
        else:
            xp.matmul(g, cls, out=grad_h[start:stop])
        for v0 in range(0, n_cls, _V_BLOCK):  # grad_c += g.T @ h_c, one bounded block at a time
            v1 = min(v0 + _V_BLOCK, n_cls)
            blk = block[:v1 - v0]
            xp.matmul(g[:, v0:v1].T, h_c, out=blk)
            grad_c[v0:v1] += blk
        if grad_b is not None:
            grad_b += g.sum(axis=0, dtype=acc)

    if reduction == "none":
        loss = loss_rows.reshape(row_shape)
    else:
        loss = (loss_sum * xp.asarray(loss_factor, dtype=loss_sum.dtype)).astype(acc)
    if not want_grad:
        return (loss,)
    grad_c = grad_c.astype(classifier.dtype, copy=False)
    grad_b = None if grad_b is None else grad_b.astype(bias.dtype, copy=False)
    return loss, grad_h.reshape(hidden.shape), grad_c, grad_b
