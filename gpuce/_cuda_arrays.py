"""The array libraries the CUDA backend takes: CuPy arrays, CUDA torch tensors, numba device
arrays (real or simulated) and other objects with ``__cuda_array_interface__`` or a CUDA
``__dlpack__``.

Each library is one small adapter (``_Lib``): its device and current stream, how to allocate
an output like the input, a C-contiguous rows view, and ``kview``, the flat numba view a
kernel takes (half floats as raw 16-bit words). ``lib_for(x)`` picks the adapter.

Objects with ``__cuda_array_interface__`` are viewed as numba device arrays (results come
back as numba device arrays); objects with only a CUDA ``__dlpack__`` are imported with CuPy
(else torch) and results come back in that library. Numba device arrays that are not
C-contiguous with the class axis last are laid out through CuPy or torch (zero-copy
imports); without either they raise TypeError.
"""
import sys

import numpy as np
from numba import cuda

from . import _dispatch
from .kernels.cuda_dtypes import SIMULATOR


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
        a = a.reshape(-1)
        return a if a.dtype == raw else a.view(raw)

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
        a = a.reshape(-1)
        if a.dtype != raw:
            a = a.view(raw)
        return cuda.as_cuda_array(a, sync=False)

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
        a = a.detach().reshape(-1)
        if raw == np.int32 and a.dtype != self.torch.int32:  # 32-bit words (cuda_vec)
            a = a.view(self.torch.int32)
        elif a.dtype == self.torch.bfloat16:  # torch exports no bfloat16 array interface
            a = a.view(self.torch.int16)
        return cuda.as_cuda_array(a, sync=False)

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
        if axis % max(a.ndim, 1) == a.ndim - 1 and a.is_c_contiguous():
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
        if axis % max(a.ndim, 1) == a.ndim - 1 and a.is_c_contiguous():
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


def is_cuda_array(x):
    """Does the CUDA backend take ``x``? (without importing any array library)"""
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


def _overlap(a, b):
    a0, a1 = _lib_for(a)[0].span(a)
    b0, b1 = _lib_for(b)[0].span(b)
    return a0 < b1 and b0 < a1


def _same_buffer(a, b):
    la, lb = _lib_for(a)[0], _lib_for(b)[0]
    return (la.ptr(a) == lb.ptr(b) and tuple(a.shape) == tuple(b.shape)
            and tuple(la.strides(a)) == tuple(lb.strides(b)))
