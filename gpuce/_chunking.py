"""Chunked cross-entropy's shared parts: the chunk size, the kernel on one chunk, the mean's
divisors.

Shared by the numpy/CuPy linear CE (``gpuce.linear``) and the torch ops
(``gpuce.torch_linear``, ``gpuce.torch_vocab_parallel``). Only array methods common to
numpy, CuPy and torch are used, so device arrays stay on the device (no host sync).
"""
from ._api import cross_entropy, cross_entropy_with_grad

DEFAULT_MEMORY_BUDGET = 24 << 20  # bytes of per-chunk logits (and their copies, where made)


def check_chunking(chunk_rows, memory_budget_bytes):
    if chunk_rows is not None:
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int):
            raise TypeError(f"chunk_rows: expected an int or None, got {type(chunk_rows).__name__}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows: {chunk_rows} must be >= 1")
    if memory_budget_bytes is not None:
        if isinstance(memory_budget_bytes, bool) or not isinstance(memory_budget_bytes, int):
            raise TypeError("memory_budget_bytes: expected an int or None, got "
                            f"{type(memory_budget_bytes).__name__}")
        if memory_budget_bytes < 1:
            raise ValueError(f"memory_budget_bytes: {memory_budget_bytes} must be >= 1")


def rows_per_chunk(n_rows, n_cls, bytes_per_logit, chunk_rows=None, memory_budget_bytes=None):
    """``chunk_rows`` if given, else as many rows as fit the budget (at least 1), evened out
    over the chunks that takes (no small last chunk: it would run slow GEMMs)."""
    if chunk_rows is None:
        budget = DEFAULT_MEMORY_BUDGET if memory_budget_bytes is None else memory_budget_bytes
        fit = max(1, budget // max(1, n_cls * bytes_per_logit))
        n_chunks = -(-n_rows // fit)
        chunk_rows = -(-n_rows // max(1, n_chunks))
    return max(1, min(chunk_rows, n_rows))


def kernel_on_chunk(logits, target, rows, want_grad, grad_output, loss_out, kw):
    """gpuce's fused kernel on the logits of ``rows`` (a slice of the flat rows), with
    ``kw["reduction"]`` 'none' or 'sum'. The loss goes into ``loss_out``: its rows of a 1-d
    array ('none'), else added to a 0-d running sum. ``grad_output``: per-row (sliced here,
    or None for ones) for 'none', a 0-d scale for 'sum'. Returns the gradient, written over
    the logits, or None when ``want_grad`` is False."""
    per_row = kw["reduction"] == "none"
    go = grad_output[rows] if per_row and grad_output is not None else grad_output
    if want_grad:
        loss, g = cross_entropy_with_grad(logits, target[rows], grad_output=go, inplace=True, **kw)
    else:
        loss, g = cross_entropy(logits, target[rows], **kw), None
    if per_row:
        loss_out[rows] = loss
    else:
        loss_out += loss
    return g


def _safe_inverse(den):
    """1/den, and 0 where den == 0 (a mean over nothing is 0 with a zero gradient)."""
    nonzero = den != 0
    return nonzero / (den + (~nonzero))


def mean_plan(target, weight, ignore_index, n_rows, soft, to_acc):
    """(weight for every chunk, factor on the chunk sums) that turn chunks run with
    reduction='sum' into the contract's mean: CE part / Σ w[y] over kept rows, z part /
    the count of kept rows (GUIDE §1). With class weights the CE part is moved onto the
    z part's divisor by scaling the weights by count / Σ w[y] (0 when Σ w[y] = 0, where
    the contract drops the CE part), so one kernel pass per chunk is enough.

    ``target`` is the flat target, ``weight`` None or already in the accumulation dtype,
    ``to_acc`` casts an array to the accumulation dtype.
    """
    if soft:
        return weight, (1.0 / n_rows if n_rows else 0.0)
    kept = target != ignore_index
    count = to_acc(kept.sum())
    if weight is None:
        return None, _safe_inverse(count)
    n_cls = weight.shape[0]
    den_ce = (weight[target.clip(0, n_cls - 1)] * kept).sum()
    return weight * (count * _safe_inverse(den_ce)), _safe_inverse(count)
