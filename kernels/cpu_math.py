"""Scalar numerics for the CPU kernels, written so LLVM's loop vectoriser can use them.

pip's llvmlite has no SVML, so ``np.exp`` stays a scalar libm call inside a loop.
``exp_nonpos`` is built from arithmetic, a rounding and a bit cast, all of which
vectorise. Half-precision values travel as raw 16-bit words (numba has no float16
arrays) and are widened/narrowed here.
"""
import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}  # no nnan/ninf: -inf masks are legal
jit = njit(inline="never", fastmath=FASTMATH)
# For functions that divide inside the kernels' element loops: numba's default (Python)
# error model guards every float division with a raise on zero, and that branch stops the
# loop from vectorising -- which also turns the row's sum of exp into one serial fp32 sum
# (1e-5 relative error at C = 128k). The numpy model divides as C does.
jit_nocheck = njit(inline="never", fastmath=FASTMATH, error_model="numpy")


@intrinsic
def _bits_to_f32(typingctx, bits):
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _bits_to_f64(typingctx, bits):
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return sig, codegen


@intrinsic
def _f32_to_bits(typingctx, value):
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def _f64_to_bits(typingctx, value):
    sig = types.int64(types.float64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return sig, codegen


@intrinsic
def _f16bits_to_f32(typingctx, bits):
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        half = builder.bitcast(args[0], ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_to_f16bits(typingctx, value):
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        half = builder.fptrunc(args[0], ir.HalfType())  # round to nearest even
        return builder.bitcast(half, ir.IntType(16))

    return sig, codegen


# ---- element loads / stores per storage dtype -------------------------------------

@jit
def load_f16(v):
    return _f16bits_to_f32(v)


@jit
def store_f16(v):
    return _f32_to_f16bits(np.float32(v))


@jit
def load_bf16(v):
    return _bits_to_f32(np.int32(v) << 16)


@jit
def store_bf16(v):
    bits = _f32_to_bits(np.float32(v))
    # round to nearest even; NaN keeps a quiet payload bit
    rounded = (bits + np.int32(0x7FFF) + ((bits >> 16) & np.int32(1))) >> 16
    is_nan = (bits & np.int32(0x7FFFFFFF)) > np.int32(0x7F800000)
    out = np.int32(0x7FC0) if is_nan else rounded
    return np.uint16(out & np.int32(0xFFFF))


@jit
def load_f32(v):
    return np.float32(v)


@jit
def store_f32(v):
    return np.float32(v)


@jit
def load_f64(v):
    return np.float64(v)


@jit
def store_f64(v):
    return np.float64(v)


# ---- order keys: the row max as an integer max, which vectorises without fast-math ----
# Flipping the magnitude bits of negative floats makes signed-integer order equal float
# order (-inf lowest, +NaN above +inf), so the max is found on the raw storage words.
# Written as LLVM IR so the integers stay 32-bit (numba would widen them to 64).

def _flip(builder, bits, width):
    sign = builder.ashr(bits, ir.Constant(bits.type, width - 1))
    mask = builder.and_(sign, ir.Constant(bits.type, (1 << (width - 1)) - 1))
    return builder.xor(bits, mask)


def _key_intrinsic(arg_type, ret_type, to_bits):
    @intrinsic
    def key(typingctx, value):
        def codegen(context, builder, signature, args):
            bits, width = to_bits(builder, args[0])
            return _flip(builder, bits, width)
        return ret_type(arg_type), codegen
    return key


key_f32 = _key_intrinsic(types.float32, types.int32,
                         lambda b, v: (b.bitcast(v, ir.IntType(32)), 32))
key_f64 = _key_intrinsic(types.float64, types.int64,
                         lambda b, v: (b.bitcast(v, ir.IntType(64)), 64))
key_16 = _key_intrinsic(types.uint16, types.int32,
                        lambda b, v: (b.sext(v, ir.IntType(32)), 16))


@intrinsic
def unkey_f32(typingctx, k):
    def codegen(context, builder, signature, args):
        return builder.bitcast(_flip(builder, args[0], 32), ir.FloatType())
    return types.float32(types.int32), codegen


@intrinsic
def unkey_f64(typingctx, k):
    def codegen(context, builder, signature, args):
        return builder.bitcast(_flip(builder, args[0], 64), ir.DoubleType())
    return types.float64(types.int64), codegen


@intrinsic
def unkey_16(typingctx, k):
    def codegen(context, builder, signature, args):
        return builder.trunc(_flip(builder, args[0], 16), ir.IntType(16))
    return types.uint16(types.int32), codegen


@intrinsic
def _pow2_f32(typingctx, n):
    """2**n for an integral float n in [-127, 127] (-127 gives 0) by building the exponent."""
    def codegen(context, builder, signature, args):
        i = builder.fptosi(args[0], ir.IntType(32))
        i = builder.add(i, ir.Constant(ir.IntType(32), 127))
        i = builder.shl(i, ir.Constant(ir.IntType(32), 23))
        return builder.bitcast(i, ir.FloatType())
    return types.float32(types.float32), codegen


@intrinsic
def _pow2_f64(typingctx, n):
    def codegen(context, builder, signature, args):
        i = builder.fptosi(args[0], ir.IntType(64))
        i = builder.add(i, ir.Constant(ir.IntType(64), 1023))
        i = builder.shl(i, ir.Constant(ir.IntType(64), 52))
        return builder.bitcast(i, ir.DoubleType())
    return types.float64(types.float64), codegen


# ---- exp for arguments <= 0 (every softmax exponent is x - max) -------------------

_LN2_HI32 = np.float32(0.693145751953125)
_LN2_LO32 = np.float32(1.428606765330187e-06)
_LOG2E32 = np.float32(1.4426950408889634)
_TWO_M64_32 = np.float32(2.0 ** -64)


@jit
def exp_nonpos_f32(x):
    """exp(x) for x <= 0 in float32, ~1 ulp, subnormal results included (a bf16 softmax
    keeps values down to 9e-41); exactly 0 below -104 (under half the least subnormal)
    and for -inf."""
    x = np.float32(x)
    lo = np.float32(-104.0)
    xc = lo if x < lo else x  # clamps -inf into range for the bit trick; NaN stays NaN
    n = np.rint(xc * _LOG2E32)
    r = xc - n * _LN2_HI32
    r = r - n * _LN2_LO32
    # Taylor of e^r on |r| <= ln2/2, degree 7: truncation < 6e-9 relative
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    # 2**n in two factors: 2**(n + 64) is a normal float for n in [-150, 0], so p times it
    # is exact, and the one rounding is the constant 2**-64, also into the subnormals
    # (2**n alone has no float32 below n = -126: the result was flushed to 0 there)
    return np.float32(0.0) if x < lo else (p * _pow2_f32(n + np.float32(64.0))) * _TWO_M64_32


_LN2_HI64 = 0.6931471803691238
_LN2_LO64 = 1.9082149292705877e-10
_LOG2E64 = 1.4426950408889634
_TWO_M512 = 2.0 ** -512


@jit
def exp_nonpos_f64(x):
    """exp(x) for x <= 0 in float64, ~1 ulp, subnormal results included; exactly 0 below
    -746 (under half the least subnormal) and for -inf."""
    x = np.float64(x)
    xc = -746.0 if x < -746.0 else x
    n = np.rint(xc * _LOG2E64)
    r = xc - n * _LN2_HI64
    r = r - n * _LN2_LO64
    # Taylor degree 13 on |r| <= ln2/2: truncation < 1e-17 relative
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    # 2**n as 2**(n + 512) * 2**-512, as in exp_nonpos_f32: one rounding into the subnormals
    return 0.0 if x < -746.0 else (p * _pow2_f64(n + 512.0)) * _TWO_M512


@jit_nocheck
def tanh_f32(u):
    """tanh in float32 from exp_nonpos_f32; Taylor near 0 avoids the 1 - e cancellation."""
    u = np.float32(u)
    a = abs(u)
    e = exp_nonpos_f32(np.float32(-2.0) * a)
    big = (np.float32(1.0) - e) / (np.float32(1.0) + e)
    u2 = a * a
    small = np.float32(62.0 / 2835.0)
    small = small * u2 - np.float32(17.0 / 315.0)
    small = small * u2 + np.float32(2.0 / 15.0)
    small = small * u2 - np.float32(1.0 / 3.0)
    small = a + a * u2 * small
    t = small if a < np.float32(0.25) else big
    return -t if u < np.float32(0.0) else t


@jit_nocheck
def tanh_f64(u):
    return math.tanh(u)


@jit_nocheck
def div(a, b):
    """a / b without the zero check (see jit_nocheck); b is a softcap > 0 here."""
    return a / b



@intrinsic
def fence(typingctx, value):
    """llvm.arithmetic.fence: fast-math may not reassociate across it."""
    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(args[0].type, [args[0].type])
        name = "llvm.arithmetic.fence." + ("f32" if args[0].type == ir.FloatType() else "f64")
        fn = cgutils.get_or_insert_function(builder.module, fnty, name)
        return builder.call(fn, [args[0]])
    return value(value), codegen


@jit
def gap_plus(m, z, log_s):
    """(m - z) + log s = -log p_z, kept in this order: exact when m and z are large and close
    (reassociated into (m + log s) - z it would carry the rounding of lse)."""
    return fence(m - z) + log_s
