"""Shared test helpers: the accuracy criteria (stated once, here), test data, output
poisoning and memory checks. Backend suites (CPU, CUDA simulator, real GPU) import these.

Accuracy criteria against the float64 reference (tests/reference.py):

* loss-like values (losses, logsumexp, log_softmax): |got - ref| <= LOSS_RTOL * max(|ref|, 1).
  That is a relative error of 1e-5 (fp32 and the fp32-computed half dtypes) for values of
  1 nat or more; smaller values are compared absolutely at 1e-5 nats, because a row loss
  near 0 comes from lse - z_y, whose rounding error scales with the logits, not the loss.
* gradient-like values (gradients, softmax):
  - float32 / float64: per row, |g - ref| <= GRAD_RTOL * max_row |ref|, the row scale taken
    as at least the dtype's smallest normal (below it a float has no relative precision).
  - float16 / bfloat16: |g - round(ref)| <= one ulp of the dtype at |ref|, elementwise,
    where round() is rounding the float64 reference to that dtype.
* Rows whose reference is all zero (ignored rows, all -inf rows) must be exactly zero
  (unless a row_scale says the zero is a cancellation, as for C=1 with smoothing);
  NaN and +-inf must appear exactly where the reference has them.
* For float16 / bfloat16 inputs the reference is computed from the rounded inputs
  (the actual fp16/bf16 values, upcast to float64), since that is what the kernel sees.
"""
import zlib

import numpy as np

from kinds import BF16, DTYPES
from reference import as_f64, ref_cross_entropy, ref_logsumexp

LOW_PRECISION = ("float16", "bfloat16")
LOSS_RTOL = {"float16": 1e-5, "bfloat16": 1e-5, "float32": 1e-5, "float64": 1e-11}
GRAD_RTOL = {"float32": 2e-5, "float64": 1e-12}
FP32_EPS = float(np.finfo(np.float32).eps)
SMALLEST_NORMAL = {"float32": float(np.finfo(np.float32).tiny),
                   "float64": float(np.finfo(np.float64).tiny)}
LOSS_DTYPE = {"float16": "float32", "bfloat16": "float32", "float32": "float32",
              "float64": "float64"}


# ---- seeds and data -------------------------------------------------------------------

def seed_for(*key):
    """A stable 32-bit seed from any key (a test's node id, a parameter tuple ...)."""
    return zlib.crc32(repr(key).encode())


def rng_for(*key):
    return np.random.default_rng(seed_for(*key))


def np_dtype(dtype):
    """numpy dtype for a dtype name ('bfloat16' -> ml_dtypes.bfloat16)."""
    return DTYPES[dtype] if isinstance(dtype, str) else np.dtype(dtype)


def dtype_name(a):
    """'float32', 'bfloat16', ... for numpy, ml_dtypes, torch and CuPy arrays."""
    return str(a.dtype).replace("torch.", "")


def make_logits(rng, shape, dtype, scale=3.0):
    """Random logits (randn * scale), already rounded to ``dtype`` (a numpy array)."""
    x = rng.standard_normal(shape) * scale
    # never all zero, never exactly tied by accident
    return x.astype(np_dtype(dtype))


def make_hard_target(rng, row_shape, n_cls, dtype=np.int64, ignore_index=None,
                     ignore_frac=0.0):
    """Random class indices; a fraction ``ignore_frac`` of rows (at least one if > 0, and
    never all) set to ``ignore_index``."""
    t = rng.integers(0, n_cls, size=row_shape).astype(np.int64)
    if ignore_index is not None and ignore_frac > 0 and t.size:
        flat = t.reshape(-1)
        n_ign = min(max(1, int(round(ignore_frac * flat.size))), flat.size - 1)
        flat[rng.choice(flat.size, size=n_ign, replace=False)] = ignore_index
    return t.astype(dtype)


def make_soft_target(rng, shape, dtype):
    """Random probability rows (Dirichlet), cast to ``dtype``."""
    n_cls = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    q = rng.dirichlet(np.full(n_cls, 0.7), size=rows).reshape(shape)
    return q.astype(np_dtype(dtype))


def make_weight(rng, n_cls, dtype=np.float32):
    return rng.uniform(0.25, 2.0, size=n_cls).astype(np_dtype(dtype))


