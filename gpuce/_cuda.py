"""CUDA backend: checks, allocates and launches the Numba CUDA kernels of gpuce.kernels.cuda_*
on the arrays of gpuce/_cuda_arrays.py, as gpuce/_cuda_plan.py plans. Importing this module
registers the backend with the dispatcher.

- Outputs come from the input's own library (CuPy's memory pool, torch's caching allocator,
  numba for numba arrays), and kernels launch on that library's current stream.
- Nothing synchronises with the host unless ``validate=True``. Mean divisors are computed on
  the device and row losses are summed there, in a fixed order (no float atomics); a
  mean/sum cross entropy is at most 3 launches.
- Kernels have explicit signatures, are compiled once per (kernel, key) on first use and
  then called through their bound overload.

Force a strategy (see gpuce/_cuda_plan.py) with the environment variable
``GPUCE_CUDA_STRATEGY=warp|block_cached|block|split`` (read at every call) or
``with gpuce._cuda.force_strategy("split"):``. A forced strategy that cannot hold the row
(warp, block_cached) raises ValueError.
"""
import contextlib
import dataclasses
import math
import os
import threading

import numpy as np
from numba import cuda

from . import _dispatch
from ._cuda_arrays import (_NUMBA, _dtype_name, is_cuda_array, _lib_for, _NeedsLayout, _overlap,
                           _relayout, _same_buffer, _to_host, _to_numba)
from ._cuda_plan import (MAX_BLOCK, SMEM_BUFFERS, STATIC_SMEM, DeviceLimits, plan_for,
                         row_aligned)
from .kernels import cuda_registry
from .kernels.cuda_dtypes import SIMULATOR, traits
from .kernels.cuda_softmax import LOG_SOFTMAX, LOGSUMEXP, SOFTMAX
from .kernels.cuda_vec import row_phase, step_elems, word_view_skip

if SIMULATOR:
    from .kernels import cuda_simulator
    cuda_simulator.install()

STRATEGY_ENV = "GPUCE_CUDA_STRATEGY"
STRATEGIES = cuda_registry.STRATEGIES
_state = threading.local()


@contextlib.contextmanager
def force_strategy(name):
    """Run every CUDA call in this thread with one strategy (None: automatic)."""
    if name is not None and name not in STRATEGIES:
        raise ValueError(f"strategy: {name!r} is not one of {STRATEGIES}")
    old = getattr(_state, "forced", None)
    _state.forced = name
    try:
        yield
    finally:
        _state.forced = old


def _forced_strategy():
    name = getattr(_state, "forced", None) or os.environ.get(STRATEGY_ENV) or None
    if name is not None and name not in STRATEGIES:
        raise ValueError(f"{STRATEGY_ENV}: {name!r} is not one of {STRATEGIES}")
    return name


# ---- kernels and launches -------------------------------------------------------------------

_KERNELS = {}


def _kernel(name, key):
    """The compiled kernel (explicit signature: compiled once, then reused). Compiled code
    is also cached on disk by numba (keyed by the kernel's source and its dtype constants),
    so later processes skip the seconds a CUDA kernel takes to compile; GPUCE_CUDA_CACHE=0
    turns that off."""
    k = _KERNELS.get((name, key))
    if k is None:
        fn, sig, bound = cuda_registry.spec(name, key)
        if SIMULATOR:
            k = cuda.jit(sig)(fn)
        else:
            cache = os.environ.get("GPUCE_CUDA_CACHE", "1") != "0"
            try:
                k = cuda.jit(sig, launch_bounds=bound, cache=cache)(fn)
            except Exception:
                if not cache:
                    raise
                k = cuda.jit(sig, launch_bounds=bound)(fn)  # an unusable cache: compile only
        _KERNELS[(name, key)] = k
    return k


def _launch(name, key, grid, block, stream, shmem, *args):
    """Launch one kernel. The compiled overload is bound once per (kernel, key) and called
    directly: no argument typing or overload lookup per call."""
    launch = _BOUND.get((name, key))
    if launch is None:
        launch = _BOUND[(name, key)] = _bind(name, key)
    launch(args, grid, block, stream, shmem)


