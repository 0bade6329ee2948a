"""128-bit global memory access for the streaming loops of the CUDA kernels.

A kernel's rows are read and written in *steps* of K elements: K = 1 (the scalar variant, on
the storage-dtype arrays) or K = 16 bytes / element size (the vectorised variant: fp32 4,
fp16/bf16 8, fp64 2), on an int32 view of the same memory, one ``ld.global.v4.u32`` /
``st.global.v4.u32`` per step. ``access`` needs every row start 16-byte aligned (the base
pointer, and C x element size a multiple of 16); ``peel`` (below) lifts that: a row's head
and tail go element by element, its aligned middle through ``access``. Kernels without it
take the scalar variant when rows are not aligned (the host checks).

``access(dt, K)`` gives ``load(a, step, vals)`` (K values of step ``step`` into the local
array ``vals``, in the accumulator dtype) and ``store(a, step, vals)`` (rounded once to the
storage dtype; half floats through the hardware's packed ``cvt.rn.{bf16x2,f16x2}.f32``,
which rounds to nearest even exactly like the scalar path). Steps are counted from the start
of the array: row r's first step is r x (C / K).

Under Numba's simulator the intrinsics are numpy functions with the same results.
"""
from functools import lru_cache

import numpy as np
from numba import cuda, types  # (cuda: a module global, which the simulator swaps)

from .cuda_dtypes import SIMULATOR, device, traits

BYTES = 16
U = types.uint64
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def step_elems(dt):
    """Elements per 128-bit access."""
    return BYTES // ITEMSIZE[dt]


if SIMULATOR:
    def _words_at(a, i):
        """The numpy array under a simulated kernel argument, after checking that words
        i..i+3 lie inside it and start on 16 bytes (what ld4/st4 ask of the GPU; a wrong
        peel shows up here, not only as a wrong value)."""
        arr = a
        while not isinstance(arr, np.ndarray):
            arr = arr.__dict__["_item"] if "_item" in arr.__dict__ else arr._ary
        if not 0 <= i <= arr.size - 4:
            raise IndexError(f"128-bit access to words {i}..{i + 3} of {arr.size}")
        if (arr.__array_interface__["data"][0] + 4 * i) % BYTES:
            raise ValueError(f"128-bit access to word {i}: not 16-byte aligned")
        return arr

    def ld4(a, i):
        i = int(i)
        _words_at(a, i)
        return int(a[i]), int(a[i + 1]), int(a[i + 2]), int(a[i + 3])

    def st4(a, i, w0, w1, w2, w3):
        i = int(i)
        _words_at(a, i)
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

    def i16_lo(w):
        return np.array(int(w) & 0xFFFF, dtype=np.uint16).view(np.int16)[()]

    def i16_hi(w):
        return np.array((int(w) >> 16) & 0xFFFF, dtype=np.uint16).view(np.int16)[()]
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

    @device
    def i16_lo(w):
        return types.int16(w)

    @device
    def i16_hi(w):
        return types.int16(w >> 16)


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


# ---- rows that need not start on 16 bytes: peel the head and tail --------------------------

def row_phase(ptr, dt):
    """Host side: elements from the 16-byte boundary at or before address ``ptr`` to it
    (0..K-1), or None when ``ptr`` is not aligned to the element size (then no 128-bit
    variant can run: take the scalar one)."""
    if ptr % ITEMSIZE[dt]:
        return None
    return ptr % BYTES // ITEMSIZE[dt]


def word_view_skip(phase, dt):
    """Host side: elements from an array's start (at ``phase``) to its first 16-byte
    boundary, where the int32 view of a peeled kernel starts. The view holds the array's
    whole 16-byte chunks from there: (numel - skip) // K * K elements as int32 words."""
    K = step_elems(dt)
    return (K - phase) % K