def rounded(a, dtype):
    """float64 values rounded to ``dtype`` and back to float64."""
    return np.asarray(a, dtype=np.float64).astype(np_dtype(dtype)).astype(np.float64)


# ---- ulps and closeness -----------------------------------------------------------------

def ulp(ref, dtype):
    """Spacing of ``dtype`` at |ref| (float64 array): np.spacing for float16, 2**(e-7) for
    bfloat16 (8 significant bits), subnormal spacing at the bottom of the range."""
    a = np.abs(np.asarray(ref, dtype=np.float64))
    if dtype == "float16":
        return np.spacing(a.astype(np.float16)).astype(np.float64)
    if dtype == "bfloat16":
        with np.errstate(divide="ignore"):
            e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
        e = np.where(a > 0, e, -126.0)
        return np.exp2(np.maximum(e, -126.0) - 7.0)
    return np.spacing(a.astype(np_dtype(dtype))).astype(np.float64)


def _check_nonfinite(got, ref, what):
    for name, fn in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        g, r = fn(got), fn(ref)
        if not np.array_equal(g, r):
            bad = np.argwhere(g != r)[:5]
            raise AssertionError(f"{what}: {name} positions differ at {bad.tolist()}: "
                                 f"got {got[tuple(bad.T)]}, ref {ref[tuple(bad.T)]}")
    return np.isfinite(ref)


def _fail(what, got, ref, tol, mask, note=""):
    err = np.where(mask, np.abs(got - ref), 0.0)
    excess = np.where(mask, err - tol, -np.inf)
    idx = np.unravel_index(np.argmax(excess), excess.shape) if excess.ndim else ()
    raise AssertionError(
        f"{what}: {int(np.sum(excess > 0))} of {excess.size} values off{note}; worst at "
        f"{tuple(int(i) for i in idx)}: got {got[idx]!r}, ref {ref[idx]!r}, "
        f"|diff| {err[idx]:.3g} > tol {np.broadcast_to(tol, err.shape)[idx]:.3g}")


def assert_loss_close(got, ref, dtype, what="loss", atol=0.0):
    """Losses, logsumexp, log_softmax: |got - ref| <= LOSS_RTOL * max(|ref|, 1) (+ atol)."""
    got = as_f64(got)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != reference {ref.shape}"
    fin = _check_nonfinite(got, ref, what)
    tol = LOSS_RTOL[dtype] * np.maximum(np.abs(np.where(fin, ref, 0.0)), 1.0) + atol
    ok = ~fin | (np.abs(np.where(fin, got, 0.0) - np.where(fin, ref, 0.0)) <= tol)
    if not np.all(ok):
        _fail(what, got, ref, tol, fin)


def assert_grad_close(got, ref, dtype, what="grad", axis=-1, row_scale=None):
    """Gradients and softmax; the criterion for each dtype is in the module docstring.

    ``row_scale`` (broadcastable against ``ref`` with ``axis`` kept) is the size of the terms a
    row is computed from before they cancel, e.g. |grad_output| / divisor for a cross-entropy
    gradient, whose target entry p_y - 1 is tiny when p_y is near 1 but carries the fp32
    rounding of p_y. The tolerance is then taken relative to max(max_row |ref|, row_scale)
    (float32/float64), or widened by 2 fp32 ulps of row_scale (float16/bfloat16, computed
    in fp32).
    """
    got = as_f64(got)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != reference {ref.shape}"
    fin = _check_nonfinite(got, ref, what)
    r = np.where(fin, ref, 0.0)
    g = np.where(fin, got, 0.0)
    if r.size == 0:
        return
    row_max = np.max(np.abs(r), axis=axis, keepdims=True)
    if dtype in LOW_PRECISION:
        target = rounded(r, dtype)
        tol = ulp(r, dtype)
        if row_scale is not None:
            tol = tol + 2 * FP32_EPS * row_scale
        exact = (row_max == 0) & (True if row_scale is None else np.asarray(row_scale) == 0)
        tol = np.where(exact, 0.0, tol)  # all-zero rows (ignored, -inf) must be exactly 0
        ok = np.abs(g - target) <= tol
        if not np.all(ok):
            _fail(what, got, target, tol, fin, " (by more than one ulp of the rounded ref)")
        return
    scale = row_max if row_scale is None else np.maximum(row_max, row_scale)
    # Relative precision ends at the smallest normal: below it a float holds a value only to
    # its fixed subnormal spacing (1.4e-45 in float32), so a row whose scale is subnormal
    # (e.g. a softcap factor sech^2 ~ 1e-44 on every entry) cannot be 2e-5-relative. Such a
    # row is held to the criterion at the smallest normal instead (float32: 2.4e-43 absolute,
    # 168 subnormal steps; every normal row is untouched). Zero rows stay exact.
    scale = np.where(scale > 0, np.maximum(scale, SMALLEST_NORMAL[dtype]), 0.0)
    tol = GRAD_RTOL[dtype] * scale  # 0 for all-zero rows: those must be exact
    ok = np.abs(g - r) <= tol
    if not np.all(ok):
        _fail(what, got, ref, np.broadcast_to(tol, r.shape), fin, " (per-row relative)")


