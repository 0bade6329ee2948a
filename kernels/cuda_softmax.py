"""softmax / log_softmax / logsumexp on the GPU, with the same four strategies as the
cross-entropy kernels (see cuda_cross_entropy). ``mode``: 0 softmax, 1 log_softmax (both
write ``out`` in the storage dtype), 2 logsumexp (writes ``lse`` in the accumulator dtype).

An all -inf row has softmax 0 and logsumexp -inf (log_softmax is then -inf - -inf = NaN,
as in the CPU kernels and the reference); a NaN logit makes its row NaN, and a +inf its
logsumexp NaN, in every strategy (the online ones included). log_softmax is (z - max) -
log s, exact for large logits.

The block and split kernels walk a row in 32-bit steps with while loops (a range with a
run-time step divides in 64 bits for its trip count), two 16-byte loads in flight a trip.

Class masks: the ``masked`` variant of each kernel takes ``mask`` (bool) and ``m_stride`` (C,
or 0 for one (C,) row) last. Masked classes enter the max and the sum as -inf and are written
as 0 (softmax) or -inf (log_softmax), an all-masked row included; the unmasked kernels are
the same bodies inlined with stand-ins (as in cuda_cross_entropy).
"""
import math
from functools import lru_cache

from numba import cuda, types

from .cuda_cross_entropy import U, WARP_SHAPES, warp_shape
from .cuda_dtypes import array, device, traits
from .cuda_reduce import reductions
from .cuda_rowmath import rowmath
from .cuda_vec import access, paired_pass, peel, step_elems

SOFTMAX, LOG_SOFTMAX, LOGSUMEXP = 0, 1, 2


def softmax_signature(dt, kind, vec=False, masked=False, peeled=False):
    T = traits(dt)
    st, acc = array(T.storage), array(T.acc)
    i64 = types.int64
    tail = (array(types.boolean), i64) if masked else ()  # mask, m_stride
    if vec and not peeled:  # the 128-bit variant reads and writes rows through int32 views
        st = array(types.int32)
    elif peeled:  # the block kernels that peel (cuda_vec.peel): x and out as (storage, int32)
        xa = (st, array(types.int32))
        if kind == "split_partial":  # ..., n_split, phase
            return types.void(*xa, acc, i64, i64, i64, i64, *tail)
        if kind == "split_finish":
            return types.void(*xa, *xa, acc, acc, i64, i64, i64, i64, i64, *tail)
        return types.void(*xa, *xa, acc, i64, i64, i64, i64, *tail)  # ..., mode, phase
    if kind == "split_partial":
        return types.void(st, acc, i64, i64, i64, *tail)
    if kind == "split_finish":
        return types.void(st, st, acc, acc, i64, i64, i64, i64, *tail)
    return types.void(st, st, acc, i64, i64, i64, i64, *tail)


