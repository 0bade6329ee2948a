"""CUDA backend: CuPy arrays, CUDA torch tensors, numba device arrays (real or simulated) and
other CUDA arrays, run by the Numba CUDA kernels in gpuce.kernels.cuda_*.

Host code only checks, picks a strategy, allocates and launches:
- Outputs come from the input's own library (CuPy's memory pool, torch's caching allocator,
  numba for numba arrays), and kernels launch on that library's current stream.
- Nothing synchronises with the host unless ``validate=True``. Mean divisors are computed on
  the device and row losses are summed there, in a fixed order (no float atomics).
- Kernels have explicit signatures and are compiled once per (kernel, dtype), on first use.

Strategy by row length C (see kernels/cuda_cross_entropy.py): ``warp`` (C <= 512; 256 for
float64), ``split`` (few rows of C >= 16384), ``block_cached`` (row fits in shared memory),
``block`` (any C). Force one with the environment variable ``GPUCE_CUDA_STRATEGY=warp|
block_cached|block|split`` (read at every call) or ``with gpuce._cuda.force_strategy("split"):``.
A forced strategy that cannot hold the row (warp, block_cached) raises ValueError.

Other CUDA arrays: objects with ``__cuda_array_interface__`` are viewed as numba device arrays
(results come back as numba device arrays); objects with only a CUDA ``__dlpack__`` are
imported with CuPy (else torch) and results come back in that library. Numba device arrays
that are not C-contiguous with the class axis last are laid out through CuPy or torch
(zero-copy imports); without either they raise TypeError.
"""
import contextlib
import math
import os
import sys
import threading

import numpy as np
from numba import cuda

from . import _dispatch
from .kernels import cuda_registry
from ._cuda_plan import MAX_BLOCK, SMEM_BUFFERS, STATIC_SMEM, DeviceLimits, plan_for
from .kernels.cuda_dtypes import SIMULATOR, traits
from .kernels.cuda_softmax import LOG_SOFTMAX, LOGSUMEXP, SOFTMAX

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


def _np_dtype(dt):
    if dt == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dt)


def _dtype_name(a):
    return str(a.dtype).replace("torch.", "")


# ---- array libraries ------------------------------------------------------------------------

class _Lib:
    """How gpuce handles one array library's device arrays. ``kview`` gives the flat numba
    view a kernel takes (half floats as raw 16-bit words); ``rows`` a C-contiguous array with
    the given axis last (the input itself when it already is one)."""
    name = "?"

    def device(self, a):
        return 0

    def stream(self, a):
        return 0

    def from_host(self, like, host):
        return cuda.to_device(np.ascontiguousarray(host))

    def contiguous(self, a):
        return a.is_c_contiguous()

    def kview(self, a, raw):
        if a.dtype != raw:
            a = a.view(raw)
        return a.reshape(-1)

    def reshape(self, a, shape):
        return a.reshape(shape)

    def numel(self, a):
        return a.size

    def itemsize(self, a):
        return a.dtype.itemsize

    def strides(self, a):
        return a.strides

    def span(self, a):
        """(first byte, last byte + 1) of the memory ``a`` can touch, for overlap checks."""
        ptr = self.ptr(a)
        if self.numel(a) == 0:
            return ptr, ptr
        lo = hi = ptr
        for n, st in zip(a.shape, self.strides(a)):
            if st >= 0:
                hi += (n - 1) * st
            else:
                lo += (n - 1) * st
        return lo, hi + self.itemsize(a)


class _CupyLib(_Lib):
    name = "cupy"

    def __init__(self, cp):
        self.cp = cp

    def device(self, a):
        return a.device.id

    def stream(self, a):
        return _external_stream(self.cp.cuda.get_current_stream().ptr)

    def empty(self, like, shape, dt):
        dtype = like.dtype if dt == _dtype_name(like) else _np_dtype(dt)
        with self.cp.cuda.Device(self.device(like)):
            return self.cp.empty(shape, dtype=dtype)

    def from_host(self, like, host):
        with self.cp.cuda.Device(self.device(like)):
            return self.cp.asarray(host)

    def contiguous(self, a):
        return a.flags.c_contiguous

    def rows(self, a, axis):
        moved = self.cp.moveaxis(a, axis, -1)
        return moved if moved.flags.c_contiguous else self.cp.ascontiguousarray(moved)

    def moveaxis(self, a, src, dst):
        return self.cp.moveaxis(a, src, dst)

    def kview(self, a, raw):
        if a.dtype != raw:
            a = a.view(raw)
        return cuda.as_cuda_array(a.reshape(-1), sync=False)

    def copy_into(self, dst, src):
        item = {2: np.int16, 4: np.int32, 8: np.int64}[dst.dtype.itemsize]
        dst.view(item)[...] = src.view(item)  # a bit copy, for dtypes CuPy cannot compute in

    def ptr(self, a):
        return a.data.ptr


