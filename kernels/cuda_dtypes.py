"""Per-dtype element access for the CUDA kernels: storage type, accumulator, load, store.

Logits are stored as float16, bfloat16, float32 or float64 and are computed with in float32
(float64 for float64). bfloat16 has no Numba type, so it travels as raw 16-bit words (int16)
and is widened and rounded with bit operations here. Under the simulator the same helpers
are written with numpy, since libdevice does not exist there.
"""
import math
from functools import lru_cache
from types import ModuleType

import numpy as np
from numba import cuda, types
from numba.core import config

SIMULATOR = bool(config.ENABLE_CUDASIM)


def namespace(**attrs):
    """A module object holding device functions and constants: Numba resolves attribute
    access on modules at compile time (it cannot on other objects)."""
    mod = ModuleType("gpuce_kernels_namespace")
    mod.__dict__.update(attrs)
    return mod


DTYPES = ("float16", "bfloat16", "float32", "float64")

# Device functions are inlined by NVVM (LLVM's alwaysinline), not by Numba's IR inliner:
# the same code after optimisation, at a fraction of the compile time. The simulator's jit
# has no forceinline.
device = cuda.jit(device=True) if SIMULATOR else cuda.jit(device=True, forceinline=True)


@device
def bf16_bits(b):
    """bfloat16 bits (0..0xFFFF) of the float32 whose bits are ``b`` (an int64 in
    [0, 2**32)): round to nearest, ties to even; NaN stays a quiet NaN. Shared by the GPU and
    the simulator, so the simulator tests check this arithmetic."""
    if (b & 0x7FFFFFFF) > 0x7F800000:
        return (b >> 16) | 0x40  # NaN: keep the sign and payload's top, set the quiet bit
    return (b + 0x7FFF + ((b >> 16) & 1)) >> 16


if SIMULATOR:
    @device
    def load_bf16(v):
        bits = np.uint32(np.array(v, dtype=np.int16).view(np.uint16)) << np.uint32(16)
        return np.array(bits, dtype=np.uint32).view(np.float32)[()]

    @device
    def store_bf16(v):
        b = int(np.array(v, dtype=np.float32).view(np.uint32))
        return np.array(bf16_bits(b), dtype=np.uint16).view(np.int16)[()]

    @device
    def load_f16(v):
        return np.float32(v)

    @device
    def store_f16(v):
        return np.float16(v)
else:
    from numba.cuda import libdevice

    @device
    def load_bf16(v):
        # the 16 bits are the high half of a float32; the sign extension shifts out
        return libdevice.int_as_float(types.int32(types.int32(v) << 16))

    @device
    def store_bf16(v):
        return types.int16(bf16_bits(types.int64(libdevice.float_as_int(v)) & 0xFFFFFFFF))

    @device
    def load_f16(v):
        return types.float32(v)

    @device
    def store_f16(v):
        return v  # the store into a float16 array rounds to nearest even


@device
def load_f32(v):
    return v


@device
def store_f32(v):
    return v


@device
def load_f64(v):
    return v


@device
def store_f64(v):
    return v


@lru_cache(maxsize=None)
def traits(dt):
    """Namespace: storage (numba type of the array elements), raw (numpy dtype of the kernel's
    view), acc / acc_np (accumulator type), load / store (device functions)."""
    storage, raw, acc, load, store = {
        "float16": (types.float16, np.float16, types.float32, load_f16, store_f16),
        "bfloat16": (types.int16, np.int16, types.float32, load_bf16, store_bf16),
        "float32": (types.float32, np.float32, types.float32, load_f32, store_f32),
        "float64": (types.float64, np.float64, types.float64, load_f64, store_f64),
    }[dt]
    acc_np = np.dtype(acc.name).type
    return namespace(name=dt, storage=storage, raw=np.dtype(raw), acc=acc, acc_np=acc_np,
                           acc_name=acc.name, load=load, store=store,
                           ninf=acc_np(-math.inf), zero=acc_np(0.0), one=acc_np(1.0))


def array(t, layout="C"):
    """A 1-d array type of numba type ``t``, for explicit kernel signatures."""
    return types.Array(t, 1, layout)
