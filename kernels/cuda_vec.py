"""128-bit global memory access for the streaming loops of the CUDA kernels.

A kernel's rows are read and written in *steps* of K elements: K = 1 (the scalar variant, on
the storage-dtype arrays) or K = 16 bytes / element size (the vectorised variant: fp32 4,
fp16/bf16 8, fp64 2), on an int32 view of the same memory, one ``ld.global.v4.u32`` /
``st.global.v4.u32`` per step. The vectorised variant needs every row start 16-byte aligned
(the base pointer, and C x element size a multiple of 16): the host checks that and takes
the scalar variant otherwise.

``access(dt, K)`` gives ``load(a, step, vals)`` (K values of step ``step`` into the local
array ``vals``, in the accumulator dtype) and ``store(a, step, vals)`` (rounded once to the
storage dtype; half floats through the hardware's packed ``cvt.rn.{bf16x2,f16x2}.f32``,
which rounds to nearest even exactly like the scalar path). Steps are counted from the start
of the array: row r's first step is r x (C / K).

Under Numba's simulator the intrinsics are numpy functions with the same results.
"""
from functools import lru_cache

import numpy as np
from numba import types

from .cuda_dtypes import SIMULATOR, device, traits

BYTES = 16
U = types.uint64
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def step_elems(dt):
    """Elements per 128-bit access."""
    return BYTES // ITEMSIZE[dt]


if SIMULATOR:
    def ld4(a, i):
        i = int(i)
        return int(a[i]), int(a[i + 1]), int(a[i + 2]), int(a[i + 3])

    def st4(a, i, w0, w1, w2, w3):
        i = int(i)
        a[i], a[i + 1], a[i + 2], a[i + 3] = (_to_i32(int(w)) for w in (w0, w1, w2, w3))

    def _u32(w):
        return np.array(int(w) & 0xFFFFFFFF, dtype=np.uint32)

    def f32_of(w):
        return _u32(w).view(np.float32)[()]

    def bits_of_f32(v):
        return int(np.array(v, dtype=np.float32).view(np.int32))

    def f64_of(lo, hi):
        bits = (int(hi) & 0xFFFFFFFF) << 32 | (int(lo) & 0xFFFFFFFF)
        return np.array(bits, dtype=np.uint64).view(np.float64)[()]

    def lo_of_f64(v):
        return int(np.array(v, dtype=np.float64).view(np.uint64)) & 0xFFFFFFFF

    def hi_of_f64(v):
        return int(np.array(v, dtype=np.float64).view(np.uint64)) >> 32

    def f16_lo(w):
        return np.float32(np.array(int(w) & 0xFFFF, dtype=np.uint16).view(np.float16))

    def f16_hi(w):
        return np.float32(np.array((int(w) >> 16) & 0xFFFF, dtype=np.uint16).view(np.float16))

    def _to_i32(u):
        return int(np.array(u & 0xFFFFFFFF, dtype=np.uint32).view(np.int32))

    def pack_f16x2(lo, hi):
        a = int(np.array(np.float32(lo), dtype=np.float16).view(np.uint16))
        b = int(np.array(np.float32(hi), dtype=np.float16).view(np.uint16))
        return _to_i32(b << 16 | a)

    def pack_bf16x2(lo, hi):
        from .cuda_dtypes import bf16_bits
        a = bf16_bits(int(np.array(lo, dtype=np.float32).view(np.uint32))) & 0xFFFF
        b = bf16_bits(int(np.array(hi, dtype=np.float32).view(np.uint32))) & 0xFFFF
        return _to_i32(b << 16 | a)

    def bf16_lo(w):
        return f32_of((int(w) << 16) & 0xFFFFFFFF)

    def bf16_hi(w):
        return f32_of(int(w) & 0xFFFF0000)