class _TorchLib(_Lib):
    name = "torch"

    def __init__(self, torch):
        self.torch = torch

    def device(self, a):
        return a.device.index

    def stream(self, a):
        return _external_stream(self.torch.cuda.current_stream(a.device).cuda_stream)

    def empty(self, like, shape, dt):
        return self.torch.empty(shape, dtype=getattr(self.torch, dt), device=like.device)

    def from_host(self, like, host):
        return self.torch.from_numpy(np.ascontiguousarray(host)).to(like.device)

    def contiguous(self, a):
        return a.is_contiguous()

    def rows(self, a, axis):
        return a.detach().movedim(axis, -1).contiguous()

    def moveaxis(self, a, src, dst):
        return a.movedim(src, dst)

    def kview(self, a, raw):
        a = a.detach()
        if a.dtype == self.torch.bfloat16:  # torch exports no bfloat16 array interface
            a = a.view(self.torch.int16)
        return cuda.as_cuda_array(a.reshape(-1), sync=False)

    def copy_into(self, dst, src):
        dst.detach().copy_(src.detach())

    def ptr(self, a):
        return a.data_ptr()

    def numel(self, a):
        return a.numel()

    def itemsize(self, a):
        return a.element_size()

    def strides(self, a):
        return tuple(st * a.element_size() for st in a.stride())


class _NumbaLib(_Lib):
    """numba device arrays (and CUDA-array-interface objects viewed as them). Layout changes
    (a copy to C order, a moved axis) go through CuPy or torch: see _relayout."""
    name = "numba"

    def owns(self, x):
        from numba.cuda.cudadrv.devicearray import DeviceNDArray
        return isinstance(x, DeviceNDArray)

    def device(self, a):
        try:
            return a.gpu_data.context.device.id
        except AttributeError:
            return cuda.get_current_device().id

    def stream(self, a):
        return a.stream or 0

    def empty(self, like, shape, dt):
        if dt == "bfloat16":
            return cuda.device_array(shape, dtype=np.int16).view(_np_dtype(dt))
        return cuda.device_array(shape, dtype=_np_dtype(dt))

    def rows(self, a, axis):
        if axis == a.ndim - 1 and a.is_c_contiguous():
            return a
        raise _NeedsLayout

    def moveaxis(self, a, src, dst):
        if src % a.ndim == dst % a.ndim:
            return a
        raise _NeedsLayout

    def copy_into(self, dst, src):
        if not (dst.is_c_contiguous() and src.is_c_contiguous()):
            raise _NeedsLayout
        dst.copy_to_device(src)

    def ptr(self, a):
        return a.device_ctypes_pointer.value or 0


class _SimLib(_Lib):
    """The simulator's device arrays: numpy arrays underneath, so any layout is cheap."""
    name = "numba-simulator"

    def owns(self, x):
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        return isinstance(x, FakeCUDAArray)

    def empty(self, like, shape, dt):
        # junk-filled (NaN, or the most negative integer), so that unwritten outputs show up
        d = _np_dtype(dt)
        junk = np.iinfo(d).min if d.kind in "iu" else np.nan
        return cuda.to_device(np.full(shape, junk, dtype=d))

    def rows(self, a, axis):
        if axis == a.ndim - 1 and a.is_c_contiguous():
            return a
        return cuda.to_device(np.ascontiguousarray(np.moveaxis(a.copy_to_host(), axis, -1)))

    def moveaxis(self, a, src, dst):
        axes = list(range(a.ndim))
        axes.insert(dst % a.ndim, axes.pop(src % a.ndim))
        return a if axes == sorted(axes) else a.transpose(axes)

    def copy_into(self, dst, src):
        dst[...] = src.copy_to_host()

    def ptr(self, a):
        return a.__array_interface__["data"][0]


class _NeedsLayout(Exception):
    """A numba device array needs a layout change numba cannot do on the device."""


