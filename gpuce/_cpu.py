"""CPU backend: numpy arrays and CPU torch tensors, run by the @njit kernels."""
import sys
from functools import lru_cache

import numba
import numpy as np

from . import _dispatch, _threading
from ._checks import dtype_name

ACC = {"float16": np.float32, "bfloat16": np.float32, "float32": np.float32, "float64": np.float64}
_RAW = {"float16": np.uint16, "bfloat16": np.uint16, "float32": np.float32, "float64": np.float64}


def _torch():
    return sys.modules.get("torch")


def _is_cpu_tensor(x):
    if type(x) is np.ndarray:  # the common case, without a look at torch
        return False
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor) and x.is_cpu


def _numpy_dtype(dt):
    if dt == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dt)


def to_numpy(a):
    """A numpy view of a numpy array or CPU tensor (bf16 tensors come back as raw uint16)."""
    if type(a) is np.ndarray:
        return a
    if _is_cpu_tensor(a):
        t = a.detach()
        if t.dtype == _torch().bfloat16:
            return t.view(_torch().int16).numpy().view(np.uint16)
        return t.numpy()
    return np.asarray(a)


def raw(a_np, dt):
    """The array as the kernels' storage type: half floats as 16-bit words."""
    return a_np.view(np.uint16) if dt in ("float16", "bfloat16") else a_np


def wrap(like, raw_np, dt):
    """Give a raw result the array type and dtype of ``like``."""
    if _is_cpu_tensor(like):
        torch = _torch()
        if dt == "bfloat16":
            return torch.from_numpy(raw_np.view(np.int16)).view(torch.bfloat16)
        if dt == "float16":
            return torch.from_numpy(raw_np.view(np.float16))
        return torch.from_numpy(raw_np)
    if dt in ("float16", "bfloat16"):
        return raw_np.view(_numpy_dtype(dt))
    return raw_np


def wrap_loss(like, value):
    if _is_cpu_tensor(like):
        return _torch().from_numpy(np.asarray(value))
    return np.asarray(value)


def _rows(a, axis):
    """(N, C) C-contiguous view of ``a`` with ``axis`` last, copying only when strides demand."""
    if (axis == -1 or axis == a.ndim - 1) and a.flags.c_contiguous and a.ndim:
        return a.reshape(-1, a.shape[-1]) if a.ndim != 2 else a  # the common case, cheaply
    moved = np.moveaxis(a, axis, -1)
    n_rows = int(np.prod(moved.shape[:-1], dtype=np.int64))
    return np.ascontiguousarray(moved).reshape(n_rows, moved.shape[-1])


def _writable_rows(dest, axis):
    """Rows view of ``dest`` if writing it directly is possible, else None."""
    moved = np.moveaxis(dest, axis, -1)
    if moved.flags.c_contiguous:  # (explicit row count: -1 is ambiguous when C == 0)
        return moved.reshape(int(np.prod(moved.shape[:-1], dtype=np.int64)), moved.shape[-1])
    return None


def _kernels(dt, softcap, target_dt=None, serial=False, masked=False):
    return _cpu_kernels().make_kernels(dt, softcap is not None,
                                       None if target_dt == dt else target_dt, not serial,
                                       masked)


_KERNELS_MODULE = []


def _cpu_kernels():
    """gpuce.kernels.cpu, imported on first use (it defines numba intrinsics)."""
    if not _KERNELS_MODULE:
        from .kernels import cpu
        _KERNELS_MODULE.append(cpu)
    return _KERNELS_MODULE[0]


def _run(rows, kernel_for, *args):
    """Run ``kernel_for(parallel)`` over ``rows``: the serial build with one thread's task
    shape for small calls (waking the pool costs more than the work) and where numba's
    threading layer is unsafe (a forked omp child, a busy workqueue: see _threading), else
    the parallel build."""
    if rows.size < SERIAL_BELOW:  # the common tiny call: no context manager on its path
        return kernel_for(False)(*args, *_cpu_kernels().launch_shape(*rows.shape, 1))
    with _threading.parallel_allowed() as parallel:
        n_threads = numba.get_num_threads() if parallel else 1
        return kernel_for(parallel)(*args, *_cpu_kernels().launch_shape(*rows.shape, n_threads))