def assert_log_softmax_close(got, ref, dtype, what="log_softmax", x=None, axis=-1):
    """log_softmax is stored in the input dtype: one ulp for float16/bfloat16 (as for the
    gradient), the loss criterion for float32/float64. Given the input ``x``, each also
    allows the rounding of lse in the accumulation dtype, 2 ulps of max_row |x| + log C
    (z - lse cancels for the largest logits, whatever the size of the result)."""
    scale = None
    if x is not None:
        xa = np.abs(as_f64(x))
        xa = np.where(np.isfinite(xa), xa, 0.0)
        n_cls = max(xa.shape[axis], 1)
        scale = (np.max(xa, axis=axis, keepdims=True) if xa.size else 0.0) + np.log(n_cls)
    if dtype in LOW_PRECISION:
        assert_grad_close(got, ref, dtype, what, axis, row_scale=scale)
    else:
        eps = float(np.finfo(np_dtype(dtype)).eps)
        assert_loss_close(got, ref, dtype, what, atol=0.0 if scale is None else 2 * eps * scale)


def assert_close_to_ref(got, ref, dtype, what="grad", axis=-1):
    """One entry point: ``what`` is 'loss' (also 'lse', 'logsumexp': float32/float64
    results), 'log_softmax', or anything else ('grad', 'softmax': the gradient criterion)."""
    if what in ("loss", "lse", "logsumexp"):
        assert_loss_close(got, ref, dtype, what)
    elif what == "log_softmax":
        assert_log_softmax_close(got, ref, dtype, what)
    else:
        assert_grad_close(got, ref, dtype, what, axis)


def fresh(kind, a):
    """``a`` handed to an array kind as a copy, so that a call that writes its input (or a
    kind that shares memory with numpy) never changes the test's own numpy array. The
    shape is kept (kinds.py's torch conversion turns a 0-d array into shape (1,))."""
    a = np.asarray(a)
    r = kind.to(np.array(a, copy=True))
    return r if tuple(r.shape) == a.shape else r.reshape(a.shape)


# ---- cross entropy against the reference ------------------------------------------------

def ce_grad_row_scale(x, target, reduction="mean", weight=None, ignore_index=-100,
                      label_smoothing=0.0, z_loss=0.0, softcap=None, grad_output=None,
                      class_mask=None):
    """Per row (keepdims), a bound on the terms a cross-entropy gradient row is computed
    from: |go| * (a_ce * max(w) + a_z * 2 z |lse|), a_ce and a_z the mean's divisors; 0 for
    ignored rows and rows of -inf logits, whose gradient must be exactly zero."""
    x = as_f64(x)
    n_cls = x.shape[-1]
    rows = x.shape[:-1]
    w = np.ones(n_cls) if weight is None else as_f64(weight)
    t = np.asarray(target.detach().numpy() if hasattr(target, "detach") else target)
    if np.issubdtype(t.dtype, np.integer):
        kept = t.astype(np.int64) != ignore_index
        den_ce = float(np.sum(np.where(kept, w[np.where(kept, t, 0).astype(np.int64)], 0.0)))
        den_z = float(np.sum(kept))
    else:
        kept = np.ones(rows, dtype=bool)
        den_ce = den_z = float(np.prod(rows))
    if reduction == "mean":
        a_ce = 0.0 if den_ce == 0 else 1.0 / den_ce
        a_z = 0.0 if den_z == 0 else 1.0 / den_z
    else:
        a_ce = a_z = 1.0
    go = np.ones(rows) if grad_output is None else np.broadcast_to(as_f64(grad_output), rows)
    with np.errstate(invalid="ignore"):
        lse = np.abs(ref_logsumexp(x if softcap is None else softcap * np.tanh(x / softcap),
                                   class_mask=class_mask))
    masked = np.isposinf(lse)  # all -inf: a zero gradient row, exactly
    lse = np.where(np.isfinite(lse), lse, 0.0)
    scale = np.abs(go) * (a_ce * np.max(np.abs(w)) + a_z * 2 * z_loss * lse)
    return np.where(kept & ~masked, scale, 0.0)[..., None]  # ignored rows: exactly zero