else:
    from llvmlite import ir
    from numba.cuda import libdevice
    from numba.cuda.extending import intrinsic

    _I32 = ir.IntType(32)
    _V4 = ir.VectorType(_I32, 4)

    def _vec_ptr(context, builder, aryty, ary, idx, idxty):
        """<4 x i32> addrspace(1)* to word ``idx`` of a 1-d int32 array."""
        arr = context.make_array(aryty)(context, builder, ary)
        i = context.cast(builder, idx, idxty, types.int64)
        ptr = builder.gep(arr.data, [i], inbounds=True)
        gptr = builder.addrspacecast(ptr, ir.PointerType(_I32, 1))
        return builder.bitcast(gptr, ir.PointerType(_V4, 1))

    @intrinsic
    def ld4(typingctx, a, i):
        """Words i..i+3 of an int32 array (i a multiple of 4, 16-byte aligned): one
        ld.global.v4.u32."""
        sig = types.UniTuple(types.int32, 4)(a, i)

        def codegen(context, builder, sig, args):
            vp = _vec_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            v = builder.load(vp, align=16)
            return context.make_tuple(builder, sig.return_type,
                                      [builder.extract_element(v, ir.Constant(_I32, k))
                                       for k in range(4)])
        return sig, codegen

    @intrinsic
    def st4(typingctx, a, i, w0, w1, w2, w3):
        """Words i..i+3 of an int32 array = w0..w3: one st.global.v4.u32."""
        sig = types.void(a, i, types.int32, types.int32, types.int32, types.int32)

        def codegen(context, builder, sig, args):
            vp = _vec_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            v = ir.Constant(_V4, ir.Undefined)
            for k in range(4):
                v = builder.insert_element(v, args[2 + k], ir.Constant(_I32, k))
            builder.store(v, vp, align=16)
        return sig, codegen

    def _pack_intrinsic(inst):
        @intrinsic
        def pack(typingctx, lo, hi):
            sig = types.int32(types.float32, types.float32)

            def codegen(context, builder, sig, args):
                f32 = ir.FloatType()
                asm = ir.InlineAsm(ir.FunctionType(_I32, [f32, f32]),
                                   f"{inst} $0, $1, $2;", "=r,f,f")
                return builder.call(asm, [args[1], args[0]])  # d.hi = cvt(a), d.lo = cvt(b)
            return sig, codegen
        return pack

    pack_bf16x2 = _pack_intrinsic("cvt.rn.bf16x2.f32")
    pack_f16x2 = _pack_intrinsic("cvt.rn.f16x2.f32")

    def _f16_intrinsic(shift):
        @intrinsic
        def widen(typingctx, w):
            sig = types.float32(types.int32)

            def codegen(context, builder, sig, args):
                v = args[0]
                if shift:
                    v = builder.lshr(v, ir.Constant(_I32, shift))
                h = builder.bitcast(builder.trunc(v, ir.IntType(16)), ir.HalfType())
                return builder.fpext(h, ir.FloatType())
            return sig, codegen
        return widen

    f16_lo = _f16_intrinsic(0)
    f16_hi = _f16_intrinsic(16)


    @device
    def f32_of(w):
        return libdevice.int_as_float(w)

    @device
    def bits_of_f32(v):
        return libdevice.float_as_int(v)

    @device
    def f64_of(lo, hi):
        return libdevice.hiloint2double(hi, lo)

    @device
    def lo_of_f64(v):
        return libdevice.double2loint(v)

    @device
    def hi_of_f64(v):
        return libdevice.double2hiint(v)

    @device
    def bf16_lo(w):
        return libdevice.int_as_float(types.int32(w << 16))

    @device
    def bf16_hi(w):
        return libdevice.int_as_float(types.int32(w & types.int32(-65536)))


