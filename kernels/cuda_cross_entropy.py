"""Fused cross-entropy (loss and gradient in one launch) on the GPU, one kernel per strategy.

Every strategy covers every feature (weights, smoothing, ignore_index, z_loss, softcap, soft
targets, grad_output, writing the gradient into the logits), through the shared device
functions of cuda_rowmath and the reductions of cuda_reduce. Rows are ``n_cls`` contiguous
storage elements; row ``r`` starts at the 64-bit offset ``r * n_cls``.

Strategies, by row length:
  warp          2..32 lanes of a warp own a row, 16 values a lane (float64 8): the part
                (``warp_2x16`` .. ``warp_16x16``, ``warp`` = 32 lanes) with the fewest lanes
                that holds C (gpuce/_cuda_plan.py WARP_SHAPES). The row is held in registers,
                read once; several rows per warp and block. Lanes and values per lane are
                compile-time constants, so the register array is fully unrolled and addressed
                by constants.
  block_cached  a block owns a row, cached in dynamic shared memory, read once.
  block         a block owns a row of any length: an online (max, sum) sweep, then a
                gradient sweep (the row is read twice).
  split         ``n_split`` blocks share a row: ``ce_split_partial`` writes one (m, s, Q, qz)
                per chunk (qz relative to the chunk's max), ``ce_split_finish`` merges them in a fixed order (deterministic)
                and writes the chunk's gradient.

The block and split kernels walk a row in 32-bit steps (``while`` loops: no 64-bit index
arithmetic or range-length division per row); only row bases are 64-bit. Their body is
inlined twice, with and without the softcap, so the per-step helpers test nothing at run
time; with it, tanh(x * (1/cap)) is computed with 1/cap taken once, and the chain factor is
1 - t^2 from that t (float32/float64 cached rows keep t in shared memory). The target's
-1 is applied in the one step that holds it.

Kernel arguments (the same order everywhere; unused arrays get a harmless stand-in):
    x, g, q: logits, gradient, soft targets (storage dtype); tgt: int64 class indices;
    w, go, loss, st: weights, grad_output, per-row losses (or the total), device-computed
    [1/den_ce, 1/den_z] (accumulator dtype); part, ctr: the total's float64 block partials and
    int32 ticket; n_rows, n_cls, ignore_index, soft, weighted, write_grad, go_mode, use_st,
    total (int64); eps, zl, cap, go_scalar, inv_ce, inv_z (accumulator); then the
    strategy's own integer (n_split, or an unused 0). The split kernels also take ``ws``, the
    per-chunk partials (and each row's target logit, saved before any in-place write).

Class masks: the ``masked`` variant of each kernel takes three more arguments, ``mask``
(bool, one row per logits row or one (C,) row), ``m_stride`` (C, or 0 for the shared row)
and ``n_live`` (each mask row's live-class count, read only with label smoothing). Masked
classes enter the max and the sums as -inf (nothing is read into them), their gradient is
written as exactly 0, a masked target is a bad target (NaN loss, zero gradient), and so is
probability on a masked class. The unmasked kernels are the same bodies inlined with
stand-ins (``_unmasked_*``): their signature, and with MASKED a compile-time False, their
code, are those of the kernels without masks.

With ``total`` set (reduction mean or sum) the kernel writes no per-row losses: it sums them
into ``loss[0]`` itself (cuda_reduce.grid_sums: ``part`` holds one float64 per block, ``ctr``
the last-block ticket), deterministically, so a mean/sum call is at most 3 launches.

Also here: the small helpers the host launches around them (mean divisors, target
validation, dtype conversion).
"""
import math
from functools import lru_cache

import numpy as np
from numba import cuda, types

from .cuda_dtypes import DTYPES, array, device, traits
from .cuda_reduce import grid_sums, reductions
from .cuda_rowmath import ACTIVE, BAD, IDLE, rowmath
from .cuda_vec import access, i16_hi, i16_lo, paired_pass, peel, step_elems
from .._cuda_plan import MAX_BLOCK, WARP_BLOCK, WARP_SHAPES, warp_capacity, warp_shape  # noqa: F401

U = types.uint64  # index arrays with unsigned ints: no negative-index wraparound code


def ce_signature(dt, kind, qdt=None, vec=False, masked=False, peeled=False):
    T = traits(dt)
    st, acc = array(T.storage), array(T.acc)
    qt = array(traits(qdt or dt).storage)
    if vec:  # the 128-bit variant reads and writes rows through int32 views
        st = qt = array(types.int32)
    i64, a = types.int64, T.acc
    tail = (array(types.boolean), i64, acc) if masked else ()  # mask, m_stride, n_live
    if peeled:  # x and g as (storage, int32) views (cuda_vec.peel), q by element; ..., phase
        xa = (st, array(types.int32))
        head = (*xa, *xa, qt, array(i64), acc, acc, acc, acc, array(types.float64),
                array(types.int32))
        return types.void(*head, *(i64,) * 9, *(a,) * 6, i64, *tail)
    if kind == "split_partial":
        return types.void(st, qt, array(i64), acc, acc, i64, i64, i64, i64, i64, a, a, i64,
                          *tail)
    head = (st, st, qt, array(i64), acc, acc, acc, acc, array(types.float64), array(types.int32))
    if kind == "split_finish":
        head = head + (acc,)
    return types.void(*head, *(i64,) * 9, *(a,) * 6, i64, *tail)