def _launch(rows, dt, softcap, target_dt, name, *args, mask=None):
    """Run the dtype's kernel ``name`` over ``rows``; ``mask`` is (uint8 mask rows, step)
    from _mask_rows, or None (the unmasked build, with a stand-in it never reads)."""
    mask_rows, step = _NO_MASK if mask is None else mask
    return _run(rows, lambda parallel: _kernels(dt, softcap, target_dt, not parallel,
                                                mask is not None)[name],
                *args, mask_rows, step)


_NO_MASK = (np.ones((1, 1), dtype=np.uint8), 0)


def _mask_rows(class_mask, per_row, axis, n_cls):
    """(uint8 rows, step) of a checked class mask: step 0 for one (C,) row shared by every
    logits row, 1 for a row per logits row (laid out like _rows of the logits)."""
    m = to_numpy(class_mask).view(np.uint8)
    rows = _rows(m, axis) if per_row else m.reshape(1, n_cls)
    if not rows.flags.writeable:  # a read-only array would be another numba specialisation
        rows = rows.copy()
    return rows, int(per_row)


def _check_live_rows(mask_rows, step, kept=None):
    """ValueError for a (kept) row with every class masked."""
    dead = ~mask_rows.any(axis=1)
    if step and kept is not None:
        dead &= kept
    if dead.any():
        row = int(np.argmax(dead))
        where = f"row {row} has" if step else "it has"
        raise ValueError(f"class_mask: {where} every class masked; at least one class of a "
                         "row must take part")


def add_into(total, part):
    """``total += part`` for 2-d C-contiguous CPU arrays/tensors of one shape: ``part`` in any
    float dtype, ``total`` in its accumulation dtype (fp32; fp64 for fp64). One launch, and
    no widened copy of ``part``."""
    dt = dtype_name(part)
    x, acc = raw(to_numpy(part), dt), to_numpy(total)
    if x.shape != acc.shape or x.ndim != 2 or acc.dtype != ACC[dt]:
        raise ValueError(f"total: expected a {ACC[dt].__name__} array of shape {x.shape}")
    if not (x.flags.c_contiguous and acc.flags.c_contiguous and acc.flags.writeable):
        raise ValueError("total, part: expected C-contiguous arrays (total writeable)")
    _launch(x, dt, None, None, "add_into", x, acc)


def _small_ok(req, dt, n_cls):
    """Whether the short-row kernel (C a compile-time constant) covers this call."""
    return (n_cls <= SMALL_MAX_C and dt in ("float32", "float64") and not req.inplace
            and req.softcap is None and req.label_smoothing == 0 and req.z_loss == 0)


SMALL_MAX_C = 32