@lru_cache(maxsize=None)
def access(dt, K):
    """Namespace(K, load, store) for rows of dtype ``dt`` in steps of K elements."""
    T = traits(dt)
    if K == 1:
        load1, store1 = T.load, T.store

        @device
        def load(a, i, vals):
            vals[0] = load1(a[U(i)])

        @device
        def store(a, i, vals):
            a[U(i)] = store1(vals[0])

        @device
        def elem(a, e):
            return load1(a[U(e)])

        @device
        def raw(a, i, r):
            r[0] = a[U(i)]

        @device
        def unpack_raw(r, vals):
            vals[0] = load1(r[0])
        return _ns(K, load, store, elem, T.storage, 1, raw, unpack_raw)

    E = step_elems(dt)
    if K % E:
        raise ValueError(f"{dt}: steps of {K} are not whole 16-byte accesses")
    WORDS = K * ITEMSIZE[dt] // 4
    N4 = WORDS // 4

    if dt == "float32":
        @device
        def unpack(w, j, vals):
            vals[j] = f32_of(w)

        @device
        def pack(vals, j):
            return bits_of_f32(vals[j])
    elif dt in ("bfloat16", "float16"):
        lo_of, hi_of = (bf16_lo, bf16_hi) if dt == "bfloat16" else (f16_lo, f16_hi)
        pack2 = pack_bf16x2 if dt == "bfloat16" else pack_f16x2

        @device
        def unpack(w, j, vals):
            vals[2 * j] = lo_of(w)
            vals[2 * j + 1] = hi_of(w)

        @device
        def pack(vals, j):
            return pack2(vals[2 * j], vals[2 * j + 1])

    if dt == "float64":
        @device
        def load(a, i, vals):
            base = i * WORDS
            for n in range(N4):
                w0, w1, w2, w3 = ld4(a, U(base + 4 * n))
                vals[2 * n] = f64_of(w0, w1)
                vals[2 * n + 1] = f64_of(w2, w3)

        @device
        def store(a, i, vals):
            base = i * WORDS
            for n in range(N4):
                v0 = vals[2 * n]
                v1 = vals[2 * n + 1]
                st4(a, U(base + 4 * n), lo_of_f64(v0), hi_of_f64(v0), lo_of_f64(v1),
                    hi_of_f64(v1))

        @device
        def elem(a, e):
            return f64_of(a[U(2 * e)], a[U(2 * e + 1)])
        return _ns(K, load, store, elem)  # (float64 rows are not cached raw)

    @device
    def load(a, i, vals):
        base = i * WORDS
        for n in range(N4):
            w0, w1, w2, w3 = ld4(a, U(base + 4 * n))
            unpack(w0, 4 * n, vals)
            unpack(w1, 4 * n + 1, vals)
            unpack(w2, 4 * n + 2, vals)
            unpack(w3, 4 * n + 3, vals)

    @device
    def store(a, i, vals):
        base = i * WORDS
        for n in range(N4):
            st4(a, U(base + 4 * n), pack(vals, 4 * n), pack(vals, 4 * n + 1),
                pack(vals, 4 * n + 2), pack(vals, 4 * n + 3))

    if dt == "float32":
        @device
        def elem(a, e):
            return f32_of(a[U(e)])
    else:
        @device
        def elem(a, e):
            w = a[U(e >> 1)]
            if e & 1:
                return hi_of(w)
            return lo_of(w)

    @device
    def raw(a, i, r):
        base = i * WORDS
        for n in range(N4):
            w0, w1, w2, w3 = ld4(a, U(base + 4 * n))
            r[4 * n] = w0
            r[4 * n + 1] = w1
            r[4 * n + 2] = w2
            r[4 * n + 3] = w3

    @device
    def unpack_raw(r, vals):
        for j in range(WORDS):
            unpack(r[j], j, vals)
    return _ns(K, load, store, elem, types.int32, WORDS, raw, unpack_raw)


def _ns(K, load, store, elem, raw_type=None, n_raw=0, raw=None, unpack_raw=None):
    """load/store: one step of K values; elem(a, e): element e alone (e.g. the target);
    raw(a, i, r) / unpack_raw(r, vals): one step as its n_raw stored words of raw_type (for
    a shared-memory row cache in the storage dtype) and their values."""
    from .cuda_dtypes import namespace
    return namespace(K=K, load=load, store=store, elem=elem, RAW=raw_type, NW=n_raw, raw=raw,
                     unpack_raw=unpack_raw)