@lru_cache(maxsize=None)
def peel(dt, K, edges=True):
    """128-bit streaming of rows that need not start on 16 bytes (any C, offset views).

    A kernel takes each row array twice: ``xs``, its storage-dtype view, and ``xw``, an int32
    view of the same memory from the array's first 16-byte boundary (``word_view_skip``
    elements in), plus ``phase`` (``row_phase`` of the array's address). Arrays peeled
    together (logits and output) must share the phase. Each row splits into

    - a head: the elements before the row's first 16-byte boundary (fewer than K),
    - the middle: n_mid steps of K elements, through ``load``/``store``/``raw`` (the
      ``access(dt, K)`` of the aligned variant) on ``xw`` -- one ld4/st4 each,
    - a tail: the elements after the row's last whole 16-byte chunk (fewer than K).

    Head and tail (the row's *edge*, n_edge < 2K elements) go one element at a time
    through ``load1``/``store1`` on ``xs``: a store writes only its own 2, 4 or 8 bytes,
    so a row boundary inside a 16-byte chunk, or inside a 32-bit word for half floats,
    never touches the neighbouring row's elements (another block owns them), and no access
    leaves the array. An aligned row is the case h = n_edge = 0.

    ``parts(phase, row, n_cls)`` -> (start, h, first, n_mid, n_edge) for row ``row`` of
    n_cls elements: its first element is element ``start`` of the arrays, and column
    h + s*K + k is value k of word-view step first + s. ``edge_col(q, h, n_mid)``: the
    column of edge element q (0 <= q < n_edge; the head, then the tail) -- e.g. thread q
    of the row's block takes it, once per row, and keeps its value in a register.
    ``PEELED``: K > 1 and ``edges``. Without it there is
    no edge and the word view is the whole array (pass it as both views, phase 0): K = 1,
    the scalar variant (every element a step of the storage view), or ``edges=False``,
    the aligned variant (every row starts on 16 bytes and C is a multiple of K), so one
    kernel body serves all three.

    The simulator runs these same functions; its ld4/st4 check that every 128-bit access is
    16-byte aligned and inside its array.
    """
    T = traits(dt)
    AX = access(dt, K)
    LOG_K = K.bit_length() - 1
    PEELED = K > 1 and edges
    i64 = types.int64

    @device
    def parts(phase, row, n_cls):
        start = row * n_cls
        if not PEELED:  # (row x steps per row: cheaper loops than start / K, in ptxas)
            n_steps = n_cls // K
            return start, i64(0), row * n_steps, n_steps, i64(0)
        at = phase + start  # elements from a 16-byte boundary
        h = (-at) & (K - 1)
        if h > n_cls:
            h = n_cls
        n_mid = (n_cls - h) >> LOG_K
        first = ((at + h) >> LOG_K) - (1 if phase else 0)  # the view starts a chunk in
        return start, h, first, n_mid, n_cls - (n_mid << LOG_K)

    @device
    def edge_col(q, h, n_mid):
        return q if q < h else q + (n_mid << LOG_K)

    load_elem, store_elem = T.load, T.store

    @device
    def load1(xs, e):
        return load_elem(xs[U(e)])

    @device
    def store1(xs, e, v):
        xs[U(e)] = store_elem(v)

    from .cuda_dtypes import namespace
    return namespace(K=K, PEELED=PEELED, parts=parts, edge_col=edge_col, load1=load1,
                     store1=store1, load=AX.load, store=AX.store, raw=AX.raw,
                     unpack_raw=AX.unpack_raw, RAW=AX.RAW, NW=AX.NW)


def paired_pass(ac, raw_words, step):
    """A block kernel's first pass over a row (aligned or peeled, ``ac``: access or peel): a
    thread's steps tid, tid + bd, ... of n, loaded from x at base + s -- two a trip when
    ``pair``, both loads in flight before either is used (a while loop: a range with a
    run-time step divides for its trip count) -- as stored words (``raw_words``) or values,
    each handed to ``step`` (into the cache and the max) with index idx0 + s * idx_mul."""
    i32 = types.int32

    @device
    def run(x, base, n, idx0, idx_mul, pair, m, rv, rv_b, sv, sv_b, tv, cache, cache_x,
            cap, inv_cap, capped, mask, mo):
        bd = i32(cuda.blockDim.x)
        s = i32(cuda.threadIdx.x)
        while s < n:
            s_b = i32(s + bd)
            if raw_words:
                ac.raw(x, base + s, rv)
                if pair and s_b < n:
                    ac.raw(x, base + s_b, rv_b)
            else:
                ac.load(x, base + s, sv)
                if pair and s_b < n:
                    ac.load(x, base + s_b, sv_b)
            m = step(rv, sv, tv, idx0 + s * idx_mul, m, cache, cache_x, cap, inv_cap, capped,
                     mask, mo)
            if pair and s_b < n:
                m = step(rv_b, sv_b, tv, idx0 + s_b * idx_mul, m, cache, cache_x, cap,
                         inv_cap, capped, mask, mo)
            s = i32(s_b + bd) if pair else s_b
        return m
    return run