def _bind(name, key):
    k = _kernel(name, key)
    if SIMULATOR:
        return lambda args, grid, block, stream, shmem: k[grid, block, stream, shmem](*args)
    _, sig, _ = cuda_registry.spec(name, key)
    overload = k.overloads[sig.args]
    return lambda args, grid, block, stream, shmem: overload.launch(
        args, (grid, 1, 1), (block, 1, 1), stream, shmem)


_BOUND = {}


def _device_limits(dev_id):
    """DeviceLimits of GPU ``dev_id`` (asked once)."""
    if SIMULATOR:
        return DeviceLimits.simulator()
    d = _DEVICES.get(dev_id)
    if d is None:
        with _on_device(dev_id):
            dev = cuda.gpus[dev_id]
            try:
                optin = int(dev.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            except Exception:
                optin = STATIC_SMEM
            try:
                per_sm = int(dev.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)
                regs = int(dev.MAX_REGISTERS_PER_MULTIPROCESSOR)
                threads = int(dev.MAX_THREADS_PER_MULTI_PROCESSOR)
            except Exception:
                per_sm, regs, threads = optin, 65536, 2048
            d = _DEVICES[dev_id] = DeviceLimits(int(dev.MULTIPROCESSOR_COUNT), optin, per_sm,
                                                regs, threads, tuple(dev.compute_capability))
    return d


_DEVICES = {}
_BIG_SMEM = {}


def _on_device(dev_id):
    if SIMULATOR or dev_id == cuda.current_context().device.id:
        return contextlib.nullcontext()
    return cuda.gpus[dev_id]


def _allow_smem(name, key, nbytes, dev):
    """Can a block_cached kernel get ``nbytes`` of dynamic shared memory? Beyond 48 KiB this
    opts the kernel in (once per kernel and device), up to the device's limit."""
    if nbytes + SMEM_BUFFERS <= STATIC_SMEM:
        return True
    if SIMULATOR or nbytes + SMEM_BUFFERS > dev.max_shared_per_block_optin:
        return False
    ck = (name, key, cuda.current_context().device.id)
    if ck not in _BIG_SMEM:
        try:
            from numba.cuda.cudadrv import driver
            _, sig, _ = cuda_registry.spec(name, key)
            func = _kernel(name, key).overloads[sig.args]._codelibrary.get_cufunc()
            attr = driver.binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            driver.driver.cuKernelSetAttribute(attr, dev.max_shared_per_block_optin - SMEM_BUFFERS, func.handle,
                                               func.device.id)
            _BIG_SMEM[ck] = True
        except Exception:  # a numba-cuda without these internals: stay within 48 KiB
            _BIG_SMEM[ck] = False
    return _BIG_SMEM[ck]


def _plan(family, n_rows, n_cls, dt, dev, key=None, aligned=False, masked=False,
          peelable=False, softcap=False):
    """The launch plan (gpuce/_cuda_plan.py), with a forced strategy and the driver's
    answer to block_cached's shared-memory opt-in; ``masked`` names the class-mask
    variants of its kernels."""
    forced = _forced_strategy()
    plan = _masked_plan(plan_for(n_rows, n_cls, dt, dev, family, key, forced, aligned,
                                 peelable, softcap), masked)
    if plan.strategy == "block_cached" and not _allow_smem(plan.kernel, plan.key,
                                                           plan.shared_bytes, dev):
        if forced:
            raise ValueError(f"strategy: block_cached cannot hold {n_cls} {dt} values per "
                             f"row in shared memory on this device")
        plan = _masked_plan(plan_for(n_rows, n_cls, dt, dev, family, key, "block", aligned,
                                     peelable, softcap), masked)
    return plan


def _masked_plan(plan, masked):
    if not masked:
        return plan
    names = tuple(cuda_registry.masked_name(n) for n in plan.kernels)
    return dataclasses.replace(plan, kernel=names[0], kernels=names)


# ---- the backend ----------------------------------------------------------------------------

class CudaBackend:
    name = "cuda"

    def owns(self, x):
        return is_cuda_array(x)

    def check_same_device(self, a, b, name):
        la, aa = _lib_for(a)
        lb, bb = _lib_for(b)
        if la is not None and lb is not None and la.device(aa) != lb.device(bb):
            raise TypeError(f"{name}: is on GPU {lb.device(bb)}, the logits on GPU {la.device(aa)}")

    # ---- softmax family ----------------------------------------------------------------------

    def softmax(self, x, axis, dt, out, log, class_mask=None, per_row=False):
        mask = None if class_mask is None else (class_mask, per_row)
        return self._softmax_entry(x, axis, dt, out, LOG_SOFTMAX if log else SOFTMAX, mask)

    def logsumexp(self, x, axis, dt):
        return self._softmax_entry(x, axis, dt, None, LOGSUMEXP)

    def _softmax_entry(self, x, axis, dt, out, mode, mask=None):
        lib, xa = _lib_for(x)
        outa = None if out is None else _lib_for(out)[1]
        with _on_device(lib.device(xa)):
            if lib is _NUMBA and (axis != xa.ndim - 1 or not xa.is_c_contiguous() or
                                  (outa is not None and not outa.is_c_contiguous())):
                lib, xa = _relayout(xa)
                outa = None if outa is None else _relayout(outa)[1]
                res = self._softmax(lib, xa, axis, dt, outa, mode, mask)
                return out if out is not None else _to_numba(res)
            res = self._softmax(lib, xa, axis, dt, outa, mode, mask)
        return out if out is not None else res

    def _softmax(self, lib, x, axis, dt, out, mode, mask=None):
        T = traits(dt)
        n_cls = tuple(x.shape)[axis]
        rows = lib.rows(x, axis)
        moved = tuple(rows.shape)
        n_rows = math.prod(moved[:-1])
        stream = lib.stream(x)
        if mask is not None:
            mask = self._mask_view(*mask, axis, n_cls, stream)
        if mode == LOGSUMEXP:
            if n_cls == 0:
                return lib.from_host(x, np.full(moved[:-1], -np.inf, dtype=T.acc_name))
            res = lib.empty(x, moved[:-1], T.acc_name)
            if n_rows:
                self._run_softmax(lib, rows, None, lib.kview(res, res.dtype), n_rows, n_cls, dt,
                                  mode, stream)
            return res
        direct = None
        if out is not None:
            out_rows = lib.moveaxis(out, axis, -1)
            if lib.contiguous(out_rows) and (not _overlap(out_rows, rows) or
                                             _same_buffer(out_rows, rows)):
                direct = out_rows  # written in place (x itself is fine: see the kernels)
        dest = direct if direct is not None else lib.empty(x, moved, dt)
        if n_rows and n_cls:
            self._run_softmax(lib, rows, dest, None, n_rows, n_cls, dt, mode, stream, mask)
        if out is None:
            return lib.moveaxis(dest, -1, axis)
        if direct is None:
            lib.copy_into(out, lib.moveaxis(dest, -1, axis))
        return out

    def _run_softmax(self, lib, rows, dest, lse_v, n_rows, n_cls, dt, mode, stream, mask=None):
        T = traits(dt)
        ptrs = (lib.ptr(rows),) + (() if dest is None else (lib.ptr(dest),))
        phase = row_phase(ptrs[0], dt)  # the peeling kernels take x and out at one phase
        plan = _plan("softmax", n_rows, n_cls, dt, _device_limits(lib.device(rows)),
                     aligned=row_aligned(n_cls, dt, *ptrs), masked=mask is not None,
                     peelable=phase is not None and all(p % 16 == ptrs[0] % 16 for p in ptrs))
        mask_args = () if mask is None else mask  # (mask view, m_stride)
        view = _WORDS if plan.vectorized else T.raw
        if plan.peeled:  # (storage view, int32 view from the first 16-byte boundary)
            x_v = (lib.kview(rows, T.raw), _word_view(lib, rows, phase, dt))
            out_v = (x_v if dest is None else
                     (lib.kview(dest, T.raw), _word_view(lib, dest, phase, dt)))
            tail = (np.int64(phase),)
        else:
            x_v = (lib.kview(rows, view),)
            out_v = x_v if dest is None else (lib.kview(dest, view),)
            tail = () if plan.part == "split" else (np.int64(0),)  # (an unused argument)
        # stand-ins for the output this mode does not write
        lse_v = _stand_in(lib, rows, T.acc_name) if lse_v is None else lse_v
        ints = (np.int64(n_rows), np.int64(n_cls), np.int64(mode))
        if plan.part == "split":
            ws = lib.kview(lib.empty(rows, (2 * n_rows * plan.n_split,), T.acc_name),
                           np.dtype(T.acc_name))
            _launch(plan.kernels[0], dt, plan.grid, plan.block, stream, 0, *x_v, ws,
                    ints[0], ints[1], np.int64(plan.n_split), *tail, *mask_args)
            _launch(plan.kernels[1], dt, plan.grid, plan.block, stream, 0, *x_v, *out_v,
                    lse_v, ws, *ints, np.int64(plan.n_split), *tail, *mask_args)
        else:
            _launch(plan.kernel, dt, plan.grid, plan.block, stream, plan.shared_bytes, *x_v,
                    *out_v, lse_v, *ints, *tail, *mask_args)

    def _mask_view(self, class_mask, per_row, axis, n_cls, stream):
        """(bool kernel view of a checked class mask laid out like the rows, its row stride:
        C, or 0 for one (C,) row shared by every row)."""
        lib, m = self._converted_array(class_mask, "bool", axis if per_row else None, stream)
        return lib.kview(m, np.dtype(np.bool_)), np.int64(n_cls if per_row else 0)

    # ---- cross entropy -----------------------------------------------------------------------

    def cross_entropy(self, req):
        lib, x = _lib_for(req.logits)
        arrays = [a for a in (req.logits, req.target, req.weight, req.grad_output, req.out,
                              req.class_mask)
                  if a is not None and not isinstance(a, (int, float))]
        with _on_device(lib.device(x)):
            if lib is _NUMBA and not all(_lib_for(a)[1].is_c_contiguous() for a in arrays):
                loss, grad = self._cross_entropy(*self._relayout_request(req))
                if grad is not None:
                    grad = (req.logits if req.inplace else req.out if req.out is not None
                            else _to_numba(grad))
                return _to_numba(loss), grad
            return self._cross_entropy(lib, req)

    def _relayout_request(self, req):
        conv = {}
        lib = None
        for field in ("logits", "target", "weight", "grad_output", "out", "class_mask"):
            v = getattr(req, field)
            if v is not None and not isinstance(v, (int, float)):
                lib, conv[field] = _relayout(_lib_for(v)[1])
        return lib, dataclasses.replace(req, **conv)

    def _cross_entropy(self, lib, req):
        dt = req.dtype
        T = traits(dt)
        A = T.acc_np
        acc_name = T.acc_name
        acc_dt = np.dtype(acc_name)
        _, x = _lib_for(req.logits)
        shape = tuple(x.shape)
        n_cls = shape[-1]  # (not req.n_classes: the simulator's shapes refuse negative indices)
        n_rows = math.prod(shape[:-1])
        stream = lib.stream(x)
        rows = lib.rows(x, -1)

        # per-row losses for 'none'; for mean and sum the kernel writes the total itself
        total = req.reduction != "none"
        if not total:
            loss = lib.empty(x, shape[:-1], acc_name)
            loss_v = lib.kview(loss, acc_dt)
        elif n_rows:
            loss = lib.empty(x, (), acc_name)
            loss_v = lib.kview(lib.reshape(loss, (1,)), acc_dt)
        else:
            loss_v = lib.from_host(x, np.zeros(1, acc_name))  # nothing to launch
            loss = lib.reshape(loss_v, ())
        ctr_v = _counter(lib, x, stream) if (total and n_rows) else _stand_in(lib, x, "int32")
        # unused array arguments get stand-ins of the right type that the kernel never touches
        key = dt  # kernel variant: the logits' dtype (and the soft targets' if it differs)
        q_lib = q = None
        if req.soft:
            if _dtype_name(req.target) != dt and dt in cuda_registry.HALF_SOFT:
                key = (dt, "float32")  # probabilities used as given, not rounded to halves
            q_lib, q = self._converted_array(req.target, key[1] if key != dt else dt, -1,
                                             stream)
            t_v = _stand_in(lib, x, "int64")
        else:
            t_v = self._converted(req.target, "int64", None, stream)
        weighted = req.weight is not None
        w_v = (self._converted(req.weight, acc_name, None, stream) if weighted
               else loss_v)
        go = req.grad_output
        if go is None or isinstance(go, (int, float)):
            go_mode, go_scalar, go_v = 0, A(1.0 if go is None else go), loss_v
        else:
            go_v = self._converted(go, acc_name, None, stream)
            go_mode, go_scalar = (1 if req.reduction == "none" else 2), A(1.0)
        g_lib = g = finish = None
        if req.want_grad:
            g_lib, g, finish = self._grad_buffer(lib, req, x, rows)

        mask_args = ()  # the class-mask variant's (mask, m_stride, n_live)
        if req.class_mask is not None:
            mask_v, m_stride = self._mask_view(req.class_mask, req.mask_per_row, -1, n_cls,
                                               stream)
            n_live = loss_v  # a stand-in: read only with label smoothing
            if req.label_smoothing > 0 and n_rows:
                n_mrows = n_rows if req.mask_per_row else 1
                n_live = lib.kview(lib.empty(x, (n_mrows,), acc_name), acc_dt)
                _launch("ce_mask_live", acc_name, _grid_for(n_mrows * _SMALL_BLOCK),
                        _SMALL_BLOCK, stream, 0, mask_v, n_live, np.int64(n_mrows),
                        np.int64(n_cls))
            mask_args = (mask_v, m_stride, n_live)

        if req.validate and not req.soft and n_rows:
            self._validate(lib, x, t_v, n_rows, n_cls, req.ignore_index, stream, mask_args)

        # mean divisors: computed on the device for hard targets (no sync), known for soft
        use_st, st_v = 0, loss_v
        inv_ce = inv_z = A(1.0)
        if req.reduction == "mean":
            if req.soft:
                inv_ce = inv_z = A(0.0 if n_rows == 0 else 1.0 / n_rows)
            elif n_rows:
                st_v = lib.kview(lib.empty(x, (2,), acc_name), acc_dt)
                use_st = 1
                n_part = _partials(n_rows)
                part = lib.kview(lib.empty(x, (2 * n_part,), "float64"), _F64)
                _launch("ce_target_stats", acc_name, n_part, _SMALL_BLOCK, stream, 0, t_v, w_v,
                        part, st_v, ctr_v, np.int64(n_rows), np.int64(n_cls),
                        np.int64(req.ignore_index), np.int64(weighted))

        if n_rows:
            ptrs = [lib.ptr(rows)] + [lb.ptr(a) for lb, a in ((g_lib, g), (q_lib, q))
                                      if a is not None]
            # the peeling kernel takes x and g at one phase (q it reads by element)
            phase = row_phase(ptrs[0], dt)
            peelable = phase is not None and (g is None or g_lib.ptr(g) % 16 == ptrs[0] % 16)
            plan = _plan("ce", n_rows, n_cls, dt, _device_limits(lib.device(x)), key,
                         row_aligned(n_cls, dt, *ptrs), masked=bool(mask_args),
                         softcap=bool(req.softcap and req.softcap > 0), peelable=peelable)
            if plan.peeled:  # (storage view, int32 view from the first 16-byte boundary)
                x_v = (lib.kview(rows, T.raw), _word_view(lib, rows, phase, dt))
                g_v = (x_v if g is None else
                       (g_lib.kview(g, T.raw), _word_view(g_lib, g, phase, dt)))
                q_v = x_v[0] if q is None else q_lib.kview(q, traits(_dtype_name(q)).raw)
            else:
                view = _WORDS if plan.vectorized else T.raw
                x_v = lib.kview(rows, view)
                g_v = x_v if g is None else g_lib.kview(g, view)
                q_v = (x_v if q is None else
                       q_lib.kview(q, _WORDS if plan.vectorized else traits(_dtype_name(q)).raw))
            ints = (np.int64(n_rows), np.int64(n_cls), np.int64(req.ignore_index),
                    np.int64(req.soft), np.int64(weighted), np.int64(req.want_grad),
                    np.int64(go_mode), np.int64(use_st), np.int64(total))
            part = (lib.kview(lib.empty(x, (plan.grid,), "float64"), _F64) if total
                    else _stand_in(lib, x, "float64"))
            eps, zl, cap = A(req.label_smoothing), A(req.z_loss), A(req.softcap or 0.0)
            floats = (eps, zl, cap, go_scalar, inv_ce, inv_z)
            if plan.part == "split":
                ws = lib.kview(lib.empty(x, (n_rows * (4 * plan.n_split + 1),), acc_name),
                               acc_dt)
                _launch(plan.kernels[0], key, plan.grid, plan.block, stream, 0, x_v, q_v,
                        t_v, w_v, ws, *ints[:5], eps, cap, np.int64(plan.n_split), *mask_args)
                _launch(plan.kernels[1], key, plan.grid, plan.block, stream, 0, x_v, g_v, q_v,
                        t_v, w_v, go_v, loss_v, st_v, part, ctr_v, ws, *ints, *floats,
                        np.int64(plan.n_split), *mask_args)
            elif plan.peeled:
                _launch(plan.kernel, key, plan.grid, plan.block, stream, plan.shared_bytes,
                        *x_v, *g_v, q_v, t_v, w_v, go_v, loss_v, st_v, part, ctr_v, *ints,
                        *floats, np.int64(phase), *mask_args)
            else:
                _launch(plan.kernel, key, plan.grid, plan.block, stream, plan.shared_bytes,
                        x_v, g_v, q_v, t_v, w_v, go_v, loss_v, st_v, part, ctr_v, *ints,
                        *floats, np.int64(0), *mask_args)
        return loss, (finish() if finish is not None else None)

    def _grad_buffer(self, lib, req, x, rows):
        """(library, C-contiguous array the kernel writes, function returning the user's
        gradient)."""
        if req.inplace:
            if _same_buffer(rows, x):
                return lib, rows, lambda: req.logits

            def copy_back():  # strided logits: the kernel wrote the contiguous copy
                lib.copy_into(x, rows)
                return req.logits
            return lib, rows, copy_back
        if req.out is not None:
            lib_out, out = _lib_for(req.out)
            if lib_out.contiguous(out) and (not _overlap(out, rows) or _same_buffer(out, rows)):
                return lib_out, out, lambda: req.out
            if lib_out is not lib:
                raise TypeError("out: a non-contiguous out= must come from the logits' array "
                                "library")
            tmp = lib.empty(x, tuple(x.shape), req.dtype)

            def copy_out():
                lib.copy_into(out, tmp)
                return req.out
            return lib, tmp, copy_out
        grad = lib.empty(x, tuple(x.shape), req.dtype)
        return lib, grad, lambda: grad

    def _converted(self, a, dt, axis, stream):
        """Flat C-order kernel view of ``a`` as dtype ``dt``, converted on the device (on the
        logits' ``stream``) if needed. ``a`` may come from another array library."""
        lib, arr = self._converted_array(a, dt, axis, stream)
        return lib.kview(arr, np.dtype(np.int64) if dt == "int64" else traits(dt).raw)

    def _converted_array(self, a, dt, axis, stream):
        """(library, C-contiguous array of dtype ``dt``) holding ``a``."""
        lib, a = _lib_for(a)
        if axis is not None or (a.ndim and not lib.contiguous(a)):
            axis = a.ndim - 1 if axis is None else axis
            try:
                a = lib.rows(a, axis)
            except _NeedsLayout:
                lib, a = _relayout(a)
                a = lib.rows(a, axis)
        src = _dtype_name(a)
        if src == dt:
            return lib, a
        raw = np.dtype(np.int64) if dt == "int64" else traits(dt).raw
        dst = lib.empty(a, tuple(a.shape), dt)
        n = math.prod(a.shape)
        if n:
            src_raw = traits(src).raw if src in _FLOATS else np.dtype(src)
            _launch("convert", (src, dt), _grid_for(n), _SMALL_BLOCK, stream, 0,
                    lib.kview(a, src_raw), lib.kview(dst, raw), np.int64(n))
        return lib, dst

    def _validate(self, lib, x, t_v, n_rows, n_cls, ignore_index, stream, mask_args=()):
        bad = lib.kview(lib.from_host(x, np.array([n_rows], dtype=np.int64)), np.dtype(np.int64))
        _launch("check_targets", None, _grid_for(n_rows), _SMALL_BLOCK, stream, 0, t_v, bad,
                np.int64(n_rows), np.int64(n_cls), np.int64(ignore_index))
        first = int(_to_host(bad, stream)[0])  # the host sync that validate=True asks for
        if first < n_rows:
            value = int(_to_host(t_v[first:first + 1], stream)[0])
            raise ValueError(f"target: class index {value} (row {first}) is outside "
                             f"[0, {n_cls}) and is not ignore_index={ignore_index}")
        if mask_args:
            mask_v, m_stride, _ = mask_args
            _launch("check_masked_targets", None, _grid_for(n_rows), _SMALL_BLOCK, stream, 0,
                    t_v, mask_v, bad, np.int64(n_rows), np.int64(n_cls), np.int64(ignore_index),
                    m_stride)
            first = int(_to_host(bad, stream)[0])
            if first < n_rows:
                value = int(_to_host(t_v[first:first + 1], stream)[0])
                raise ValueError(f"class_mask: the target class {value} of row {first} is "
                                 "masked; a row's target must take part (or be ignore_index)")


_FLOATS = ("float16", "bfloat16", "float32", "float64")
_SMALL_BLOCK = 64 if SIMULATOR else MAX_BLOCK  # threads of the one-block helper kernels


_F64 = np.dtype(np.float64)
_WORDS = np.dtype(np.int32)  # the 128-bit kernels' view of rows


def _word_view(lib, a, phase, dt):
    """The int32 view a peeling kernel streams (kernels/cuda_vec.py, ``peel``): a's whole
    16-byte chunks, from its first 16-byte boundary (possibly empty)."""
    skip = word_view_skip(phase, dt)
    n = max(0, lib.numel(a) - skip) // step_elems(dt) * step_elems(dt)
    return lib.kview(lib.reshape(a, (-1,))[skip:skip + n], _WORDS)


def _grid_for(n):
    return max(1, min(-(-n // _SMALL_BLOCK), 2 if SIMULATOR else 1024))


def _partials(n):
    """Blocks of a two-level sum over n rows: a fixed function of n, so sums are repeatable."""
    return 2 if SIMULATOR else max(1, min(-(-n // (_SMALL_BLOCK * 16)), 512))


_STAND_INS = {}
_COUNTERS = {}


def _counter(lib, like, stream):
    """Two int32 last-block tickets (0: target stats, 1: loss total), zeroed once per
    library, device and stream; the kernels reset them. Kernels on one stream run in order,
    so they can share them."""
    key = (lib.name, lib.device(like), id(stream) if stream else 0)
    a = _COUNTERS.get(key)
    if a is None:
        a = _COUNTERS[key] = (lib.kview(lib.from_host(like, np.zeros(2, np.int32)),
                                        np.dtype(np.int32)), stream)  # (keeps the stream alive)
    return a[0]


def _stand_in(lib, like, dt):
    """A one-element array of dtype ``dt`` for an argument the kernel will not touch."""
    key = (lib.name, lib.device(like), dt)
    a = _STAND_INS.get(key)
    if a is None:
        a = _STAND_INS[key] = lib.kview(lib.empty(like, (1,), dt), np.dtype(dt))
    return a


_dispatch.register(CudaBackend())