def check_cross_entropy(loss, grad, x, target, dtype, reduction="mean", **kw):
    """Compare numpy results (``grad`` may be None) with the reference for the numpy inputs
    ``x``, ``target`` and reference keywords ``kw`` (weight, ignore_index, label_smoothing,
    z_loss, softcap, grad_output). Returns the reference (loss, grad)."""
    ref_loss, ref_grad = ref_cross_entropy(x, target, reduction=reduction, **kw)
    assert_loss_close(loss, ref_loss, dtype)
    if grad is not None:
        scale = ce_grad_row_scale(x, target, reduction, **kw)
        assert_grad_close(grad, ref_grad, dtype, row_scale=scale)
    return ref_loss, ref_grad


# ---- poisoning, identity, library checks ------------------------------------------------

def poison(shape, dtype, garbage=False, rng=None):
    """A numpy buffer any unwritten element of which fails a comparison: NaN everywhere,
    or (garbage=True) huge finite values mixed with NaN and infinities."""
    dt = np_dtype(dtype)
    if not garbage:
        return np.full(shape, np.nan, dtype=dt)
    rng = rng if rng is not None else np.random.default_rng(0)
    vals = rng.choice(np.array([np.nan, np.inf, -np.inf, 3e4, -6e4, 1.0, 0.5]), size=shape)
    return vals.astype(dt)


def bits(a):
    """A byte view of a numpy array (compares NaN payloads and -0.0 exactly)."""
    a = np.ascontiguousarray(np.asarray(a))
    return a.view(np.uint8)


def assert_bitwise_equal(a, b, what="array"):
    assert np.asarray(a).shape == np.asarray(b).shape, what
    assert np.array_equal(bits(a), bits(b)), f"{what} changed"


def data_range(a):
    """(start, end) byte addresses of an array of a known library, or None."""
    if isinstance(a, np.ndarray):
        utils = getattr(np.lib, "array_utils", np)  # numpy >= 2 moved byte_bounds
        return utils.byte_bounds(a)
    try:
        import torch
        if isinstance(a, torch.Tensor):
            st = a.untyped_storage()
            return st.data_ptr(), st.data_ptr() + st.nbytes()
    except ImportError:  # pragma: no cover
        pass
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is not None:
        ptr = cai["data"][0]
        return ptr, ptr + int(np.prod(cai["shape"])) * np.dtype(cai["typestr"]).itemsize
    return None


def shares_memory(a, b):
    """Whether two arrays (numpy, torch, CUDA-array-interface) use overlapping memory."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return np.shares_memory(a, b)
    ra, rb = data_range(a), data_range(b)
    if ra is None or rb is None:
        return a is b
    return ra[0] < rb[1] and rb[0] < ra[1]


def library(a):
    """'numpy', 'torch', 'cupy', ... : the top-level module of the array's type."""
    return type(a).__module__.split(".")[0]


def assert_array_of(result, like, dtype, shape, what="result"):
    """``result`` is an array of ``like``'s library (not a Python or numpy scalar) with
    dtype name ``dtype`` and ``shape``."""
    assert library(result) == library(like), \
        f"{what}: {type(result)} returned for {type(like)} input"
    assert not isinstance(result, (float, int, np.generic)), f"{what}: a scalar, not an array"
    assert dtype_name(result) == dtype, f"{what}: dtype {dtype_name(result)}, expected {dtype}"
    assert tuple(result.shape) == tuple(shape), f"{what}: shape {tuple(result.shape)} != {shape}"


__all__ = [n for n in dir() if not n.startswith("_")] + ["BF16"]