_STREAMS = {}


def _external_stream(ptr):
    if not ptr:
        return 0  # the legacy default stream
    s = _STREAMS.get(ptr)
    if s is None:  # kept: launch configurations are cached by id(stream)
        s = _STREAMS[ptr] = cuda.external_stream(ptr)
    return s


def _lib_for(x):
    """(library, x as that library's array) or (None, None)."""
    if SIMULATOR:
        return (_SIM, x) if _SIM.owns(x) else (None, None)
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(x, cp.ndarray):
        return _cupy(cp), x
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return (_torch(torch), x) if x.is_cuda else (None, None)
    if _NUMBA.owns(x):
        return _NUMBA, x
    if hasattr(x, "__cuda_array_interface__"):
        return _NUMBA, cuda.as_cuda_array(x, sync=False)
    if _dispatch._looks_like_device_array(x):
        return _from_dlpack(x)
    return None, None


def _from_dlpack(x):
    try:
        import cupy as cp
        return _cupy(cp), cp.from_dlpack(x)
    except ImportError:
        pass
    try:
        import torch
        return _torch(torch), torch.from_dlpack(x)
    except ImportError:
        return None, None


_LIBS = {}


def _cupy(cp):
    lib = _LIBS.get("cupy")
    if lib is None:
        lib = _LIBS["cupy"] = _CupyLib(cp)
    return lib


def _torch(torch):
    lib = _LIBS.get("torch")
    if lib is None:
        lib = _LIBS["torch"] = _TorchLib(torch)
    return lib


_NUMBA = _NumbaLib()
_SIM = _SimLib()


def _relayout(x):
    """A numba device array as a CuPy array or torch tensor (zero-copy), for layout changes."""
    try:
        import cupy as cp
        return _cupy(cp), cp.asarray(x)
    except ImportError:
        pass
    try:
        import torch
        return _torch(torch), torch.as_tensor(x, device="cuda")
    except ImportError:
        raise TypeError("numba device arrays must be C-contiguous with the class axis last "
                        "unless CuPy or torch is installed to lay them out") from None


def _to_numba(a):
    return None if a is None else cuda.as_cuda_array(a, sync=False)


def _to_host(view, stream):
    """Copy a (small) numba view to the host after the work queued on ``stream``."""
    host = view.copy_to_host(stream=stream)
    if stream:
        stream.synchronize()
    return host


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


def _plan(family, n_rows, n_cls, dt, dev, key=None):
    """The launch plan (gpuce/_cuda_plan.py), with a forced strategy and the driver's
    answer to block_cached's shared-memory opt-in."""
    forced = _forced_strategy()
    plan = plan_for(n_rows, n_cls, dt, dev, family, key, forced)
    if plan.strategy == "block_cached" and not _allow_smem(plan.kernel, plan.key,
                                                           plan.shared_bytes, dev):
        if forced:
            raise ValueError(f"strategy: block_cached cannot hold {n_cls} {dt} values per "
                             f"row in shared memory on this device")
        plan = plan_for(n_rows, n_cls, dt, dev, family, key, "block")
    return plan


# ---- the backend ----------------------------------------------------------------------------