@lru_cache(maxsize=None)
def softmax_kernel(strategy, dt, vec=False, masked=False, peeled=False):
    """``vec``: the 128-bit variant for rows on 16 bytes; ``peeled`` (block kernels): the
    128-bit variant for rows anywhere (cuda_vec.peel)."""
    vec = vec or peeled
    MASKED = masked
    R = rowmath(dt)
    RD = reductions(R.T.acc_np)
    acc = R.T.acc
    NEG_INF, ZERO, ONE = R.NEG_INF, R.ZERO, R.ONE
    i64, i32 = types.int64, types.int32
    K = step_elems(dt) if vec else 1  # elements per memory access
    AX = access(dt, K)

    @device
    def row_end(s, m):
        """(1/s or 0, log s) from a finite_max'd m and s = sum exp(x - m): a row of -inf
        (s = 0) gives probability 0 and log -inf; a NaN s (a NaN logit) spreads."""
        if s == ZERO:
            return ZERO, NEG_INF
        return ONE / s, math.log(s)

    @device
    def result(z_or_e, m, inv, log_s, mode, is_e):
        """softmax from e = exp(z - m) (is_e) or z; log_softmax from z."""
        if mode == SOFTMAX:
            return z_or_e * inv if is_e else math.exp(z_or_e - m) * inv
        return (z_or_e - m) - log_s

    @device
    def masked_value(mode):
        """What a masked class gets: probability 0, log-probability -inf."""
        return ZERO if mode == SOFTMAX else NEG_INF

    if strategy in WARP_SHAPES:
        TPR, VPT = warp_shape(strategy, dt)
        LOG2 = TPR.bit_length() - 1
        SPL = VPT // K

        def softmax_warp(x, out, lse, n_rows, n_cls, mode, unused, mask, m_stride):
            vals = cuda.local.array(VPT, acc)
            sv = cuda.local.array(K, acc)
            tid = i64(cuda.threadIdx.x)
            lane = tid & (TPR - 1)
            per_block = i64(cuda.blockDim.x) >> LOG2
            n_steps = n_cls // K
            for first in range(i64(cuda.blockIdx.x) * per_block, n_rows,
                               i64(cuda.gridDim.x) * per_block):
                row = first + (tid >> LOG2)
                live = row < n_rows
                rs = row * n_steps
                mo = row * m_stride
                m = NEG_INF
                for j in range(SPL):
                    s = j * TPR + lane
                    if live and s < n_steps:
                        AX.load(x, rs + s, sv)
                        if MASKED:  # left out like the padding
                            R.mask_out(sv, mask, mo + s * K, K, NEG_INF)
                    else:
                        for k in range(K):
                            sv[k] = NEG_INF
                    for k in range(K):
                        z = sv[k]
                        vals[j * K + k] = z
                        m = max(m, z)
                m = R.finite_max(RD.warp_max(m, TPR))
                se = ZERO
                for j in range(VPT):
                    e = math.exp(vals[j] - m)
                    se += e
                    if mode == SOFTMAX:
                        vals[j] = e
                se = RD.warp_sum(se, TPR)
                inv, log_s = row_end(se, m)
                if not live:
                    continue
                if mode == LOGSUMEXP:
                    if lane == 0:
                        lse[U(row)] = m + log_s
                    continue
                for j in range(SPL):
                    s = j * TPR + lane
                    if s < n_steps:
                        for k in range(K):
                            sv[k] = result(vals[j * K + k], m, inv, log_s, mode, True)
                        if MASKED:
                            R.mask_out(sv, mask, mo + s * K, K, masked_value(mode))
                        AX.store(out, rs + s, sv)
        return softmax_warp if MASKED else _unmasked_main(softmax_warp)

    # Block kernels stream each row through cuda_vec.peel: the peeled variant peels the
    # row's head and tail (its edge: one element for each of the first n_edge threads, kept
    # in a register across the passes) around 16-byte steps on the int32 view; the scalar
    # (K = 1) and aligned 128-bit variants are the same body without an edge.
    PL = peel(dt, K, peeled)
    PEELED = PL.PEELED

    @device
    def online_step(sv, s, m, se, mask, mh):
        """One loaded step s of a row into the online (max, sum exp) state."""
        if MASKED:
            R.mask_out(sv, mask, mh + s * K, K, NEG_INF)
        return R.online_vals(m, se, sv, K)

    @device
    def online_pass(x, rs, first, end, m, se, sv, sv_b, mask, mh):
        """A thread's steps first + tid, + bd, ... < end of the row at step rs into the online
        state (block, split): two a trip, both loads in flight before either is used."""
        bd = i32(cuda.blockDim.x)
        s = i32(first + cuda.threadIdx.x)
        while s < end:
            s_b = i32(s + bd)
            PL.load(x, rs + s, sv)
            if s_b < end:
                PL.load(x, rs + s_b, sv_b)
            m, se = online_step(sv, s, m, se, mask, mh)
            if s_b < end:
                m, se = online_step(sv_b, s_b, m, se, mask, mh)
            s = i32(s_b + bd)
        return m, se

    if strategy in ("block_cached", "block"):
        cached = strategy == "block_cached"
        RAWC = cached and dt in ("float16", "bfloat16")  # half rows cached as stored
        RAW = PL.RAW if RAWC else acc
        NW = PL.NW if RAWC else 1

        @device
        def cache_step(rv, sv, tv, s, m, cache, cache_r, cap, inv_cap, capped, mask, mh):
            """The first pass over one loaded step s (rv: its stored words when RAWC, else
            sv: its values): into the cache, and into the max (cuda_vec.paired_pass; tv and
            the softcap arguments are cross entropy's)."""
            if RAWC:
                for j in range(NW):
                    cache_r[U(s * NW + j)] = rv[j]
                PL.unpack_raw(rv, sv)
            if MASKED:
                R.mask_out(sv, mask, mh + s * K, K, NEG_INF)
            for k in range(K):
                if not RAWC:
                    cache[U(s * K + k)] = sv[k]
                m = max(m, sv[k])
            return m

        first_pass = paired_pass(PL, RAWC, cache_step)

        def softmax_block(x_elem, x, out_elem, out, lse, n_rows, n_cls, mode, phase, mask,
                          m_stride):
            cache = cuda.shared.array(0, acc)
            cache_r = cuda.shared.array(0, RAW)
            buf_m = cuda.shared.array(32, acc)
            buf_s = cuda.shared.array(32, acc)
            sv = cuda.local.array(K, acc)
            sv_b = cuda.local.array(K, acc)  # two steps a trip: both loads in flight first
            rv = cuda.local.array(NW, RAW)
            rv_b = cuda.local.array(NW, RAW)
            # 32-bit indices within a row (steps, shared memory), and while loops: a range
            # with a run-time step divides (64-bit) for its trip count, three times a row
            tid = i32(cuda.threadIdx.x)
            bd = i32(cuda.blockDim.x)
            for row in range(i64(cuda.blockIdx.x), n_rows, i64(cuda.gridDim.x)):
                start, h, rs, n_steps, n_edge = PL.parts(phase, row, n_cls)
                n_st = i32(n_steps)
                mo = row * m_stride
                mh = mo + h  # the mask's index of the first middle column
                # this thread's edge element: its index and value (all that stays live)
                edge = PEELED and tid < n_edge
                ec = PL.edge_col(tid, h, n_steps) if edge else i64(0)
                ee = start + ec
                ez = NEG_INF
                e_live = True
                if edge:
                    ez = PL.load1(x_elem, ee)
                    if MASKED:
                        e_live = mask[U(mo + ec)]
                        if not e_live:
                            ez = NEG_INF
                m = NEG_INF
                se = ZERO
                if cached:
                    m = first_pass(x, rs, n_st, i32(0), i32(1), True, m, rv, rv_b, sv, sv_b, sv,
                                   cache, cache_r, ZERO, ZERO, False, mask, mh)
                    m = max(m, ez)
                    m = R.finite_max(RD.block_max(m, buf_m))
                    s = tid
                    while s < n_st:
                        if RAWC:
                            for j in range(NW):
                                rv[j] = cache_r[U(s * NW + j)]
                            PL.unpack_raw(rv, sv)
                            if MASKED:
                                R.mask_out(sv, mask, mh + s * K, K, NEG_INF)
                        for k in range(K):
                            c = s * K + k
                            e = math.exp((sv[k] if RAWC else cache[U(c)]) - m)
                            se += e
                            if mode == SOFTMAX and not RAWC:
                                cache[U(c)] = e  # each thread only touches its own columns
                        s = i32(s + bd)
                    if edge:
                        se += math.exp(ez - m)
                    se = RD.block_sum(se, buf_s)
                else:
                    m, se = online_pass(x, rs, i32(0), n_st, m, se, sv, sv_b, mask, mh)
                    if edge:
                        m, se = R.online(m, se, ez)
                    m, se = RD.block_merge(m, se, buf_m, buf_s)
                    m = R.finite_max(m)
                inv, log_s = row_end(se, m)
                if mode == LOGSUMEXP:
                    if tid == 0:
                        lse[U(row)] = m + log_s
                    continue
                s = tid
                while s < n_st:
                    if RAWC:
                        for j in range(NW):
                            rv[j] = cache_r[U(s * NW + j)]
                        PL.unpack_raw(rv, sv)
                        for k in range(K):
                            sv[k] = result(sv[k], m, inv, log_s, mode, False)
                    elif cached:
                        for k in range(K):
                            sv[k] = result(cache[U(s * K + k)], m, inv, log_s, mode, True)
                    else:
                        PL.load(x, rs + s, sv)
                        for k in range(K):
                            sv[k] = result(sv[k], m, inv, log_s, mode, False)
                    if MASKED:
                        R.mask_out(sv, mask, mh + s * K, K, masked_value(mode))
                    PL.store(out, rs + s, sv)
                    s = i32(s + bd)
                if edge:
                    v = result(ez, m, inv, log_s, mode, False)
                    if MASKED and not e_live:
                        v = masked_value(mode)
                    PL.store1(out_elem, ee, v)
        return _block_entry(softmax_block, "main", peeled, MASKED)

    if strategy == "split_partial":
        def softmax_split_partial(x_elem, x, ws, n_rows, n_cls, n_split, phase, mask,
                                  m_stride):
            buf_m = cuda.shared.array(32, acc)
            buf_s = cuda.shared.array(32, acc)
            sv = cuda.local.array(K, acc)
            sv_b = cuda.local.array(K, acc)
            tid = i32(cuda.threadIdx.x)
            # chunks of the most steps a row has (a peeled row has that or one less)
            length = (n_cls // K + n_split - 1) // n_split
            for b in range(i64(cuda.blockIdx.x), n_rows * n_split, i64(cuda.gridDim.x)):
                row = b // n_split
                chunk = b - row * n_split
                start, h, rs, n_steps, n_edge = PL.parts(phase, row, n_cls)
                lo = chunk * length
                mh = row * m_stride + h
                m = NEG_INF
                se = ZERO
                m, se = online_pass(x, rs, i32(lo), i32(min(n_steps, lo + length)), m, se, sv,
                                    sv_b, mask, mh)
                if PEELED and chunk == 0 and tid < n_edge:  # the first chunk takes the edge
                    ec = PL.edge_col(tid, h, n_steps)
                    z = PL.load1(x_elem, start + ec)
                    if MASKED and not mask[U(row * m_stride + ec)]:
                        z = NEG_INF
                    m, se = R.online(m, se, z)
                m, se = RD.block_merge(m, se, buf_m, buf_s)
                if tid == 0:
                    ws[U(2 * b)] = m
                    ws[U(2 * b + 1)] = se
        return _block_entry(softmax_split_partial, "partial", peeled, MASKED)

    if strategy == "split_finish":
        def softmax_split_finish(x_elem, x, out_elem, out, lse, ws, n_rows, n_cls, mode,
                                 n_split, phase, mask, m_stride):
            sv = cuda.local.array(K, acc)
            tid = i32(cuda.threadIdx.x)
            bd = i32(cuda.blockDim.x)
            length = (n_cls // K + n_split - 1) // n_split  # as in split_partial
            for b in range(i64(cuda.blockIdx.x), n_rows * n_split, i64(cuda.gridDim.x)):
                row = b // n_split
                chunk = b - row * n_split
                if mode == LOGSUMEXP and chunk != 0:
                    continue
                m = NEG_INF
                se = ZERO
                for kk in range(n_split):  # a fixed order: every block gets the same bits
                    m, se = RD.merge(m, se, ws[U(2 * (row * n_split + kk))],
                                     ws[U(2 * (row * n_split + kk) + 1)])
                m = R.finite_max(m)
                inv, log_s = row_end(se, m)
                if mode == LOGSUMEXP:
                    if tid == 0:
                        lse[U(row)] = m + log_s
                    continue
                start, h, rs, n_steps, n_edge = PL.parts(phase, row, n_cls)
                lo = chunk * length
                mh = row * m_stride + h
                s = i32(lo + tid)
                end = i32(min(n_steps, lo + length))
                while s < end:
                    PL.load(x, rs + s, sv)
                    for k in range(K):
                        sv[k] = result(sv[k], m, inv, log_s, mode, False)
                    if MASKED:
                        R.mask_out(sv, mask, mh + s * K, K, masked_value(mode))
                    PL.store(out, rs + s, sv)
                    s = i32(s + bd)
                if PEELED and chunk == 0 and tid < n_edge:
                    ec = PL.edge_col(tid, h, n_steps)
                    v = result(PL.load1(x_elem, start + ec), m, inv, log_s, mode, False)
                    if MASKED and not mask[U(row * m_stride + ec)]:
                        v = masked_value(mode)
                    PL.store1(out_elem, start + ec, v)
        return _block_entry(softmax_split_finish, "finish", peeled, MASKED)

    raise KeyError(strategy)


# ---- the unmasked kernels: a masked body inlined with stand-ins it never reads ---------------
# (MASKED is False in those bodies; x stands in for the mask only to give it a type.)

def _unmasked_main(body):
    run = device(body)

    def softmax_main(x, out, lse, n_rows, n_cls, mode, unused):
        run(x, out, lse, n_rows, n_cls, mode, unused, x, types.int64(0))
    return softmax_main


# ---- the block kernels' entry points ----------------------------------------------------------
# Their bodies take x and out twice -- x_elem / out_elem, the storage-dtype views (the rows'
# edges), and x / out, the views the rows stream through -- and the rows' phase (cuda_vec.peel).
# The peeled kernels take exactly that; the scalar and aligned 128-bit ones keep their
# signature and pass their one view as both, phase 0. Unmasked kernels pass x as the mask,
# never read.

def _block_entry(body, kind, peeled, masked):
    if peeled and masked:
        return body
    run = device(body)
    if kind == "main":
        if peeled:
            def softmax_main_peel(x_elem, x, out_elem, out, lse, n_rows, n_cls, mode, phase):
                run(x_elem, x, out_elem, out, lse, n_rows, n_cls, mode, phase, x_elem,
                    types.int64(0))
            return softmax_main_peel
        if masked:
            def softmax_main_masked(x, out, lse, n_rows, n_cls, mode, unused, mask, m_stride):
                run(x, x, out, out, lse, n_rows, n_cls, mode, types.int64(0), mask, m_stride)
            return softmax_main_masked

        def softmax_main(x, out, lse, n_rows, n_cls, mode, unused):
            run(x, x, out, out, lse, n_rows, n_cls, mode, types.int64(0), x, types.int64(0))
        return softmax_main
    if kind == "partial":
        if peeled:
            def softmax_partial_peel(x_elem, x, ws, n_rows, n_cls, n_split, phase):
                run(x_elem, x, ws, n_rows, n_cls, n_split, phase, x_elem, types.int64(0))
            return softmax_partial_peel
        if masked:
            def softmax_partial_masked(x, ws, n_rows, n_cls, n_split, mask, m_stride):
                run(x, x, ws, n_rows, n_cls, n_split, types.int64(0), mask, m_stride)
            return softmax_partial_masked

        def softmax_partial(x, ws, n_rows, n_cls, n_split):
            run(x, x, ws, n_rows, n_cls, n_split, types.int64(0), x, types.int64(0))
        return softmax_partial
    if peeled:
        def softmax_finish_peel(x_elem, x, out_elem, out, lse, ws, n_rows, n_cls, mode, n_split,
                               phase):
            run(x_elem, x, out_elem, out, lse, ws, n_rows, n_cls, mode, n_split, phase, x_elem,
                types.int64(0))
        return softmax_finish_peel
    if masked:
        def softmax_finish_masked(x, out, lse, ws, n_rows, n_cls, mode, n_split, mask,
                                  m_stride):
            run(x, x, out, out, lse, ws, n_rows, n_cls, mode, n_split, types.int64(0), mask,
                m_stride)
        return softmax_finish_masked

    def softmax_finish(x, out, lse, ws, n_rows, n_cls, mode, n_split):
        run(x, x, out, out, lse, ws, n_rows, n_cls, mode, n_split, types.int64(0), x,
            types.int64(0))
    return softmax_finish