@lru_cache(maxsize=None)
def ce_kernel(strategy, dt, qdt=None, vec=False, masked=False, peeled=False):
    """The Python function of one strategy's kernel for logits stored as ``dt`` (and soft
    targets as ``qdt``: float32 probabilities with half logits are used as given). ``vec``:
    the 128-bit variant (x, g, q are int32 views; every row start 16-byte aligned).
    ``masked``: the class-mask variant (see the module docstring). ``peeled``
    (block_cached): the 128-bit variant for rows anywhere (see ``peel_cached`` below)."""
    MASKED = masked
    R = rowmath(dt, qdt)
    RD = reductions(R.T.acc_np)
    GS = grid_sums()
    acc = R.T.acc
    f64 = types.float64
    NEG_INF, ZERO, ONE = R.NEG_INF, R.ZERO, R.ONE
    i64 = types.int64
    K = step_elems(dt) if vec or peeled else 1  # elements per memory access
    AX = access(dt, K)
    AQ = access(qdt or dt, K)

    i32 = types.int32

    # ---- per-step helpers of the block and split kernels (a step: K values in registers) ----

    @device
    def softcap_inverse(cap):
        """1/cap, computed once: the softcap is cap tanh(x * (1/cap)), its chain factor
        1 - tanh^2 (no division per element)."""
        return ONE / cap if cap > ZERO else ZERO

    @device
    def capped_logit(v, cap, inv_cap, capped):
        if capped:
            return cap * R.tanh(v * inv_cap)
        return v

    @device
    def cap_step(sv, tv, cap, inv_cap, capped):
        """sv: logits -> capped logits z; tv: t = tanh(x / cap) (the logits without a cap).
        ``capped`` (cap > 0) is a constant where the kernel body is inlined: no test per step."""
        if capped:
            for k in range(K):
                t = R.tanh(sv[k] * inv_cap)
                tv[k] = t
                sv[k] = cap * t
        else:
            for k in range(K):
                tv[k] = sv[k]

    @device
    def uncap_step(tv, sv, cap, capped):
        """sv = z from tv = t (cached tanh values), or the logits themselves."""
        if capped:
            for k in range(K):
                sv[k] = cap * tv[k]
        else:
            for k in range(K):
                sv[k] = tv[k]

    @device
    def wq_step(q, w, rs, s, qv, soft, weighted, keep, smooth):
        """qv = wq of the step's classes (soft targets read once, here)."""
        if soft:
            AQ.load(q, rs + s, qv)
        for k in range(K):
            qv[k] = R.weight_of(qv[k] if soft else ZERO, w, s * K + k, weighted, keep, smooth)

    @device
    def dist_step(q, w, rs, s, sv, qv, m, big_q, qz, soft, weighted, keep, smooth, mask, mo):
        """Add the step's classes to (Q, qz) relative to the row max m (sv: capped logits)."""
        if soft:
            AQ.load(q, rs + s, qv)
        for k in range(K):
            wq = R.weight_of(qv[k] if soft else ZERO, w, s * K + k, weighted, keep, smooth)
            if MASKED:
                wq = R.drop(wq, qv[k] if soft else ZERO, mask[U(mo + s * K + k)])
            big_q += wq
            qz += R.dist_term(wq, sv[k], m)
        return big_q, qz

    @device
    def target_step(state, y):
        """(step, index within the step) of an active hard target; (-1, -1) otherwise."""
        if state == ACTIVE and y >= 0:
            ys = i32(y // K)
            return ys, i32(y - ys * K)
        return i32(-1), i32(-1)

    @device
    def online_step(sv, qv, q, w, rs, s, m, se, big_q, qz, dist, soft, weighted, keep,
                    smooth, cap, inv_cap, capped, tv, mask, mo):
        """One loaded step of logits (sv) into the online (max, sum, Q, qz) state."""
        cap_step(sv, tv, cap, inv_cap, capped)
        if MASKED:
            R.mask_out(sv, mask, mo + s * K, K, NEG_INF)
        if dist:  # R.online_vals, with (Q, qz) rebased once a step too
            if soft:
                AQ.load(q, rs + s, qv)
            m_new = R.step_max(m, sv, K)
            shift = R.finite_max(m_new)
            se = se * math.exp(m - shift)
            qz = R.rebase(qz, big_q, m, m_new)
            for k in range(K):
                z = sv[k]
                se += math.exp(z - shift)
                wq = R.weight_of(qv[k] if soft else ZERO, w, s * K + k, weighted, keep, smooth)
                if MASKED:
                    wq = R.drop(wq, qv[k] if soft else ZERO, mask[U(mo + s * K + k)])
                qz += R.dist_term(wq, z, m_new)
                big_q += wq
            m = m_new
        else:
            m, se = R.online_vals(m, se, sv, K)
        return m, se, big_q, qz

    @device
    def grad_elems(sv, tv, ev, qv, m, k_p, k_q, k_y, yk, dist, cap, inv_cap, capped, done_cap,
                   have_e):
        """The step's gradient, value by value (short live ranges: no spills at 64
        registers); yk: the target's index in the step, or -1."""
        for k in range(K):
            z = sv[k]
            t = tv[k]
            if capped and not done_cap:
                t = R.tanh(z * inv_cap)
                z = cap * t
            e = ev[k] if have_e else math.exp(z - m)
            gf = ONE - t * t if capped else ONE
            sv[k] = R.grad_value(e, k_p, R.coef_of(k, yk, k_q, k_y, dist, qv[k]), gf)

    @device
    def grad_step(sv, tv, ev, qv, q, w, rs, s, m, k_p, k_q, k_y, ys, yk, dist, soft,
                  weighted, keep, smooth, cap, inv_cap, capped, mask, mo, done_cap, have_e):
        """sv: one step's logits (capped already when ``done_cap``: tv then holds t; ev holds
        exp(z - m) already when ``have_e``) -> its gradient, in the accumulator dtype."""
        if dist:
            wq_step(q, w, rs, s, qv, soft, weighted, keep, smooth)
        if s == ys:  # the target's step
            grad_elems(sv, tv, ev, qv, m, k_p, k_q, k_y, yk, dist, cap, inv_cap, capped,
                       done_cap, have_e)
        else:
            grad_elems(sv, tv, ev, qv, m, k_p, k_q, k_y, -1, dist, cap, inv_cap, capped,
                       done_cap, have_e)
        if MASKED:
            R.mask_out(sv, mask, mo + s * K, K, ZERO)

    if strategy in WARP_SHAPES:
        TPR, VPT = warp_shape(strategy, dt)
        LOG2 = TPR.bit_length() - 1
        SPL = VPT // K  # steps per lane
        i32 = types.int32
        # A lane's value v = j K + k (step j, element k) is class (j TPR + lane) K + k, so it
        # is the target iff the constant j TPR K + k equals yo = y - lane K (a 32-bit number
        # per row: no 64-bit index compare per value). Branches on the row's options (dist,
        # cap) are taken once per row, not once per value.

        def ce_warp(x, g, q, tgt, w, go, loss, st, part, ctr, n_rows, n_cls, ignore_index,
                    soft, weighted, write_grad, go_mode, use_st, total, eps, zl, cap, go_scalar,
                    inv_ce, inv_z, unused, mask, m_stride, n_live):
            vals = cuda.local.array(VPT, acc)
            gfs = cuda.local.array(VPT, acc)  # softcap: each value's chain factor
            sv = cuda.local.array(K, acc)
            qv = cuda.local.array(K, acc)
            buf_t = cuda.shared.array(32, f64)
            flag = cuda.shared.array(1, types.int32)
            row_sum = f64(0.0)
            tid = i64(cuda.threadIdx.x)
            lane = tid & (TPR - 1)
            per_block = i64(cuda.blockDim.x) >> LOG2
            inv_ce, inv_z = R.divisors(st, use_st, inv_ce, inv_z)
            keep = ONE - eps
            smooth = eps / acc(n_cls)
            dist = soft != 0 or eps > ZERO
            capping = cap > ZERO
            inv_cap = softcap_inverse(cap)
            n_steps = n_cls // K
            for first in range(i64(cuda.blockIdx.x) * per_block, n_rows,
                               i64(cuda.gridDim.x) * per_block):
                row = first + (tid >> LOG2)
                live = row < n_rows
                rs = row * n_steps  # the row's first step
                mo = row * m_stride  # the row's first mask element
                if soft:
                    state, y = (ACTIVE if live else IDLE), i64(-1)
                else:
                    state, y = R.hard_target(tgt, row, live, n_cls, ignore_index)
                if MASKED:
                    state, y = R.masked_target(state, y, mask, mo)
                    smooth = R.live_smooth(eps, n_live, min(row, n_rows - 1), m_stride)
                yo = i32(y - lane * K)  # y is -1 or a class < 512: negative or in range
                m = NEG_INF
                z_y = ZERO
                if state == ACTIVE and not soft:
                    # the target's logit read once per lane (a broadcast): not picked out of
                    # every value; read before the row's gradient is written (in place)
                    z_y = AX.elem(x, row * n_cls + y)
                    if capping:
                        z_y = cap * R.tanh(z_y * inv_cap)
                for j in range(SPL):
                    s = j * TPR + lane
                    if live and s < n_steps:
                        AX.load(x, rs + s, sv)
                        if capping:
                            for k in range(K):
                                t = R.tanh(sv[k] * inv_cap)
                                sv[k] = cap * t
                                gfs[j * K + k] = ONE - t * t
                        if MASKED:  # left out like the padding
                            R.mask_out(sv, mask, mo + s * K, K, NEG_INF)
                    else:  # padding: -inf, which adds nothing
                        for k in range(K):
                            sv[k] = NEG_INF
                    for k in range(K):
                        vals[j * K + k] = sv[k]
                        m = max(m, sv[k])  # (max.f32: a NaN is passed over, as by z > m)
                m = R.finite_max(RD.warp_max(m, TPR))
                big_q = ZERO
                qz = ZERO
                if dist:
                    for j in range(SPL):
                        s = j * TPR + lane
                        if live and s < n_steps:
                            if soft:
                                AQ.load(q, rs + s, qv)
                            for k in range(K):
                                wq = R.weight_of(qv[k] if soft else ZERO, w, s * K + k,
                                                 weighted, keep, smooth)
                                if MASKED:
                                    wq = R.drop(wq, qv[k] if soft else ZERO,
                                                mask[U(mo + s * K + k)])
                                big_q += wq
                                qz += R.dist_term(wq, vals[j * K + k], m)
                # the row max's e = 1 is counted apart and joins the small terms once: added
                # in turn onto 1, a lane's 16 values would round p ~8 ulps (p - 1 for p ~ 1)
                se = ZERO
                n_top = ZERO
                for v in range(VPT):
                    e = math.exp(vals[v] - m)
                    top = ONE if e == ONE else ZERO
                    se += e - top  # (exact: e, or 0 for a top value)
                    n_top += top
                    vals[v] = e
                se = RD.warp_sum(se + n_top, TPR)
                if dist:
                    big_q = RD.warp_sum(big_q, TPR)
                    qz = RD.warp_sum(qz, TPR)
                    if MASKED and big_q != big_q and state == ACTIVE:
                        state = BAD  # probability on a masked class
                t_y, go_v = R.row_weights(state, soft, weighted, keep, w, y, go, go_mode,
                                          go_scalar, row)
                lv, k_p, k_q, k_y = R.finish(state, m, se, z_y, t_y, big_q, qz, zl, inv_ce,
                                             inv_z, go_v)
                if live and lane == 0:
                    if total:
                        row_sum += f64(lv)
                    else:
                        loss[U(row)] = lv
                if write_grad and live:
                    for j in range(SPL):
                        s = j * TPR + lane
                        if s < n_steps:
                            if state == ACTIVE:
                                if dist:
                                    if soft:
                                        AQ.load(q, rs + s, qv)
                                    for k in range(K):
                                        wq = R.weight_of(qv[k] if soft else ZERO, w, s * K + k,
                                                         weighted, keep, smooth)
                                        sv[k] = R.coef_of(j * TPR * K + k, yo, k_q, k_y, True,
                                                          wq)
                                else:
                                    for k in range(K):
                                        sv[k] = R.coef_of(j * TPR * K + k, yo, k_q, k_y, False,
                                                          ZERO)
                                for k in range(K):
                                    sv[k] = R.grad_value(vals[j * K + k], k_p, sv[k],
                                                         gfs[j * K + k] if capping else ONE)
                                if MASKED:
                                    R.mask_out(sv, mask, mo + s * K, K, ZERO)
                            else:
                                for k in range(K):
                                    sv[k] = ZERO
                            AX.store(g, rs + s, sv)
            if total:
                GS.grid_total(row_sum, part, ctr, 1, loss, buf_t, flag)
        return ce_warp if MASKED else _unmasked_main(ce_warp)

    if strategy == "block_cached" and peeled:
        # Rows anywhere (any C, offset views): the first pass streams the row in 16-byte steps
        # (cuda_vec.peel; head and tail element by element) into the cache at each value's
        # *column*, taking the max (exact in any order). The sums then read the cache in the
        # aligned kernel's column steps (thread tid: steps tid, tid + bd, ...; the last partial
        # step after them), so a row's bits do not depend on where it starts in memory (batch
        # invariance) and equal the aligned kernel's when C is a multiple of K. The gradient
        # is elementwise, so it is written in 16-byte steps again.
        PL = peel(dt, K)
        LOG_K = K.bit_length() - 1
        # half rows cached as stored, 2 bytes a value; with a softcap every row caches t in
        # float32, as block_cached does (one tanh a value, not one a pass)
        RAWC = dt in ("float16", "bfloat16")
        RAW = PL.RAW if RAWC else acc
        NW = PL.NW if RAWC else 1
        FCACHE = not RAWC
        # two steps a trip in flight: one 512-thread block an SM (the launch bound: its
        # soft-target path, reading q by column, takes ~94 registers in bf16 on sm_90)
        PAIR = True
        load_s = R.T.load
        qload = traits(qdt or dt).load

        @device
        def peel_cache_step(rv, sv, tv, c0, m, cache, cache_h, cap, inv_cap, capped, mask, mo):
            """The first pass over one loaded step (rv: its words when RAWC, else sv: its
            values) of columns c0..c0+K-1: into the cache, and into the max."""
            if RAWC:
                if not capped:
                    for j in range(NW):
                        cache_h[U(c0 + 2 * j)] = i16_lo(rv[j])
                        cache_h[U(c0 + 2 * j + 1)] = i16_hi(rv[j])
                PL.unpack_raw(rv, sv)
            cap_step(sv, tv, cap, inv_cap, capped)
            if MASKED:
                R.mask_out(sv, mask, mo + c0, K, NEG_INF)
                R.mask_out(tv, mask, mo + c0, K, NEG_INF)
            for k in range(K):
                if FCACHE or capped:
                    cache[U(c0 + k)] = tv[k]
                m = max(m, sv[k])
            return m

        @device
        def mask_cols(vals, mask, first, n, fill):
            """R.mask_out over n <= K values, unrolled K times (an index bounded by a run-time
            n would put the step's array in local memory)."""
            for k in range(K):
                if k < n and not mask[U(first + k)]:
                    vals[k] = fill

        first_pass = paired_pass(PL, RAWC, peel_cache_step)  # (index: the step's column)

        @device
        def cached_cols(sv, tv, rv, c0, n, words, cache, cache_r, cache_s, cap, inv_cap, capped):
            """sv, tv = the capped logits and t of cached columns c0..c0+n-1 (n <= K; the other
            slots 0), as cached_logits; ``words``: c0 is a column step's (whole words)."""
            if RAWC and not capped:
                if words:
                    for j in range(NW):
                        rv[j] = cache_r[U((c0 >> 1) + j)]
                    PL.unpack_raw(rv, sv)
                else:
                    for k in range(K):
                        sv[k] = load_s(cache_s[U(c0 + k)]) if k < n else ZERO
                cap_step(sv, tv, cap, inv_cap, capped)
            else:
                for k in range(K):
                    tv[k] = cache[U(c0 + k)] if k < n else ZERO
                uncap_step(tv, sv, cap, capped)

        @device
        def wq_col(q, w, qrow, c, soft, weighted, keep, smooth):
            """(wq, q) of column c (soft targets read by column: q need not share x's phase)."""
            qc = qload(q[U(qrow + c)]) if soft else ZERO
            return R.weight_of(qc, w, c, weighted, keep, smooth), qc

        @device
        def sum_cols(sv, tv, ev, rv, q, w, qrow, c0, n, words, m, se, big_q, qz, dist, soft,
                     weighted, keep, smooth, cap, inv_cap, capped, cache, cache_r, cache_s, mask,
                     mo):
            """Columns c0..c0+n-1 into (sum exp, Q, qz): the aligned kernel's second pass over
            one step, value for value."""
            cached_cols(sv, tv, rv, c0, n, words, cache, cache_r, cache_s, cap, inv_cap, capped)
            if RAWC and MASKED:
                mask_cols(sv, mask, mo + c0, n, NEG_INF)
            for k in range(K):
                if k < n:
                    ev[k] = math.exp(sv[k] - m)
                    se += ev[k]
            if FCACHE and not capped:  # the cache holds exp(z - m) from here
                for k in range(K):
                    if k < n:
                        cache[U(c0 + k)] = ev[k]
            if capped and not dist:  # ... or e (1 - t^2), as the aligned kernel's
                for k in range(K):
                    if k < n:
                        cache[U(c0 + k)] = ev[k] * (ONE - tv[k] * tv[k])
            if dist:
                for k in range(K):
                    if k < n:
                        wq, qc = wq_col(q, w, qrow, c0 + k, soft, weighted, keep, smooth)
                        if MASKED:
                            wq = R.drop(wq, qc, mask[U(mo + c0 + k)])
                        big_q += wq
                        qz += R.dist_term(wq, sv[k], m)
            return se, big_q, qz

        @device
        def grad_cols(sv, tv, ev, qv, q, w, qrow, c0, n, m, k_p, k_q, k_y, y, dist, soft,
                      weighted, keep, smooth, cap, inv_cap, capped, mask, mo, have_e):
            """sv, tv: cached columns c0..c0+n-1 (cached_cols) -> their gradient."""
            if dist:
                for k in range(K):
                    qv[k] = wq_col(q, w, qrow, c0 + k, soft, weighted, keep, smooth)[0] \
                        if k < n else ZERO
            yk = y - c0
            if yk >= 0 and yk < K:  # (y = -1 for soft targets)
                grad_elems(sv, tv, ev, qv, m, k_p, k_q, k_y, yk, dist, cap, inv_cap, capped,
                           True, have_e)
            else:
                grad_elems(sv, tv, ev, qv, m, k_p, k_q, k_y, -1, dist, cap, inv_cap, capped,
                           True, have_e)
            if MASKED:
                mask_cols(sv, mask, mo + c0, n, ZERO)

        @device
        def peel_body(x_elem, x, g_elem, g, q, tgt, w, go, loss, st, part, ctr, n_rows, n_cls,
                      ignore_index, soft, weighted, write_grad, go_mode, use_st, total, eps, zl,
                      cap, go_scalar, inv_ce, inv_z, phase, mask, m_stride, n_live, capped):
            cache = cuda.shared.array(0, acc)  # the row's values (FCACHE)
            cache_r = cuda.shared.array(0, RAW)  # ... as stored, by words (RAWC)
            cache_s = cuda.shared.array(0, R.T.storage)  # ... by element
            cache_h = cuda.shared.array(0, types.int16)  # ... by element, as bits
            buf_m = cuda.shared.array(32, acc)
            buf_s = cuda.shared.array(32, acc)
            buf_t = cuda.shared.array(32, f64)
            flag = cuda.shared.array(1, types.int32)
            row_sum = cuda.shared.array(1, f64)
            sv = cuda.local.array(K, acc)
            sv_b = cuda.local.array(K, acc)
            tv = cuda.local.array(K, acc)
            ev = cuda.local.array(K, acc)
            qv = cuda.local.array(K, acc)
            rv = cuda.local.array(NW, RAW)
            rv_b = cuda.local.array(NW, RAW)
            if total and cuda.threadIdx.x == 0:
                row_sum[0] = f64(0.0)
            tid = i32(cuda.threadIdx.x)
            bd = i32(cuda.blockDim.x)
            dist = soft != 0 or eps > ZERO
            inv_cap = softcap_inverse(cap)
            have_e = FCACHE and not capped
            row = i64(cuda.blockIdx.x)
            while row < n_rows:
                cuda.syncthreads()  # the previous row's passes are done with the cache
                start, h, first, n_mid, n_edge = PL.parts(phase, row, n_cls)
                h = i32(h)
                n_mid = i32(n_mid)
                n_edge = i32(n_edge)
                mo = row * m_stride
                keep = ONE - eps  # (per row, as the divisors below: fewer registers live)
                smooth = eps / acc(n_cls)
                if soft:
                    state, y = ACTIVE, i64(-1)
                else:
                    state, y = R.hard_target(tgt, row, True, n_cls, ignore_index)
                if MASKED:
                    state, y = R.masked_target(state, y, mask, mo)
                    smooth = R.live_smooth(eps, n_live, row, m_stride)
                y = i32(y)
                m = NEG_INF
                if tid < n_edge:  # a head or tail element (its value in every slot); edges
                    # go first: the loops over the middle then keep fewer values live
                    ec = i32(PL.edge_col(tid, h, n_mid))
                    r = x_elem[U(start + ec)]
                    if RAWC and not capped:
                        cache_s[U(ec)] = r
                    for k in range(K):
                        sv[k] = load_s(r)
                    cap_step(sv, tv, cap, inv_cap, capped)
                    if MASKED and not mask[U(mo + ec)]:
                        sv[0] = NEG_INF
                        tv[0] = NEG_INF
                    if FCACHE or capped:
                        cache[U(ec)] = tv[0]
                    m = max(m, sv[0])
                m = first_pass(x, first, n_mid, h, i32(K), PAIR, m, rv, rv_b, sv, sv_b, tv, cache,
                               cache_h, cap, inv_cap, capped, mask, mo)
                m = R.finite_max(RD.block_max(m, buf_m))  # (its barrier: the cache is whole)
                z_y = ZERO
                tanh_y = ZERO  # the target's t (softcap)
                chain = capped and not dist  # the sums leave e (1 - t^2) in the cache
                if state == ACTIVE and not soft:
                    cached_cols(sv, tv, rv, y, 1, False, cache, cache_r, cache_s, cap, inv_cap,
                                capped)
                    z_y = sv[0]
                    tanh_y = tv[0]
                    if have_e or chain:
                        cuda.syncthreads()  # read before the sums overwrite it
                se = ZERO
                big_q = ZERO
                qz = ZERO
                n_cs = i32(n_cls >> LOG_K)  # the sums' whole column steps
                n_rem = i32(n_cls) - n_cs * K  # ... and the last step's columns
                s = tid
                while s < n_cs:
                    se, big_q, qz = sum_cols(sv, tv, ev, rv, q, w, start, s * K, K, True, m, se,
                                             big_q, qz, dist, soft, weighted, keep, smooth, cap,
                                             inv_cap, capped, cache, cache_r, cache_s, mask, mo)
                    s = i32(s + bd)
                if s == n_cs and n_rem > 0:  # the partial step n_cs, by the thread it falls to
                    se, big_q, qz = sum_cols(sv, tv, ev, rv, q, w, start, n_cs * K, n_rem, False,
                                             m, se, big_q, qz, dist, soft, weighted, keep, smooth,
                                             cap, inv_cap, capped, cache, cache_r, cache_s, mask,
                                             mo)
                se = RD.block_sum(se, buf_s)
                if dist:
                    big_q = RD.block_sum(big_q, buf_m)
                    qz = RD.block_sum(qz, buf_s)
                    if MASKED and big_q != big_q and state == ACTIVE:
                        state = BAD  # probability on a masked class
                t_y, go_v = R.row_weights(state, soft, weighted, keep, w, y, go, go_mode,
                                          go_scalar, row)
                i_ce, i_z = R.divisors(st, use_st, inv_ce, inv_z)
                lv, k_p, k_q, k_y = R.finish(state, m, se, z_y, t_y, big_q, qz, zl, i_ce, i_z,
                                             go_v)
                if tid == 0:
                    if total:
                        row_sum[0] += f64(lv)
                    else:
                        loss[U(row)] = lv
                if write_grad:
                    # with the chain factor cached: the aligned kernel's gradient bit for bit,
                    # k_p e (1 - t^2), the target's p - 1 formed from its own e before the
                    # chain factor (no cancellation of rounded products)
                    g_y = (k_p * math.exp(z_y - m) - k_y) * (ONE - tanh_y * tanh_y) if chain \
                        else ZERO
                    if tid < n_edge:  # (one 16-bit store in the kernel, see test_ptx)
                        ec = i32(PL.edge_col(tid, h, n_mid))
                        v = ZERO
                        if state == ACTIVE and chain:
                            v = k_p * cache[U(ec)]
                            if ec == y:
                                v = g_y
                            if MASKED and not mask[U(mo + ec)]:
                                v = ZERO
                        elif state == ACTIVE:
                            cached_cols(sv, tv, rv, ec, 1, False, cache, cache_r, cache_s, cap,
                                        inv_cap, capped)
                            if have_e:
                                ev[0] = tv[0]
                            grad_cols(sv, tv, ev, qv, q, w, start, ec, 1, m, k_p, k_q, k_y, y,
                                      dist, soft, weighted, keep, smooth, cap, inv_cap, capped,
                                      mask, mo, have_e)
                            v = sv[0]
                        PL.store1(g_elem, start + ec, v)
                    s = tid
                    if state != ACTIVE:
                        for k in range(K):
                            sv[k] = ZERO
                        while s < n_mid:
                            PL.store(g, first + s, sv)
                            s = i32(s + bd)
                    elif chain:
                        while s < n_mid:
                            c0 = h + s * K
                            for k in range(K):
                                sv[k] = k_p * cache[U(c0 + k)]
                            yk = y - c0
                            for k in range(K):
                                if k == yk:
                                    sv[k] = g_y
                            if MASKED:
                                mask_cols(sv, mask, mo + c0, K, ZERO)
                            PL.store(g, first + s, sv)
                            s = i32(s + bd)
                    else:
                        while s < n_mid:
                            c0 = h + s * K
                            cached_cols(sv, tv, rv, c0, K, False, cache, cache_r, cache_s, cap,
                                        inv_cap, capped)
                            if have_e:  # the cache holds exp(z - m)
                                for k in range(K):
                                    ev[k] = tv[k]
                            grad_cols(sv, tv, ev, qv, q, w, start, c0, K, m, k_p, k_q, k_y, y,
                                      dist, soft, weighted, keep, smooth, cap, inv_cap, capped,
                                      mask, mo, have_e)
                            PL.store(g, first + s, sv)
                            s = i32(s + bd)
                row += i64(cuda.gridDim.x)
            if total:
                GS.grid_total(row_sum[0] if tid == 0 else f64(0.0), part, ctr, 1, loss, buf_t,
                              flag)

        def ce_block_cached_peel(x_elem, x, g_elem, g, q, tgt, w, go, loss, st, part, ctr,
                                 n_rows, n_cls, ignore_index, soft, weighted, write_grad,
                                 go_mode, use_st, total, eps, zl, cap, go_scalar, inv_ce, inv_z,
                                 phase, mask, m_stride, n_live):
            if cap > ZERO:  # decided once (see ce_block)
                peel_body(x_elem, x, g_elem, g, q, tgt, w, go, loss, st, part, ctr, n_rows,
                          n_cls, ignore_index, soft, weighted, write_grad, go_mode, use_st,
                          total, eps, zl, cap, go_scalar, inv_ce, inv_z, phase, mask, m_stride,
                          n_live, True)
            else:
                peel_body(x_elem, x, g_elem, g, q, tgt, w, go, loss, st, part, ctr, n_rows,
                          n_cls, ignore_index, soft, weighted, write_grad, go_mode, use_st,
                          total, eps, zl, cap, go_scalar, inv_ce, inv_z, phase, mask, m_stride,
                          n_live, False)
        return ce_block_cached_peel if MASKED else _unmasked_peel(ce_block_cached_peel)

    if strategy in ("block_cached", "block"):
        cached = strategy == "block_cached"
        # half rows are cached as stored (2 bytes a value, twice the row that fits), and
        # widened again in each pass; float32/float64 rows as values (the logit, or with a
        # softcap t = tanh(x / cap)), then exp(z - m). With a softcap every row caches t in
        # the accumulator type (the host gives half rows 4 bytes a value): one tanh a value,
        # not one a pass; without soft targets or smoothing, the second pass turns t into
        # e (1 - t^2), the gradient over k_p
        RAWC = cached and dt in ("float16", "bfloat16")
        RAW = AX.RAW if RAWC else acc
        NW = AX.NW if RAWC else 1
        FCACHE = cached and not RAWC
        # the passes that read the logits take two steps a trip (both loads in flight first):
        # one 16-byte load a thread is 16 KiB an SM at 1024 threads, under the ~17 KiB an
        # H100 needs (the half rows' second step fits in the 64 registers of 2 blocks an SM)

        @device
        def cache_step(rv, sv, tv, s, m, cache, cache_r, cap, inv_cap, capped, mask, mo):
            """block_cached's first pass over one loaded step (rv: its stored words when
            RAWC, else sv: its values): into the cache, and into the max."""
            if RAWC:
                if not capped:
                    for j in range(NW):
                        cache_r[U(s * NW + j)] = rv[j]
                AX.unpack_raw(rv, sv)
            if capped:  # t into the cache, and into the max of t (z = cap t increases with t)
                for k in range(K):
                    t = R.tanh(sv[k] * inv_cap)
                    if MASKED:
                        t = R.keep_live(t, mask, mo + s * K + k, NEG_INF)
                    cache[U(s * K + k)] = t
                    m = max(m, t)
                return m
            cap_step(sv, tv, cap, inv_cap, capped)
            if MASKED:
                R.mask_out(sv, mask, mo + s * K, K, NEG_INF)
                R.mask_out(tv, mask, mo + s * K, K, NEG_INF)
            for k in range(K):
                if FCACHE:
                    cache[U(s * K + k)] = tv[k]
                m = max(m, sv[k])
            return m

        first_pass = paired_pass(AX, RAWC, cache_step)

        @device
        def cached_logits(sv, tv, rv, s, cache, cache_r, cap, inv_cap, capped):
            """sv = a cached step's capped logits, tv = t (RAWC and FCACHE)."""
            if RAWC and not capped:
                for j in range(NW):
                    rv[j] = cache_r[U(s * NW + j)]
                AX.unpack_raw(rv, sv)
                cap_step(sv, tv, cap, inv_cap, capped)
            else:
                for k in range(K):
                    tv[k] = cache[U(s * K + k)]
                uncap_step(tv, sv, cap, capped)

        @device
        def target_value(x, row, n_cls, y, state, soft, inv_cap, capped):
            """The target's logit, or with a softcap its t (z_y = cap t); read before the
            barriers that precede any (in-place) write."""
            v = ZERO
            if state == ACTIVE and not soft:
                v = AX.elem(x, row * n_cls + y)
                if capped:
                    v = R.tanh(v * inv_cap)
            return v

        @device
        def block_body(x, g, q, tgt, w, go, loss, st, part, ctr, n_rows, n_cls, ignore_index,
                       soft, weighted, write_grad, go_mode, use_st, total, eps, zl, cap,
                       go_scalar, inv_ce, inv_z, mask, m_stride, n_live, capped):
            cache = cuda.shared.array(0, acc)  # the row's values when cached (not RAWC)
            cache_r = cuda.shared.array(0, RAW)  # the row as stored (RAWC)
            buf_m = cuda.shared.array(32, acc)
            buf_s = cuda.shared.array(32, acc)
            buf_t = cuda.shared.array(32, f64)
            flag = cuda.shared.array(1, types.int32)
            row_sum = cuda.shared.array(1, f64)  # thread 0's sum of the losses (total): not
            # held in registers across the rows
            # two steps per trip (a, b): both loads in flight before either is used
            sv = cuda.local.array(K, acc)  # a step's logits z, then its gradient
            sv_b = cuda.local.array(K, acc)
            tv = cuda.local.array(K, acc)  # t = tanh(x / cap) (z without a cap), then 1 - t^2
            ev = cuda.local.array(K, acc)  # exp(z - m)
            qv = cuda.local.array(K, acc)  # soft targets, then wq
            rv = cuda.local.array(NW, RAW)
            rv_b = cuda.local.array(NW, RAW)
            if total and cuda.threadIdx.x == 0:
                row_sum[0] = f64(0.0)
            # 32-bit indices within a row (steps, shared memory); 64-bit only for row bases
            tid = i32(cuda.threadIdx.x)
            bd = i32(cuda.blockDim.x)
            keep = ONE - eps
            smooth = eps / acc(n_cls)
            dist = soft != 0 or eps > ZERO
            inv_cap = softcap_inverse(cap)
            n_steps = i32(n_cls // K)
            row = i64(cuda.blockIdx.x)
            while row < n_rows:
                rs = row * n_steps
                mo = row * m_stride
                if soft:
                    state, y = ACTIVE, i64(-1)
                else:
                    state, y = R.hard_target(tgt, row, True, n_cls, ignore_index)
                if MASKED:
                    state, y = R.masked_target(state, y, mask, mo)
                    smooth = R.live_smooth(eps, n_live, row, m_stride)
                if not cached:
                    v_y = target_value(x, row, n_cls, y, state, soft, inv_cap, capped)
                m = NEG_INF
                se = ZERO
                big_q = ZERO
                qz = ZERO
                if cached:
                    m = first_pass(x, rs, n_steps, i32(0), i32(1), True, m, rv, rv_b, sv, sv_b, tv,
                                   cache, cache_r, cap, inv_cap, capped, mask, mo)
                    m = RD.block_max(m, buf_m)
                    m = R.finite_max(cap * m if capped else m)  # (the max of t -> of z)
                    # read here (not live through the first pass), still before a barrier
                    v_y = target_value(x, row, n_cls, y, state, soft, inv_cap, capped)
                    s = tid
                    while s < n_steps:
                        cached_logits(sv, tv, rv, s, cache, cache_r, cap, inv_cap, capped)
                        if RAWC and MASKED and not capped:
                            R.mask_out(sv, mask, mo + s * K, K, NEG_INF)
                        for k in range(K):
                            ev[k] = math.exp(sv[k] - m)
                            se += ev[k]
                        if FCACHE and not capped:  # each thread only touches its own columns
                            for k in range(K):
                                cache[U(s * K + k)] = ev[k]
                        if capped and not dist:  # e (1 - t^2): the gradient is k_p times it
                            for k in range(K):
                                cache[U(s * K + k)] = ev[k] * (ONE - tv[k] * tv[k])
                        if dist:
                            big_q, qz = dist_step(q, w, rs, s, sv, qv, m, big_q, qz, soft,
                                                  weighted, keep, smooth, mask, mo)
                        s = i32(s + bd)
                    se = RD.block_sum(se, buf_s)
                else:
                    s = tid
                    while s < n_steps:
                        s_b = i32(s + bd)
                        AX.load(x, rs + s, sv)
                        if s_b < n_steps:
                            AX.load(x, rs + s_b, sv_b)
                        m, se, big_q, qz = online_step(sv, qv, q, w, rs, s, m, se, big_q, qz,
                                                       dist, soft, weighted, keep, smooth, cap,
                                                       inv_cap, capped, tv, mask, mo)
                        if s_b < n_steps:
                            m, se, big_q, qz = online_step(sv_b, qv, q, w, rs, s_b, m, se, big_q,
                                                           qz, dist, soft, weighted, keep, smooth,
                                                           cap, inv_cap, capped, tv, mask, mo)
                        s = i32(s_b + bd)
                    m_blk, se = RD.block_merge(m, se, buf_m, buf_s)
                    qz = R.rebase(qz, big_q, m, m_blk)  # every thread's qz relative to one max
                    m = R.finite_max(m_blk)
                if dist:
                    big_q = RD.block_sum(big_q, buf_m)
                    qz = RD.block_sum(qz, buf_s)
                    if MASKED and big_q != big_q and state == ACTIVE:
                        state = BAD  # probability on a masked class
                t_y, go_v = R.row_weights(state, soft, weighted, keep, w, y, go, go_mode,
                                          go_scalar, row)
                z_y = cap * v_y if capped else v_y
                # the divisors read per row: not held in registers through the row's passes
                d_ce, d_z = R.divisors(st, use_st, inv_ce, inv_z)
                lv, k_p, k_q, k_y = R.finish(state, m, se, z_y, t_y, big_q, qz, zl, d_ce, d_z,
                                             go_v)
                if tid == 0:
                    if total:
                        row_sum[0] += f64(lv)
                    else:
                        loss[U(row)] = lv
                if write_grad:
                    ys, yk = target_step(state, y)
                    s = tid
                    if state != ACTIVE:
                        for k in range(K):
                            sv[k] = ZERO
                        while s < n_steps:
                            AX.store(g, rs + s, sv)
                            s = i32(s + bd)
                    elif cached and capped and not dist:
                        # the cache holds e (1 - t^2); the target's p - 1 is formed from its
                        # own e before the chain factor (no cancellation of rounded products)
                        g_y = (k_p * math.exp(z_y - m) - k_y) * (ONE - v_y * v_y)
                        while s < n_steps:
                            for k in range(K):
                                sv[k] = k_p * cache[U(s * K + k)]
                            if s == ys:
                                for k in range(K):
                                    if k == yk:
                                        sv[k] = g_y
                            if MASKED:
                                R.mask_out(sv, mask, mo + s * K, K, ZERO)
                            AX.store(g, rs + s, sv)
                            s = i32(s + bd)
                    elif cached:
                        while s < n_steps:
                            cached_logits(sv, tv, rv, s, cache, cache_r, cap, inv_cap, capped)
                            if FCACHE and not capped:  # the cache holds exp(z - m)
                                for k in range(K):
                                    ev[k] = tv[k]
                            grad_step(sv, tv, ev, qv, q, w, rs, s, m, k_p, k_q, k_y, ys, yk,
                                      dist, soft, weighted, keep, smooth, cap, inv_cap, capped, mask,
                                      mo, True, FCACHE and not capped)
                            AX.store(g, rs + s, sv)
                            s = i32(s + bd)
                    else:
                        while s < n_steps:
                            s_b = i32(s + bd)
                            AX.load(x, rs + s, sv)
                            if s_b < n_steps:
                                AX.load(x, rs + s_b, sv_b)
                            grad_step(sv, tv, ev, qv, q, w, rs, s, m, k_p, k_q, k_y, ys, yk,
                                      dist, soft, weighted, keep, smooth, cap, inv_cap, capped, mask,
                                      mo, False, False)
                            AX.store(g, rs + s, sv)
                            if s_b < n_steps:
                                grad_step(sv_b, tv, ev, qv, q, w, rs, s_b, m, k_p, k_q, k_y, ys,
                                          yk, dist, soft, weighted, keep, smooth, cap, inv_cap,
                                          capped, mask, mo, False, False)
                                AX.store(g, rs + s_b, sv_b)
                            s = i32(s_b + bd)
                row += i64(cuda.gridDim.x)
            if total:
                GS.grid_total(row_sum[0] if tid == 0 else f64(0.0), part, ctr, 1, loss, buf_t,
                              flag)
        def ce_block(x, g, q, tgt, w, go, loss, st, part, ctr, n_rows, n_cls, ignore_index,
                     soft, weighted, write_grad, go_mode, use_st, total, eps, zl, cap, go_scalar,
                     inv_ce, inv_z, unused, mask, m_stride, n_live):
            # the softcap decided once: each inlined body has its loops free of the test
            if cap > ZERO:
                block_body(x, g, q, tgt, w, go, loss, st, part, ctr, n_rows, n_cls, ignore_index,
                           soft, weighted, write_grad, go_mode, use_st, total, eps, zl, cap,
                           go_scalar, inv_ce, inv_z, mask, m_stride, n_live, True)
            else:
                block_body(x, g, q, tgt, w, go, loss, st, part, ctr, n_rows, n_cls, ignore_index,
                           soft, weighted, write_grad, go_mode, use_st, total, eps, zl, cap,
                           go_scalar, inv_ce, inv_z, mask, m_stride, n_live, False)

        return ce_block if MASKED else _unmasked_main(ce_block)

    if strategy == "split_partial":
        PAIR = K == 1  # two scalar steps a trip; a second 16-byte step spills (half, 64 regs)

        @device
        def partial_body(x, q, tgt, w, ws, n_rows, n_cls, ignore_index, soft, weighted, eps,
                         cap, n_split, mask, m_stride, n_live, capped):
            buf_m = cuda.shared.array(32, acc)
            buf_s = cuda.shared.array(32, acc)
            sv = cuda.local.array(K, acc)
            sv_b = cuda.local.array(K, acc)
            tv = cuda.local.array(K, acc)
            qv = cuda.local.array(K, acc)
            tid = i32(cuda.threadIdx.x)
            bd = i32(cuda.blockDim.x)
            keep = ONE - eps
            smooth = eps / acc(n_cls)
            dist = soft != 0 or eps > ZERO
            inv_cap = softcap_inverse(cap)
            n_steps = i32(n_cls // K)
            length = i32((n_steps + n_split - 1) // n_split)  # steps per chunk
            zy_base = n_rows * n_split * 4
            b = i64(cuda.blockIdx.x)
            while b < n_rows * n_split:
                row = b // n_split
                lo = i32(b - row * n_split) * length
                hi = min(n_steps, lo + length)
                rs = row * n_steps
                mo = row * m_stride
                if MASKED:
                    smooth = R.live_smooth(eps, n_live, row, m_stride)
                m = NEG_INF
                se = ZERO
                big_q = ZERO
                qz = ZERO
                s = i32(lo + tid)
                while s < hi:
                    s_b = i32(s + bd)
                    AX.load(x, rs + s, sv)
                    if PAIR and s_b < hi:
                        AX.load(x, rs + s_b, sv_b)
                    m, se, big_q, qz = online_step(sv, qv, q, w, rs, s, m, se, big_q, qz, dist,
                                                   soft, weighted, keep, smooth, cap, inv_cap,
                                                   capped, tv, mask, mo)
                    if PAIR and s_b < hi:
                        m, se, big_q, qz = online_step(sv_b, qv, q, w, rs, s_b, m, se, big_q, qz,
                                                       dist, soft, weighted, keep, smooth, cap,
                                                       inv_cap, capped, tv, mask, mo)
                    s = i32(s_b + bd) if PAIR else s_b
                m_blk, se = RD.block_merge(m, se, buf_m, buf_s)
                qz = R.rebase(qz, big_q, m, m_blk)
                m = m_blk
                if dist:
                    big_q = RD.block_sum(big_q, buf_m)
                    qz = RD.block_sum(qz, buf_s)
                if tid == 0:
                    ws[U(b * 4)] = m
                    ws[U(b * 4 + 1)] = se
                    ws[U(b * 4 + 2)] = big_q
                    ws[U(b * 4 + 3)] = qz
                    if not soft:
                        state, y = R.hard_target(tgt, row, True, n_cls, ignore_index)
                        if state == ACTIVE and lo * K <= y and y < hi * K:
                            # saved here: in place, the finishing kernel overwrites x[y]
                            ws[U(zy_base + row)] = capped_logit(AX.elem(x, row * n_cls + y), cap,
                                                                inv_cap, capped)
                b += i64(cuda.gridDim.x)

        def ce_split_partial(x, q, tgt, w, ws, n_rows, n_cls, ignore_index, soft, weighted, eps,
                             cap, n_split, mask, m_stride, n_live):
            if cap > ZERO:  # decided once (see ce_block)
                partial_body(x, q, tgt, w, ws, n_rows, n_cls, ignore_index, soft, weighted, eps,
                             cap, n_split, mask, m_stride, n_live, True)
            else:
                partial_body(x, q, tgt, w, ws, n_rows, n_cls, ignore_index, soft, weighted, eps,
                             cap, n_split, mask, m_stride, n_live, False)
        return ce_split_partial if MASKED else _unmasked_partial(ce_split_partial)

    if strategy == "split_finish":
        PAIR = K == 1

        @device
        def finish_body(x, g, q, tgt, w, go, loss, st, part, ctr, ws, n_rows, n_cls,
                        ignore_index, soft, weighted, write_grad, go_mode, use_st, total, eps,
                        zl, cap, go_scalar, inv_ce, inv_z, n_split, mask, m_stride, n_live,
                        capped):
            buf_t = cuda.shared.array(32, f64)
            flag = cuda.shared.array(1, types.int32)
            row_sum = cuda.shared.array(1, f64)  # thread 0's sum of the losses (see ce_block)
            merged = cuda.shared.array(4, acc)  # the row's (max, sum, Q, qz)
            sv = cuda.local.array(K, acc)
            sv_b = cuda.local.array(K, acc)
            tv = cuda.local.array(K, acc)
            ev = cuda.local.array(K, acc)
            qv = cuda.local.array(K, acc)
            if total and cuda.threadIdx.x == 0:
                row_sum[0] = f64(0.0)
            tid = i32(cuda.threadIdx.x)
            bd = i32(cuda.blockDim.x)
            inv_ce, inv_z = R.divisors(st, use_st, inv_ce, inv_z)
            keep = ONE - eps
            smooth = eps / acc(n_cls)
            dist = soft != 0 or eps > ZERO
            inv_cap = softcap_inverse(cap)
            n_steps = i32(n_cls // K)
            length = i32((n_steps + n_split - 1) // n_split)
            zy_base = n_rows * n_split * 4
            b = i64(cuda.blockIdx.x)
            while b < n_rows * n_split:
                row = b // n_split
                chunk = i32(b - row * n_split)
                b += i64(cuda.gridDim.x)
                if chunk != 0 and not write_grad:
                    continue  # (block-uniform: the whole block skips the chunk)
                if tid == 0:  # one thread merges the row's partials, the block reads them
                    m = NEG_INF
                    se = ZERO
                    big_q = ZERO
                    qz = ZERO
                    base = row * n_split * 4
                    for kk in range(n_split):  # a fixed order: every block gets the same bits
                        m_k = ws[U(base + 4 * kk)]
                        q_k = ws[U(base + 4 * kk + 2)]
                        m_new, se = RD.merge(m, se, m_k, ws[U(base + 4 * kk + 1)])
                        qz = (R.rebase(qz, big_q, m, m_new)
                              + R.rebase(ws[U(base + 4 * kk + 3)], q_k, m_k, m_new))
                        big_q += q_k
                        m = m_new
                    merged[0] = m
                    merged[1] = se
                    merged[2] = big_q
                    merged[3] = qz
                cuda.syncthreads()  # (block-uniform: every thread of the block is here)
                m = R.finite_max(merged[0])
                se = merged[1]
                big_q = merged[2]
                qz = merged[3]
                cuda.syncthreads()  # read before the next chunk's thread 0 writes
                rs = row * n_steps
                mo = row * m_stride
                if soft:
                    state, y = ACTIVE, i64(-1)
                else:
                    state, y = R.hard_target(tgt, row, True, n_cls, ignore_index)
                if MASKED:
                    state, y = R.masked_target(state, y, mask, mo)
                    smooth = R.live_smooth(eps, n_live, row, m_stride)
                    if big_q != big_q and state == ACTIVE:
                        state = BAD  # probability on a masked class
                z_y = ZERO
                if state == ACTIVE and not soft:
                    z_y = ws[U(zy_base + row)]
                t_y, go_v = R.row_weights(state, soft, weighted, keep, w, y, go, go_mode,
                                          go_scalar, row)
                lv, k_p, k_q, k_y = R.finish(state, m, se, z_y, t_y, big_q, qz, zl, inv_ce,
                                             inv_z, go_v)
                if chunk == 0 and tid == 0:
                    if total:
                        row_sum[0] += f64(lv)
                    else:
                        loss[U(row)] = lv
                if write_grad:
                    ys, yk = target_step(state, y)
                    lo = chunk * length
                    hi = min(n_steps, lo + length)
                    s = i32(lo + tid)
                    if state != ACTIVE:
                        for k in range(K):
                            sv[k] = ZERO
                        while s < hi:
                            AX.store(g, rs + s, sv)
                            s = i32(s + bd)
                    while state == ACTIVE and s < hi:
                        s_b = i32(s + bd)
                        AX.load(x, rs + s, sv)
                        if PAIR and s_b < hi:
                            AX.load(x, rs + s_b, sv_b)
                        grad_step(sv, tv, ev, qv, q, w, rs, s, m, k_p, k_q, k_y, ys, yk, dist,
                                  soft, weighted, keep, smooth, cap, inv_cap, capped, mask, mo,
                                  False, False)
                        AX.store(g, rs + s, sv)
                        if PAIR and s_b < hi:
                            grad_step(sv_b, tv, ev, qv, q, w, rs, s_b, m, k_p, k_q, k_y, ys, yk,
                                      dist, soft, weighted, keep, smooth, cap, inv_cap, capped,
                                      mask, mo, False, False)
                            AX.store(g, rs + s_b, sv_b)
                        s = i32(s_b + bd) if PAIR else s_b
            if total:
                GS.grid_total(row_sum[0] if tid == 0 else f64(0.0), part, ctr, 1, loss, buf_t,
                              flag)

        def ce_split_finish(x, g, q, tgt, w, go, loss, st, part, ctr, ws, n_rows, n_cls,
                            ignore_index, soft, weighted, write_grad, go_mode, use_st, total, eps,
                            zl, cap, go_scalar, inv_ce, inv_z, n_split, mask, m_stride, n_live):
            if cap > ZERO:  # decided once (see ce_block)
                finish_body(x, g, q, tgt, w, go, loss, st, part, ctr, ws, n_rows, n_cls,
                            ignore_index, soft, weighted, write_grad, go_mode, use_st, total, eps,
                            zl, cap, go_scalar, inv_ce, inv_z, n_split, mask, m_stride, n_live,
                            True)
            else:
                finish_body(x, g, q, tgt, w, go, loss, st, part, ctr, ws, n_rows, n_cls,
                            ignore_index, soft, weighted, write_grad, go_mode, use_st, total, eps,
                            zl, cap, go_scalar, inv_ce, inv_z, n_split, mask, m_stride, n_live,
                            False)
        return ce_split_finish if MASKED else _unmasked_finish(ce_split_finish)

    raise KeyError(strategy)


# ---- the unmasked kernels: a masked body inlined with stand-ins it never reads ---------------
# (MASKED is False in those bodies, so the stand-ins -- tgt as the mask, loss as n_live --
# only give the unused parameters a type.)

def _unmasked_main(body):
    run = device(body)

    def ce_main(x, g, q, tgt, w, go, loss, st, part, ctr, n_rows, n_cls, ignore_index, soft,
                weighted, write_grad, go_mode, use_st, total, eps, zl, cap, go_scalar, inv_ce,
                inv_z, unused):
        run(x, g, q, tgt, w, go, loss, st, part, ctr, n_rows, n_cls, ignore_index, soft,
            weighted, write_grad, go_mode, use_st, total, eps, zl, cap, go_scalar, inv_ce,
            inv_z, unused, tgt, types.int64(0), loss)
    return ce_main


def _unmasked_peel(body):
    run = device(body)

    def ce_main_peel(x_elem, x, g_elem, g, q, tgt, w, go, loss, st, part, ctr, n_rows, n_cls,
                     ignore_index, soft, weighted, write_grad, go_mode, use_st, total, eps, zl,
                     cap, go_scalar, inv_ce, inv_z, phase):
        run(x_elem, x, g_elem, g, q, tgt, w, go, loss, st, part, ctr, n_rows, n_cls,
            ignore_index, soft, weighted, write_grad, go_mode, use_st, total, eps, zl, cap,
            go_scalar, inv_ce, inv_z, phase, tgt, types.int64(0), loss)
    return ce_main_peel


def _unmasked_partial(body):
    run = device(body)

    def ce_partial(x, q, tgt, w, ws, n_rows, n_cls, ignore_index, soft, weighted, eps, cap,
                   n_split):
        run(x, q, tgt, w, ws, n_rows, n_cls, ignore_index, soft, weighted, eps, cap, n_split,
            tgt, types.int64(0), ws)
    return ce_partial


def _unmasked_finish(body):
    run = device(body)

    def ce_finish(x, g, q, tgt, w, go, loss, st, part, ctr, ws, n_rows, n_cls, ignore_index,
                  soft, weighted, write_grad, go_mode, use_st, total, eps, zl, cap, go_scalar,
                  inv_ce, inv_z, n_split):
        run(x, g, q, tgt, w, go, loss, st, part, ctr, ws, n_rows, n_cls, ignore_index, soft,
            weighted, write_grad, go_mode, use_st, total, eps, zl, cap, go_scalar, inv_ce,
            inv_z, n_split, tgt, types.int64(0), loss)
    return ce_finish


# ---- helpers around the main kernels ------------------------------------------------------

def stats_signature(acc_name):
    a = getattr(types, acc_name)
    i64 = types.int64
    return types.void(array(i64), array(a), array(types.float64), array(a), array(types.int32),
                      i64, i64, i64, i64)


@lru_cache(maxsize=None)
def target_stats_kernel(acc_name):
    """st = [1/sum of w_y, 1/count] over the kept rows with a valid target (0 where a sum is
    0: every row ignored gives a zero loss and gradient), in one launch: each block writes
    its share to part[2b], part[2b+1]; the last block adds them in block order."""
    RD = reductions(np.float64)
    GS = grid_sums()
    f64 = types.float64
    i64 = types.int64
    A = np.dtype(acc_name).type
    ZERO64, ONE64 = np.float64(0.0), np.float64(1.0)

    def ce_target_stats(tgt, w, part, st, ctr, n_rows, n_cls, ignore_index, weighted):
        buf = cuda.shared.array(32, f64)
        flag = cuda.shared.array(1, types.int32)
        tid = i64(cuda.threadIdx.x)
        bd = i64(cuda.blockDim.x)
        sw = ZERO64
        kept = ZERO64
        for i in range(i64(cuda.blockIdx.x) * bd + tid, n_rows, i64(cuda.gridDim.x) * bd):
            y = tgt[U(i)]
            if y != ignore_index and y >= 0 and y < n_cls:
                sw += f64(w[U(y)]) if weighted else ONE64
                kept += ONE64
        sw = RD.block_sum(sw, buf)
        kept = RD.block_sum(kept, buf)
        if tid == 0:
            part[U(2 * i64(cuda.blockIdx.x))] = sw
            part[U(2 * i64(cuda.blockIdx.x) + 1)] = kept
        if GS.last_block_done(ctr, 0, flag):
            sw = ZERO64
            kept = ZERO64
            for b in range(tid, i64(cuda.gridDim.x), bd):
                sw += part[U(2 * b)]
                kept += part[U(2 * b + 1)]
            sw = RD.block_sum(sw, buf)
            kept = RD.block_sum(kept, buf)
            if tid == 0:
                st[0] = A(0.0) if sw == ZERO64 else A(ONE64 / sw)
                st[1] = A(0.0) if kept == ZERO64 else A(ONE64 / kept)
    return ce_target_stats


def mask_live_signature(acc_name):
    i64 = types.int64
    return types.void(array(types.boolean), array(getattr(types, acc_name)), i64, i64)


@lru_cache(maxsize=None)
def mask_live_kernel(acc_name):
    """n_live[r] = the classes mask row r lets take part (a block per row): label smoothing
    spreads over them."""
    A = np.dtype(acc_name).type
    RD = reductions(A)
    acc = getattr(types, acc_name)
    i64 = types.int64
    ZERO, ONE = A(0.0), A(1.0)

    def ce_mask_live(mask, n_live, n_mrows, n_cls):
        buf = cuda.shared.array(32, acc)
        tid = i64(cuda.threadIdx.x)
        bd = i64(cuda.blockDim.x)
        for row in range(i64(cuda.blockIdx.x), n_mrows, i64(cuda.gridDim.x)):
            count = ZERO
            for c in range(tid, n_cls, bd):
                if mask[U(row * n_cls + c)]:
                    count += ONE
            count = RD.block_sum(count, buf)
            if tid == 0:
                n_live[U(row)] = count
    return ce_mask_live


def check_masked_targets_signature():
    i64 = types.int64
    return types.void(array(i64), array(types.boolean), array(i64), i64, i64, i64, i64)


@lru_cache(maxsize=None)
def check_masked_targets_kernel():
    """bad[0] = min(bad[0], first kept row whose (valid) target class is masked)."""
    i64 = types.int64

    def check_masked_targets(tgt, mask, bad, n_rows, n_cls, ignore_index, m_stride):
        for i in range(i64(cuda.grid(1)), n_rows, i64(cuda.gridsize(1))):
            y = tgt[U(i)]
            if y != ignore_index and y >= 0 and y < n_cls and not mask[U(i * m_stride + y)]:
                cuda.atomic.min(bad, 0, i)
    return check_masked_targets


def check_targets_signature():
    i64 = types.int64
    return types.void(array(i64), array(i64), i64, i64, i64)


@lru_cache(maxsize=None)
def check_targets_kernel():
    """bad[0] = min(bad[0], first row whose target is outside [0, C) and not ignore_index)."""
    i64 = types.int64

    def check_targets(tgt, bad, n_rows, n_cls, ignore_index):
        for i in range(i64(cuda.grid(1)), n_rows, i64(cuda.gridsize(1))):
            y = tgt[U(i)]
            if y != ignore_index and (y < 0 or y >= n_cls):
                cuda.atomic.min(bad, 0, i)
    return check_targets


_INT_TYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def _elem(name):
    return traits(name).storage if name in DTYPES else getattr(types, name)


def convert_signature(src, dst):
    return types.void(array(_elem(src)), array(_elem(dst)), types.int64)


@lru_cache(maxsize=None)
def convert_kernel(src, dst):
    """dst[i] = src[i] between float dtypes (through the accumulator) or integers -> int64."""
    if src in _INT_TYPES:
        i64 = types.int64

        def convert_int(a, out, n):
            for i in range(i64(cuda.grid(1)), n, i64(cuda.gridsize(1))):
                out[U(i)] = i64(a[U(i)])
        return convert_int
    i64 = types.int64
    load = traits(src).load
    store = traits(dst).store
    to_acc = traits(dst).acc

    def convert(a, out, n):
        for i in range(i64(cuda.grid(1)), n, i64(cuda.gridsize(1))):
            out[U(i)] = store(to_acc(load(a[U(i)])))
    return convert