class CudaBackend:
    name = "cuda"

    def owns(self, x):
        if SIMULATOR:
            return _SIM.owns(x)
        cp = sys.modules.get("cupy")
        if cp is not None and isinstance(x, cp.ndarray):
            return True
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(x, torch.Tensor):
            return x.is_cuda
        return (_NUMBA.owns(x) or hasattr(x, "__cuda_array_interface__")
                or _dispatch._looks_like_device_array(x))

    def check_same_device(self, a, b, name):
        la, aa = _lib_for(a)
        lb, bb = _lib_for(b)
        if la is not None and lb is not None and la.device(aa) != lb.device(bb):
            raise TypeError(f"{name}: is on GPU {lb.device(bb)}, the logits on GPU {la.device(aa)}")

    # ---- softmax family ----------------------------------------------------------------------

    def softmax(self, x, axis, dt, out, log):
        return self._softmax_entry(x, axis, dt, out, LOG_SOFTMAX if log else SOFTMAX)

    def logsumexp(self, x, axis, dt):
        return self._softmax_entry(x, axis, dt, None, LOGSUMEXP)

    def _softmax_entry(self, x, axis, dt, out, mode):
        lib, xa = _lib_for(x)
        outa = None if out is None else _lib_for(out)[1]
        with _on_device(lib.device(xa)):
            if lib is _NUMBA and (axis != xa.ndim - 1 or not xa.is_c_contiguous() or
                                  (outa is not None and not outa.is_c_contiguous())):
                lib, xa = _relayout(xa)
                outa = None if outa is None else _relayout(outa)[1]
                res = self._softmax(lib, xa, axis, dt, outa, mode)
                return out if out is not None else _to_numba(res)
            res = self._softmax(lib, xa, axis, dt, outa, mode)
        return out if out is not None else res

    def _softmax(self, lib, x, axis, dt, out, mode):
        T = traits(dt)
        n_cls = tuple(x.shape)[axis]
        rows = lib.rows(x, axis)
        moved = tuple(rows.shape)
        n_rows = math.prod(moved[:-1])
        stream = lib.stream(x)
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
            self._run_softmax(lib, rows, lib.kview(dest, T.raw), None, n_rows, n_cls, dt, mode,
                              stream)
        if out is None:
            return lib.moveaxis(dest, -1, axis)
        if direct is None:
            lib.copy_into(out, lib.moveaxis(dest, -1, axis))
        return out

    def _run_softmax(self, lib, rows, out_v, lse_v, n_rows, n_cls, dt, mode, stream):
        T = traits(dt)
        x_v = lib.kview(rows, T.raw)
        plan = _plan("softmax", n_rows, n_cls, dt, _device_limits(lib.device(rows)))
        # stand-ins for the output this mode does not write
        out_v = x_v if out_v is None else out_v
        lse_v = _stand_in(lib, rows, T.acc_name) if lse_v is None else lse_v
        ints = (np.int64(n_rows), np.int64(n_cls), np.int64(mode))
        if plan.part == "split":
            ws = lib.kview(lib.empty(rows, (2 * n_rows * plan.n_split,), T.acc_name),
                           np.dtype(T.acc_name))
            _launch("softmax_split_partial", dt, plan.grid, plan.block, stream, 0, x_v, ws,
                    ints[0], ints[1], np.int64(plan.n_split))
            _launch("softmax_split_finish", dt, plan.grid, plan.block, stream, 0, x_v, out_v,
                    lse_v, ws, *ints, np.int64(plan.n_split))
        else:
            _launch(f"softmax_{plan.part}", dt, plan.grid, plan.block, stream, plan.shared_bytes, x_v,
                    out_v, lse_v, *ints, np.int64(0))

    # ---- cross entropy -----------------------------------------------------------------------

    def cross_entropy(self, req):
        lib, x = _lib_for(req.logits)
        arrays = [a for a in (req.logits, req.target, req.weight, req.grad_output, req.out)
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
        import dataclasses
        conv = {}
        lib = None
        for field in ("logits", "target", "weight", "grad_output", "out"):
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
        x_v = lib.kview(rows, T.raw)

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
        if req.soft:
            if _dtype_name(req.target) != dt and dt in cuda_registry.HALF_SOFT:
                key = (dt, "float32")  # probabilities used as given, not rounded to halves
            q_v = self._converted(req.target, key[1] if key != dt else dt, -1, stream)
            t_v = _stand_in(lib, x, "int64")
        else:
            t_v = self._converted(req.target, "int64", None, stream)
            q_v = x_v
        weighted = req.weight is not None
        w_v = (self._converted(req.weight, acc_name, None, stream) if weighted
               else loss_v)
        go = req.grad_output
        if go is None or isinstance(go, (int, float)):
            go_mode, go_scalar, go_v = 0, A(1.0 if go is None else go), loss_v
        else:
            go_v = self._converted(go, acc_name, None, stream)
            go_mode, go_scalar = (1 if req.reduction == "none" else 2), A(1.0)
        g_v, finish = x_v, None
        if req.want_grad:
            g_v, finish = self._grad_buffer(lib, req, x, rows, T)

        if req.validate and not req.soft and n_rows:
            self._validate(lib, x, t_v, n_rows, n_cls, req.ignore_index, stream)

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
            plan = _plan("ce", n_rows, n_cls, dt, _device_limits(lib.device(x)), key)
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
                _launch("ce_split_partial", key, plan.grid, plan.block, stream, 0, x_v, q_v,
                        t_v, w_v, ws, *ints[:5], eps, cap, np.int64(plan.n_split))
                _launch("ce_split_finish", key, plan.grid, plan.block, stream, 0, x_v, g_v, q_v,
                        t_v, w_v, go_v, loss_v, st_v, part, ctr_v, ws, *ints, *floats,
                        np.int64(plan.n_split))
            else:
                _launch(plan.kernel, key, plan.grid, plan.block, stream, plan.shared_bytes,
                        x_v, g_v, q_v, t_v, w_v, go_v, loss_v, st_v, part, ctr_v, *ints,
                        *floats, np.int64(0))
        return loss, (finish() if finish is not None else None)

    def _grad_buffer(self, lib, req, x, rows, T):
        """(numba view the kernel writes, function returning the user's gradient)."""
        if req.inplace:
            if _same_buffer(rows, x):
                return lib.kview(rows, T.raw), lambda: req.logits

            def copy_back():  # strided logits: the kernel wrote the contiguous copy
                lib.copy_into(x, rows)
                return req.logits
            return lib.kview(rows, T.raw), copy_back
        if req.out is not None:
            lib_out, out = _lib_for(req.out)
            if lib_out.contiguous(out) and (not _overlap(out, rows) or _same_buffer(out, rows)):
                return lib_out.kview(out, T.raw), lambda: req.out
            if lib_out is not lib:
                raise TypeError("out: a non-contiguous out= must come from the logits' array "
                                "library")
            tmp = lib.empty(x, tuple(x.shape), req.dtype)

            def copy_out():
                lib.copy_into(out, tmp)
                return req.out
            return lib.kview(tmp, T.raw), copy_out
        grad = lib.empty(x, tuple(x.shape), req.dtype)
        return lib.kview(grad, T.raw), lambda: grad

    def _converted(self, a, dt, axis, stream):
        """Flat C-order kernel view of ``a`` as dtype ``dt``, converted on the device (on the
        logits' ``stream``) if needed. ``a`` may come from another array library."""
        lib, a = _lib_for(a)
        if axis is not None or (a.ndim and not lib.contiguous(a)):
            axis = a.ndim - 1 if axis is None else axis
            try:
                a = lib.rows(a, axis)
            except _NeedsLayout:
                lib, a = _relayout(a)
                a = lib.rows(a, axis)
        src = _dtype_name(a)
        raw = np.dtype(np.int64) if dt == "int64" else traits(dt).raw
        if src == dt:
            return lib.kview(a, raw)
        dst = lib.empty(a, tuple(a.shape), dt)
        n = math.prod(a.shape)
        if n:
            src_raw = traits(src).raw if src in _FLOATS else np.dtype(src)
            _launch("convert", (src, dt), _grid_for(n), _SMALL_BLOCK, stream, 0,
                    lib.kview(a, src_raw), lib.kview(dst, raw), np.int64(n))
        return lib.kview(dst, raw)

    def _validate(self, lib, x, t_v, n_rows, n_cls, ignore_index, stream):
        bad = lib.kview(lib.from_host(x, np.array([n_rows], dtype=np.int64)), np.dtype(np.int64))
        _launch("check_targets", None, _grid_for(n_rows), _SMALL_BLOCK, stream, 0, t_v, bad,
                np.int64(n_rows), np.int64(n_cls), np.int64(ignore_index))
        first = int(_to_host(bad, stream)[0])  # the host sync that validate=True asks for
        if first < n_rows:
            value = int(_to_host(t_v[first:first + 1], stream)[0])
            raise ValueError(f"target: class index {value} (row {first}) is outside "
                             f"[0, {n_cls}) and is not ignore_index={ignore_index}")


_FLOATS = ("float16", "bfloat16", "float32", "float64")
_SMALL_BLOCK = 64 if SIMULATOR else MAX_BLOCK  # threads of the one-block helper kernels


_F64 = np.dtype(np.float64)


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


def _overlap(a, b):
    a0, a1 = _lib_for(a)[0].span(a)
    b0, b1 = _lib_for(b)[0].span(b)
    return a0 < b1 and b0 < a1


def _same_buffer(a, b):
    la, lb = _lib_for(a)[0], _lib_for(b)[0]
    return (la.ptr(a) == lb.ptr(b) and tuple(a.shape) == tuple(b.shape)
            and tuple(la.strides(a)) == tuple(lb.strides(b)))


_dispatch.register(CudaBackend())
