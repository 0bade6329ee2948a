"""softmax / log_softmax / logsumexp on the GPU, with the same four strategies as the
cross-entropy kernels (see cuda_cross_entropy). ``mode``: 0 softmax, 1 log_softmax (both
write ``out`` in the storage dtype), 2 logsumexp (writes ``lse`` in the accumulator dtype).

An all -inf row has softmax 0 and logsumexp -inf (log_softmax is then -inf - -inf = NaN,
as in the CPU kernels and the reference). log_softmax is (z - max) - log s, exact for large
logits.

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
from .cuda_vec import access, peel, step_elems

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
    i64 = types.int64
    K = step_elems(dt) if vec else 1  # elements per memory access
    AX = access(dt, K)

    @device
    def row_end(s, m, mode):
        """(1/s, log s) from a finite_max'd m and s = sum exp(x - m), each only where the mode
        uses it (softmax 1/s, the others log s); an empty row gives 0 and -inf."""
        inv = ZERO
        log_s = NEG_INF
        if s > ZERO:
            if mode == SOFTMAX:
                inv = ONE / s
            else:
                log_s = math.log(s)
        return inv, log_s

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

    @device
    def out_step(sv, m, inv, log_s, mode, is_e, mask, first):
        """One step's outputs in place. A masked class gets masked_value without computing
        result (an all-masked row's log_softmax would be -inf - -inf)."""
        for k in range(K):
            if MASKED and not mask[U(first + k)]:
                sv[k] = masked_value(mode)
            else:
                sv[k] = result(sv[k], m, inv, log_s, mode, is_e)

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
                        if z > m:
                            m = z
                m = R.finite_max(RD.warp_max(m, TPR))
                se = ZERO
                for j in range(VPT):
                    e = math.exp(vals[j] - m)
                    se += e
                    if mode == SOFTMAX:
                        vals[j] = e
                se = RD.warp_sum(se, TPR)
                inv, log_s = row_end(se, m, mode)
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
                            sv[k] = vals[j * K + k]
                        out_step(sv, m, inv, log_s, mode, True, mask, mo + s * K)
                        AX.store(out, rs + s, sv)
        return softmax_warp if MASKED else _unmasked_main(softmax_warp)

    # Block kernels stream each row through cuda_vec.peel: the peeled variant peels the
    # row's head and tail (its edge: one element for each of the first n_edge threads, kept
    # in a register across the passes) around 16-byte steps on the int32 view; the scalar
    # (K = 1) and aligned 128-bit variants are the same body without an edge.
    # Within a row they count steps in 32 bits (while loops: no 64-bit index arithmetic or
    # range-length division per row; only row bases are 64-bit), and the passes that read
    # the logits take two steps a trip (float32/float64 cached rows four: NS), every load in
    # flight before any is used.
    PL = peel(dt, K, peeled)
    PEELED = PL.PEELED
    i32 = types.int32

    @device
    def step_max(sv, s, m, mask, mh):
        """Mask a loaded step (masked classes -inf) and take it into the max m."""
        if MASKED:
            R.mask_out(sv, mask, mh + s * K, K, NEG_INF)
        for k in range(K):
            if sv[k] > m:
                m = sv[k]
        return m

    @device
    def step_sum(sv, se, shift):
        for k in range(K):
            se += math.exp(sv[k] - shift)
        return se

    def online_pass_of(NS):
        @device
        def online_pass(x, rs, s, hi, bd, va, mask, mh):
            """This thread's (max m, sum exp(z - finite_max(m))) over steps s, s + bd, ... < hi
            of a row, NS steps a trip (va: NS x K). Online a trip at a time: the sum is
            rescaled (one exp) only when the trip raises the max, so each value costs one exp
            and no branch."""
            m = NEG_INF
            se = ZERO
            while s < hi:
                for j in range(NS):  # every load in flight before any is used
                    if i32(s + j * bd) < hi:
                        PL.load(x, rs + i32(s + j * bd), va[j])
                mt = m
                for j in range(NS):
                    if i32(s + j * bd) < hi:
                        mt = step_max(va[j], i32(s + j * bd), mt, mask, mh)
                if mt > m:  # (m = -inf: se is 0, and exp(-inf) is 0)
                    se *= math.exp(m - mt)
                    m = mt
                shift = R.finite_max(m)
                for j in range(NS):
                    if i32(s + j * bd) < hi:
                        se = step_sum(va[j], se, shift)
                s = i32(s + NS * bd)
            return m, se
        return online_pass

    @device
    def add_online(m, se, z):
        """One more value (an edge element) into a state of online_pass."""
        if z > m:
            se *= math.exp(m - z)
            m = z
        return m, se + math.exp(z - R.finite_max(m))

    @device
    def block_state(m, se, buf_m, buf_s):
        """The block's (max, sum exp(z - finite_max(max))) from its threads' online_pass
        states: the max, then each sum rescaled to it (one exp) and added -- cheaper than
        merging (m, s) pairs at every shuffle."""
        mb = RD.block_max(m, buf_m)
        if m != NEG_INF:  # (a thread with nothing live adds 0, whatever mb)
            se *= math.exp(m - R.finite_max(mb))
        return mb, RD.block_sum(se, buf_s)

    @device
    def write_pass(x, out, rs, s, hi, bd, sv, sv_b, m, inv, log_s, mode, mask, mh):
        """Outputs of steps s, s + bd, ... < hi of a row, from the logits read again."""
        while s < hi:
            s_b = i32(s + bd)
            PL.load(x, rs + s, sv)
            if s_b < hi:
                PL.load(x, rs + s_b, sv_b)
            out_step(sv, m, inv, log_s, mode, False, mask, mh + s * K)
            PL.store(out, rs + s, sv)
            if s_b < hi:
                out_step(sv_b, m, inv, log_s, mode, False, mask, mh + s_b * K)
                PL.store(out, rs + s_b, sv_b)
            s = i32(s_b + bd)

    @device
    def edge_out(out_elem, e, z, live, m, inv, log_s, mode):
        """An edge element's output (a masked one: masked_value, as in out_step)."""
        v = masked_value(mode)
        if live:
            v = result(z, m, inv, log_s, mode, False)
        PL.store1(out_elem, e, v)

    if strategy in ("block_cached", "block"):
        cached = strategy == "block_cached"
        RAWC = cached and dt in ("float16", "bfloat16")  # half rows cached as stored
        RAW = PL.RAW if RAWC else acc
        NW = PL.NW if RAWC else 1
        FCACHE = cached and not RAWC  # the cache holds values (then softmax's e)
        # steps a trip of the passes that read the logits once: float32/float64 cached rows
        # take 4 (shared memory leaves long rows one 512-thread block an SM: 2 x 16 bytes a
        # thread are too few bytes in flight), the others 2
        NS = 4 if FCACHE else 2
        online_pass = online_pass_of(NS)

        @device
        def cache_step(rv, sv, s, m, cache, cache_r, mask, mh):
            """The first pass over one loaded step (rv: its stored words when RAWC, else sv:
            its values): into the cache, and into the max."""
            if RAWC:
                for j in range(NW):
                    cache_r[U(s * NW + j)] = rv[j]
                PL.unpack_raw(rv, sv)
            if MASKED:
                R.mask_out(sv, mask, mh + s * K, K, NEG_INF)
            for k in range(K):
                z = sv[k]
                if FCACHE:
                    cache[U(s * K + k)] = z
                if z > m:
                    m = z
            return m

        @device
        def cached_step(sv, rv, s, cache, cache_r):
            """sv = a cached step (RAWC: unmasked; FCACHE: as the last pass left it)."""
            if RAWC:
                for j in range(NW):
                    rv[j] = cache_r[U(s * NW + j)]
                PL.unpack_raw(rv, sv)
            else:
                for k in range(K):
                    sv[k] = cache[U(s * K + k)]

        def softmax_block(x_elem, x, out_elem, out, lse, n_rows, n_cls, mode, phase, mask,
                          m_stride):
            cache = cuda.shared.array(0, acc)
            cache_r = cuda.shared.array(0, RAW)
            buf_m = cuda.shared.array(32, acc)
            buf_s = cuda.shared.array(32, acc)
            va = cuda.local.array((NS, K), acc)  # the steps of a trip that reads once
            ra = cuda.local.array((NS, NW), RAW)
            sv = cuda.local.array(K, acc)
            sv_b = cuda.local.array(K, acc)
            rv = cuda.local.array(NW, RAW)
            tid = i32(cuda.threadIdx.x)
            bd = i32(cuda.blockDim.x)
            # logsumexp reads the row once: one online pass, no cache (as block)
            use_cache = cached and mode != LOGSUMEXP
            row = i64(cuda.blockIdx.x)
            while row < n_rows:
                start, h, rs, n_mid, n_edge = PL.parts(phase, row, n_cls)
                n_steps = i32(n_mid)
                mo = row * m_stride
                mh = mo + h  # the mask's index of the first middle column
                # this thread's edge element: its index and value (all that stays live)
                edge = PEELED and tid < n_edge
                ec = PL.edge_col(i64(tid), h, n_mid) if edge else i64(0)
                ee = start + ec
                ez = NEG_INF
                e_live = True
                if edge:
                    ez = PL.load1(x_elem, ee)
                    if MASKED:
                        e_live = mask[U(mo + ec)]
                        if not e_live:
                            ez = NEG_INF
                if use_cache:
                    m = NEG_INF
                    s = tid
                    while s < n_steps:
                        for j in range(NS):  # every load in flight before any is used
                            if i32(s + j * bd) < n_steps:
                                if RAWC:
                                    PL.raw(x, rs + i32(s + j * bd), ra[j])
                                else:
                                    PL.load(x, rs + i32(s + j * bd), va[j])
                        for j in range(NS):
                            if i32(s + j * bd) < n_steps:
                                m = cache_step(ra[j], va[j], i32(s + j * bd), m, cache, cache_r,
                                               mask, mh)
                        s = i32(s + NS * bd)
                    if ez > m:
                        m = ez
                    m = R.finite_max(RD.block_max(m, buf_m))
                    se = ZERO
                    s = tid
                    while s < n_steps:  # (shared memory: one step a trip)
                        cached_step(sv, rv, s, cache, cache_r)
                        if RAWC and MASKED:
                            R.mask_out(sv, mask, mh + s * K, K, NEG_INF)
                        for k in range(K):
                            e = math.exp(sv[k] - m)
                            se += e
                            if FCACHE and mode == SOFTMAX:
                                cache[U(s * K + k)] = e  # each thread only touches its own columns
                        s = i32(s + bd)
                    if edge:
                        se += math.exp(ez - m)
                    se = RD.block_sum(se, buf_s)
                else:
                    m, se = online_pass(x, rs, tid, n_steps, bd, va, mask, mh)
                    if edge:
                        m, se = add_online(m, se, ez)
                    m, se = block_state(m, se, buf_m, buf_s)
                    m = R.finite_max(m)
                inv, log_s = row_end(se, m, mode)
                if mode == LOGSUMEXP:
                    if tid == 0:
                        lse[U(row)] = m + log_s
                elif use_cache:
                    s = tid
                    while s < n_steps:
                        cached_step(sv, rv, s, cache, cache_r)
                        out_step(sv, m, inv, log_s, mode, FCACHE, mask, mh + s * K)
                        PL.store(out, rs + s, sv)
                        s = i32(s + bd)
                else:
                    write_pass(x, out, rs, tid, n_steps, bd, sv, sv_b, m, inv, log_s, mode,
                               mask, mh)
                if edge and mode != LOGSUMEXP:
                    edge_out(out_elem, ee, ez, e_live, m, inv, log_s, mode)
                row += i64(cuda.gridDim.x)
        return _block_entry(softmax_block, "main", peeled, MASKED)

    if strategy == "split_partial":
        online_pass = online_pass_of(2)

        def softmax_split_partial(x_elem, x, ws, n_rows, n_cls, n_split, phase, mask,
                                  m_stride):
            buf_m = cuda.shared.array(32, acc)
            buf_s = cuda.shared.array(32, acc)
            va = cuda.local.array((2, K), acc)
            tid = i32(cuda.threadIdx.x)
            bd = i32(cuda.blockDim.x)
            # chunks of the most steps a row has (a peeled row has that or one less)
            length = i32((n_cls // K + n_split - 1) // n_split)
            b = i64(cuda.blockIdx.x)
            while b < n_rows * n_split:
                row = b // n_split
                chunk = i32(b - row * n_split)
                start, h, rs, n_mid, n_edge = PL.parts(phase, row, n_cls)
                lo = i32(chunk * length)
                hi = i32(min(n_mid, lo + length))
                mh = row * m_stride + h
                m, se = online_pass(x, rs, i32(lo + tid), hi, bd, va, mask, mh)
                if PEELED and chunk == 0 and tid < n_edge:  # the first chunk takes the edge
                    ec = PL.edge_col(i64(tid), h, n_mid)
                    z = PL.load1(x_elem, start + ec)
                    if MASKED and not mask[U(row * m_stride + ec)]:
                        z = NEG_INF
                    m, se = add_online(m, se, z)
                m, se = block_state(m, se, buf_m, buf_s)
                if tid == 0:
                    ws[U(2 * b)] = m
                    ws[U(2 * b + 1)] = se
                b += i64(cuda.gridDim.x)
        return _block_entry(softmax_split_partial, "partial", peeled, MASKED)

    if strategy == "split_finish":
        @device
        def merged_row(ws, row, n_split):
            """The row's (finite_max'd max, sum exp) from its chunks' partials, merged in a
            fixed order (every block gets the same bits)."""
            m = NEG_INF
            se = ZERO
            base = row * n_split
            for kk in range(n_split):
                m, se = RD.merge(m, se, ws[U(2 * (base + kk))], ws[U(2 * (base + kk) + 1)])
            return R.finite_max(m), se

        def softmax_split_finish(x_elem, x, out_elem, out, lse, ws, n_rows, n_cls, mode,
                                 n_split, phase, mask, m_stride):
            merged = cuda.shared.array(2, acc)  # the row's (max, sum)
            sv = cuda.local.array(K, acc)
            sv_b = cuda.local.array(K, acc)
            tid = i32(cuda.threadIdx.x)
            bd = i32(cuda.blockDim.x)
            length = i32((n_cls // K + n_split - 1) // n_split)  # as in split_partial
            b = i64(cuda.blockIdx.x)
            while b < n_rows * n_split:
                row = b // n_split
                chunk = i32(b - row * n_split)
                b += i64(cuda.gridDim.x)
                if mode == LOGSUMEXP:  # one thread a row: merge and write
                    if chunk == 0 and tid == 0:
                        m, se = merged_row(ws, row, n_split)
                        inv, log_s = row_end(se, m, mode)
                        lse[U(row)] = m + log_s
                    continue
                if tid == 0:  # one thread merges the row's partials, the block reads them
                    m, se = merged_row(ws, row, n_split)
                    merged[0] = m
                    merged[1] = se
                cuda.syncthreads()  # (block-uniform: every thread of the block is here)
                m = merged[0]
                se = merged[1]
                cuda.syncthreads()  # read before the next chunk's thread 0 writes
                inv, log_s = row_end(se, m, mode)
                start, h, rs, n_mid, n_edge = PL.parts(phase, row, n_cls)
                lo = i32(chunk * length)
                hi = i32(min(n_mid, lo + length))
                mh = row * m_stride + h
                write_pass(x, out, rs, i32(lo + tid), hi, bd, sv, sv_b, m, inv, log_s, mode,
                           mask, mh)
                if PEELED and chunk == 0 and tid < n_edge:
                    ec = PL.edge_col(i64(tid), h, n_mid)
                    live = True
                    if MASKED:
                        live = mask[U(row * m_stride + ec)]
                    edge_out(out_elem, start + ec, PL.load1(x_elem, start + ec), live, m, inv,
                             log_s, mode)
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