def small_cross_entropy(rows, dt, grad_rows, tgt, weight, go, go_step, ignore_index,
                        reduction, loss_rows, want_grad):
    """The short-row kernel (one build per C) over ``rows`` (float32/float64, C-contiguous,
    C <= SMALL_MAX_C) with int64 targets: the whole call in one dispatch, which checks the
    targets, writes ``loss_rows`` (and ``grad_rows`` if ``want_grad``) and returns the sum of
    the row losses (float64). A bad target raises ValueError before anything is written."""
    n_cls = rows.shape[1]
    args = (rows, grad_rows, tgt, weight, go, go_step, ignore_index, reduction == "mean",
            loss_rows, want_grad)
    if rows.size < SERIAL_BELOW:  # _run's serial case, one task (a tiny call's path)
        total, bad = _small_serial(dt, n_cls)(*args, _cpu_kernels().BLOCK_ELEMS // n_cls, 1)
    else:
        make = _small_factory()
        total, bad = _run(rows, lambda parallel: make(dt, n_cls, parallel), *args)
    if bad >= 0:
        bad_target(tgt, bad, n_cls, ignore_index)
    return total


def bad_target(tgt, row, n_cls, ignore_index):
    raise ValueError(f"target: class index {int(tgt[row])} (row {row}) is outside "
                     f"[0, {n_cls}) and is not ignore_index={ignore_index}")


@lru_cache(maxsize=None)
def small_kernel_at(dt, n_cls):
    """The serial short-row kernel on buffer addresses (see kernels/cpu_small.py)."""
    _small_factory()
    from .kernels import cpu_small
    return cpu_small.make_ce_hard_small_at(dt, n_cls)


@lru_cache(maxsize=None)
def _small_serial(dt, n_cls):
    return _small_factory()(dt, n_cls, False)


def _small_factory():
    if len(_KERNELS_MODULE) < 2:
        _cpu_kernels()
        from .kernels import cpu_small
        _KERNELS_MODULE.append(cpu_small.make_ce_hard_small)
    return _KERNELS_MODULE[1]


class CpuBackend:
    name = "cpu"

    def owns(self, x):
        return isinstance(x, np.ndarray) or _is_cpu_tensor(x)

    def check_same_device(self, a, b, name):
        return None

    # ---- softmax family ------------------------------------------------------

    def softmax(self, x, axis, dt, out, log, class_mask=None, per_row=False):
        xr = raw(to_numpy(x), dt)
        rows = _rows(xr, axis)
        mask = None
        if class_mask is not None:
            mask = _mask_rows(class_mask, per_row, axis, rows.shape[1])
            _check_live_rows(*mask)
        if out is None and axis == xr.ndim - 1:
            dest_np = np.empty(xr.shape, dtype=xr.dtype)
            self._run_softmax(dt, rows, dest_np.reshape(rows.shape), log, mask)
            return wrap(x, dest_np, dt)
        if out is None:
            dest_np = np.empty(np.moveaxis(xr, axis, -1).shape, dtype=xr.dtype)
            result_rows = dest_np.reshape(rows.shape)
            self._run_softmax(dt, rows, result_rows, log, mask)
            return wrap(x, np.moveaxis(dest_np, -1, axis), dt)
        dest = raw(to_numpy(out), dt)
        _check_writeable(dest, "out")
        direct = _writable_rows(dest, axis)
        if direct is not None and rows.size and np.shares_memory(direct, rows):
            same = direct.ctypes.data == rows.ctypes.data and direct.strides == rows.strides
            if not same:
                direct = None  # partial overlap: go through a temporary
        target = direct if direct is not None else np.empty_like(rows)
        self._run_softmax(dt, rows, target, log, mask)
        if direct is None:
            np.copyto(np.moveaxis(dest, axis, -1), target.reshape(np.moveaxis(dest, axis, -1).shape))
        return out

    @staticmethod
    def _run_softmax(dt, rows, dest_rows, log, mask=None):
        if rows.size:
            _launch(rows, dt, None, None, "log_softmax" if log else "softmax", rows, dest_rows,
                    0.0, mask=mask)

    def logsumexp(self, x, axis, dt):
        xr = raw(to_numpy(x), dt)
        rows = _rows(xr, axis)
        res = np.empty(rows.shape[0], dtype=ACC[dt])
        if rows.shape[0]:
            if rows.shape[1]:
                _launch(rows, dt, None, None, "logsumexp", rows, res, 0.0)
            else:
                res[:] = -np.inf
        shape = np.moveaxis(xr, axis, -1).shape[:-1]
        return wrap_loss(x, res.reshape(shape)) if _is_cpu_tensor(x) else res.reshape(shape)

    # ---- cross entropy -------------------------------------------------------

    def cross_entropy(self, req):
        cpu = _cpu_kernels()
        dt = req.dtype
        acc = ACC[dt]
        logits_np = raw(to_numpy(req.logits), dt)
        rows = _rows(logits_np, -1)
        n_rows, n_cls = rows.shape
        cap = acc(req.softcap if req.softcap is not None else 0.0)
        weight = (ones(n_cls, acc) if req.weight is None
                  else np.ascontiguousarray(_float_numpy(req.weight), dtype=acc))
        eps, zl = acc(req.label_smoothing), acc(req.z_loss)

        mask = (None if req.class_mask is None
                else _mask_rows(req.class_mask, req.mask_per_row, -1, n_cls))
        if req.soft:  # probabilities are read in their own dtype, never rounded
            q_dt = dtype_name(req.target)
            q_rows = _rows(raw(to_numpy(req.target), q_dt), -1)
            den_ce = den_z = float(n_rows)
            if mask is not None:
                _check_soft_mask(q_rows, *mask)
        else:
            tgt = np.ascontiguousarray(to_numpy(req.target), dtype=np.int64).reshape(-1)
            if mask is None and _small_ok(req, dt, n_cls):
                return self._cross_entropy_small(req, rows, logits_np, tgt, weight, acc)
            w_kept, kept, bad = cpu.hard_target_stats(tgt, weight, n_cls, req.ignore_index)
            if bad >= 0:
                bad_target(tgt, bad, n_cls, req.ignore_index)
            den_ce, den_z = w_kept, float(kept)
            if mask is not None:
                _check_hard_mask(tgt, req.ignore_index, *mask)
        if req.reduction != "mean":
            den_ce = den_z = 1.0
        inv_ce = acc(0.0 if den_ce == 0 else 1.0 / den_ce)  # all ignored: loss 0, grad 0
        inv_z = acc(0.0 if den_z == 0 else 1.0 / den_z)

        go, go_step = self._grad_output(req, acc, n_rows)
        grad_rows, finish = self._grad_buffer(req, rows, logits_np)
        loss_rows = np.empty(n_rows, dtype=acc)
        if n_rows:
            inplace = req.want_grad and grad_rows is rows  # a copy of strided logits too
            if req.soft:
                if inplace:
                    _launch(rows, dt, req.softcap, q_dt, "ce_soft_inplace", rows, q_rows, weight,
                            go, go_step, inv_ce, eps, zl, cap, loss_rows, mask=mask)
                else:
                    _launch(rows, dt, req.softcap, q_dt, "ce_soft", rows, grad_rows, q_rows,
                            weight, go, go_step, inv_ce, eps, zl, cap, loss_rows, req.want_grad,
                            mask=mask)
            else:
                w_sum = acc(n_cls) if req.weight is None else acc(weight.sum(dtype=np.float64))
                if inplace:
                    _launch(rows, dt, req.softcap, None, "ce_hard_inplace", rows, tgt, weight,
                            w_sum, go, go_step, inv_ce, inv_z, eps, zl, cap, req.ignore_index,
                            loss_rows, mask=mask)
                else:
                    _launch(rows, dt, req.softcap, None, "ce_hard", rows, grad_rows, tgt, weight,
                            w_sum, go, go_step, inv_ce, inv_z, eps, zl, cap, req.ignore_index,
                            loss_rows, req.want_grad, mask=mask)
        total = loss_rows.sum(dtype=np.float64) if req.reduction != "none" else None
        return _loss(req, loss_rows, total, acc), (finish() if req.want_grad else None)

    def _cross_entropy_small(self, req, rows, logits_np, tgt, weight, acc):
        go, go_step = self._grad_output(req, acc, rows.shape[0])
        grad_rows, finish = self._grad_buffer(req, rows, logits_np)
        loss_rows = np.empty(rows.shape[0], dtype=acc)
        total = small_cross_entropy(rows, req.dtype, grad_rows, tgt, weight, go, go_step,
                                    req.ignore_index, req.reduction, loss_rows, req.want_grad)
        return _loss(req, loss_rows, total, acc), (finish() if req.want_grad else None)

    @staticmethod
    def _grad_output(req, acc, n_rows):
        go = req.grad_output
        if go is None:
            return ones(1, acc), 0
        if isinstance(go, (int, float)):
            return np.full(1, go, dtype=acc), 0
        arr = np.ascontiguousarray(_float_numpy(go), dtype=acc).reshape(-1)
        return (arr, 1) if req.reduction == "none" else (arr.reshape(1), 0)

    @staticmethod
    def _grad_buffer(req, rows, logits_np):
        """(rows the kernel writes, function returning the user's grad after the kernel)."""
        dt = req.dtype
        shape = tuple(req.logits.shape)
        if not req.want_grad:
            return np.empty((0, 0), dtype=rows.dtype), lambda: None
        if req.inplace:
            _check_writeable(logits_np, "logits")
            if _shares(rows, logits_np):
                return rows, lambda: req.logits
            def copy_back():
                np.copyto(logits_np, rows.reshape(shape))
                return req.logits
            return rows, copy_back
        if req.out is not None:
            dest = raw(to_numpy(req.out), dt)
            _check_writeable(dest, "out")
            direct = _writable_rows(dest, -1)
            if direct is not None and not np.shares_memory(direct, logits_np):
                return direct, lambda: req.out
            tmp = np.empty_like(rows)
            def copy_out():
                np.copyto(dest, tmp.reshape(shape))
                return req.out
            return tmp, copy_out
        grad_np = np.empty(shape, dtype=rows.dtype)
        return grad_np.reshape(rows.shape), lambda: wrap(req.logits, grad_np, dt)


def _loss(req, loss_rows, total, acc):
    """The loss in the logits' array type: the rows for 'none', else the total as acc."""
    if req.reduction == "none":
        loss = loss_rows.reshape(req.row_shape)
        return wrap_loss(req.logits, loss) if _is_cpu_tensor(req.logits) else loss
    return wrap_loss(req.logits, acc(total))


@lru_cache(maxsize=256)
def ones(n, acc):
    """A shared array of ones (default weights, default grad_output); the kernels only read
    it. Writeable on purpose: a read-only array would be another numba specialisation."""
    return np.ones(n, dtype=acc)


SERIAL_BELOW = 1 << 16  # elements; under this, waking the thread pool costs more than the work


def _check_hard_mask(tgt, ignore_index, mask_rows, step):
    """ValueError for a kept row whose target class is masked (every class masked included)."""
    kept = np.flatnonzero(tgt != ignore_index)
    dead = mask_rows[kept * step, tgt[kept]] == 0
    if dead.any():
        row = int(kept[np.argmax(dead)])
        raise ValueError(f"class_mask: the target class {int(tgt[row])} of row {row} is masked; "
                         "a row's target must take part (or be ignore_index)")


def _check_soft_mask(q_rows, mask_rows, step):
    """ValueError for a row with every class masked or probability on a masked class."""
    _check_live_rows(mask_rows, step)
    nonzero = (q_rows & 0x7FFF) != 0 if q_rows.dtype == np.uint16 else q_rows != 0
    bad = (nonzero & (mask_rows == 0)).any(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(f"target: row {row} puts probability on a class that class_mask "
                         "masks; masked classes must have probability 0")


def _check_writeable(a, name):
    if not a.flags.writeable:
        raise ValueError(f"{name}: the array is read-only, so the result cannot be written into it")


def _shares(rows, base):
    return rows.size > 0 and np.shares_memory(rows, base)


def _float_numpy(a):
    """Any float array (half included) as a numpy array numpy can compute with."""
    a_np = to_numpy(a)
    if _is_cpu_tensor(a) and a.dtype == _torch().bfloat16:
        return a.detach().float().numpy()
    return a_np.astype(np.float64) if a_np.dtype.kind == "V" else a_np


_dispatch.register(CpuBackend())
