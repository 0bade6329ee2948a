"""CPU kernels over blocks of rows, one specialisation per storage dtype; serial and parallel
builds run the same compiled task code (see cpu_tasks).

Each row is read from memory once. Per row: the max (an integer max over order keys of
the raw words, which vectorises), then e = exp(z - max) written to an fp32/fp64 buffer
while summing, then the output from e. The e buffer is the output row itself when the
output has the accumulation dtype, else a per-block scratch, so exp runs once per element.

Short rows (C < SMALL_C) are handled a block at a time: shifted logits of the whole block
go to the e buffer and one flat loop takes exp over it, so the vector loop is not lost
to per-row remainders.

``make_kernels`` builds the set for one storage dtype from its load/store/exp/tanh
functions, so every dtype runs the same source.

Class masks (``masked=True``, a compile-time variant): every kernel takes ``mask`` (uint8
rows, nonzero = the class takes part) and ``mask_step`` (0: one (C,) row for all, 1: a row
per logits row); the unmasked build gets a stand-in it never reads. Masked classes are left
out of the max and the sums by selects (their logits are never used, whatever they hold),
get probability and gradient exactly 0 and log_softmax -inf, and label smoothing spreads
over the row's live classes. The host has already refused masked targets.
"""
import math
from functools import lru_cache

import numpy as np
from numba import njit

from . import cpu_math as cm
from .cpu_cache import cached
from .cpu_tasks import drivers

SMALL_C = 64          # below this, exp runs flat over a block of rows
BLOCK_ELEMS = 16384   # elements per block (one task): the e buffer stays in L2
SUM_CHUNK = 256       # a long row's sums: chunks summed in the accumulator dtype, then in fp64

_TRAITS = {
    # name: (load, store, exp, tanh, order key, key inverse, accumulate dtype)
    "float16": (cm.load_f16, cm.store_f16, cm.exp_nonpos_f32, cm.tanh_f32, cm.key_16,
                cm.unkey_16, np.float32),
    "bfloat16": (cm.load_bf16, cm.store_bf16, cm.exp_nonpos_f32, cm.tanh_f32, cm.key_16,
                 cm.unkey_16, np.float32),
    "float32": (cm.load_f32, cm.store_f32, cm.exp_nonpos_f32, cm.tanh_f32, cm.key_f32,
                cm.unkey_f32, np.float32),
    "float64": (cm.load_f64, cm.store_f64, cm.exp_nonpos_f64, cm.tanh_f64, cm.key_f64,
                cm.unkey_f64, np.float64),
}


def launch_shape(n_rows, n_cls, n_threads):
    """(rows per block, tasks): blocks of about BLOCK_ELEMS, a few tasks per thread."""
    per_block = max(1, BLOCK_ELEMS // max(n_cls, 1))
    n_blocks = (n_rows + per_block - 1) // per_block
    return per_block, max(1, min(n_blocks, 4 * n_threads))


def make_kernels(dtype_name, softcapped, target_dtype_name=None, parallel=True, masked=False):
    """Kernels for one storage dtype; ``softcapped`` compiles the s*tanh(x/s) transform in.
    Each takes the kernel's arguments, then ``mask, mask_step, per_block, n_tasks`` (see
    launch_shape).

    ``target_dtype_name`` is the storage dtype of soft targets (default: the logits'); they
    are read as given, never rounded to the logits' dtype. ``parallel=False`` runs the
    tasks one after another on the calling thread, for small calls: no thread-pool launch.
    Both builds run the same compiled task code (see cpu_tasks), so their rows agree to
    the bit, and both are cached on disk. ``masked`` builds the class-mask variant (see the
    module docstring).
    """
    return _kernel_table(dtype_name, bool(softcapped), target_dtype_name, bool(parallel),
                         bool(masked))


@lru_cache(maxsize=None)  # (built once: a dict a call cost a small call ~1 us)
def _kernel_table(dtype_name, softcapped, target_dtype_name, parallel, masked):
    pairs = _drivers(dtype_name, softcapped, target_dtype_name, masked)
    return {name: pair[parallel] for name, pair in pairs.items()}


def _variant(dtype_name, softcapped, target_dtype_name, masked):
    return (f"dtype={dtype_name} softcap={softcapped} target={target_dtype_name} "
            f"fastmath={sorted(cm.FASTMATH)}" + (" masked" if masked else ""))


@lru_cache(maxsize=None)
def _drivers(dtype_name, softcapped, target_dtype_name, masked):
    """{kernel name: (serial driver, parallel driver)}."""
    variant = _variant(dtype_name, softcapped, target_dtype_name, masked)
    return {name: drivers(fn, f"{variant}|{name}")
            for name, fn in tasks(dtype_name, softcapped, target_dtype_name, masked).items()}


def tasks(dtype_name, softcapped, target_dtype_name, masked=False):
    """{kernel name: its serial tasks function} (see _make_tasks)."""
    return _tasks(dtype_name, bool(softcapped), target_dtype_name, bool(masked))


@lru_cache(maxsize=None)  # one key per variant, however the caller spells the arguments
def _tasks(dtype_name, softcapped, target_dtype_name, masked):
    return _make_tasks(dtype_name, softcapped, target_dtype_name, masked,
                       _variant(dtype_name, softcapped, target_dtype_name, masked))


def _make_tasks(dtype_name, softcapped, target_dtype_name, masked, variant):
    """The kernels as serial functions of (args..., mask, mask_step, per_block, n_tasks, t0,
    t1) running tasks t0..t1 (a task: a contiguous share of the row blocks, see
    task_blocks)."""
    load, store, exp, tanh, key, unkey, acc = _TRAITS[dtype_name]
    load_q = _TRAITS[target_dtype_name or dtype_name][0]
    fm = cm.FASTMATH
    inner = njit(inline="always", fastmath=fm)
    outer = cached(njit(fastmath=fm), variant)  # on disk, across processes
    NEG_INF = acc(-np.inf)
    NEG_INF_RAW = _NEG_INF_RAW[dtype_name]  # -inf as stored: the masked classes' max key
    ZERO = acc(0.0)
    ONE = acc(1.0)
    # the output row can hold e only when it has the accumulation dtype and e is not
    # needed after the output is written (softcap needs z again for its chain factor)
    e_in_out = (dtype_name in ("float32", "float64")) and not softcapped

    @inner
    def logit(v, cap):
        z = load(v)
        if softcapped:
            z = cap * tanh(cm.div(z, cap))
        return z

    @inner
    def grad_factor(z, cap):
        if softcapped:
            t = cm.div(z, cap)
            return ONE - t * t
        return ONE

    @inner
    def is_live(mk, c):
        """Class c takes part (always, without a mask)."""
        return mk[c] != 0 if masked else True

    @inner
    def live_or_zero(v, mk, c):
        return v if is_live(mk, c) else ZERO

    @inner
    def chunk(v, c0, n_cls):
        """v[c0 : c0 + SUM_CHUNK], for a loop from 0: LLVM then knows the index is >= 0 (no
        negative-index wraparound) and loads contiguous vectors; a loop from c0 over v took
        AVX-512 gathers and scatters: softmax and CE 2.5-4x slower on a Zen 4."""
        return v[c0:min(n_cls, c0 + SUM_CHUNK)]

    @inner
    def chunk_mask(mk, c0, n_cls):
        return chunk(mk, c0, n_cls) if masked else mk

    @inner
    def row_max(x, cap, mk):
        """max z over the row's live classes (0 for an all -inf row); tanh is monotone, so max
        the raw words."""
        if masked:
            k = key(NEG_INF_RAW)
            for c in range(x.shape[0]):
                kc = key(x[c]) if mk[c] != 0 else k
                k = kc if kc > k else k
        else:
            k = key(x[0])
            for c in range(1, x.shape[0]):
                kc = key(x[c])
                k = kc if kc > k else k
        m = logit(unkey(k), cap)
        return ZERO if m == NEG_INF else m

    @inner
    def exp_row(x, e, m, cap, mk):
        """e = exp(z - m), returning its sum (rows of C >= SMALL_C): SUM_CHUNK values at a
        time in the accumulator dtype (one vector loop), the chunks' sums added in float64,
        so a long row's sum stays exact to a few ulp (one running float32 sum over 300k
        values drifted by 3e-5). Rows up to SUM_CHUNK get the bits of a single sum."""
        n_cls = x.shape[0]
        total = 0.0
        for c0 in range(0, n_cls, SUM_CHUNK):
            xc, ec, mc = chunk(x, c0, n_cls), chunk(e, c0, n_cls), chunk_mask(mk, c0, n_cls)
            s = ZERO
            for c in range(xc.shape[0]):
                v = live_or_zero(exp(logit(xc[c], cap) - m), mc, c)
                ec[c] = v
                s += v
            total += s
        return acc(total)

    @inner
    def mask_row(mask, mask_step, r):
        return mask[r * mask_step]

    @inner
    def block_stats(x, e, m, s, r0, r1, cap, mask, mask_step):
        """m[r], s[r] for rows r0..r1 of x; e[r - r0] = exp(z - m)."""
        n_cls = x.shape[1]
        if n_cls >= SMALL_C:
            for r in range(r0, r1):
                mk = mask_row(mask, mask_step, r)
                m[r - r0] = row_max(x[r], cap, mk)
                s[r - r0] = exp_row(x[r], e[r - r0], m[r - r0], cap, mk)
        else:
            for r in range(r0, r1):
                mk = mask_row(mask, mask_step, r)
                mr = row_max(x[r], cap, mk)
                m[r - r0] = mr
                xr = x[r]
                er = e[r - r0]
                for c in range(n_cls):
                    v = logit(xr[c], cap) - mr
                    er[c] = v if is_live(mk, c) else NEG_INF  # exp gives exactly 0
            flat = e[: r1 - r0].reshape(-1)
            for k in range(flat.shape[0]):  # one long vector loop over the block
                flat[k] = exp(flat[k])
            for r in range(r0, r1):
                er = e[r - r0]
                sr = ZERO
                for c in range(n_cls):
                    sr += er[c]
                s[r - r0] = sr

    @inner
    def new_scratch(per_block, n_cls):
        # one e buffer per task (a few tasks per thread): a fresh buffer per block would
        # cost a malloc (an mmap and page faults for long rows) every few rows
        return (np.empty((per_block, n_cls), dtype=acc), np.empty(per_block, dtype=acc),
                np.empty(per_block, dtype=acc))

    @inner
    def scratch_rows(scratch, r0, r1):
        return scratch[: r1 - r0]

    @inner
    def e_buffer(out, scratch, r0, r1):
        if e_in_out and out.shape[0] > 0:
            return out[r0:r1]
        return scratch_rows(scratch, r0, r1)

    @inner
    def task_blocks(t, n_tasks, n_rows, per_block):
        """Blocks of task t: n_tasks contiguous shares of the rows (a parallel build runs a
        task per prange step)."""
        n_blocks = (n_rows + per_block - 1) // per_block
        return range(t * n_blocks // n_tasks, (t + 1) * n_blocks // n_tasks)

    @inner
    def block_bounds(b, n_rows, per_block):
        r0 = b * per_block
        return r0, min(r0 + per_block, n_rows)

    @inner
    def log_of(s):
        return acc(math.log(s)) if s > ZERO else NEG_INF

    # ---- softmax / log_softmax / logsumexp -------------------------------------

    @outer
    def softmax(x, out, cap, mask, mask_step, per_block, n_tasks, t0, t1):
        n_rows, n_cls = x.shape
        for t in range(t0, t1):
            scratch, m, s = new_scratch(per_block, n_cls)
            for b in task_blocks(t, n_tasks, n_rows, per_block):
                r0, r1 = block_bounds(b, n_rows, per_block)
                e = e_buffer(out, scratch, r0, r1)
                block_stats(x, e, m, s, r0, r1, cap, mask, mask_step)
                for r in range(r0, r1):
                    inv = ONE / s[r - r0] if s[r - r0] > ZERO else ZERO
                    er = e[r - r0]
                    o = er if e_in_out else out[r]  # one name when e is the output row
                    for c in range(n_cls):
                        o[c] = store(er[c] * inv)

    @outer
    def log_softmax(x, out, cap, mask, mask_step, per_block, n_tasks, t0, t1):
        n_rows, n_cls = x.shape
        for t in range(t0, t1):
            scratch, m, s = new_scratch(per_block, n_cls)
            for b in task_blocks(t, n_tasks, n_rows, per_block):
                r0, r1 = block_bounds(b, n_rows, per_block)
                e = scratch_rows(scratch, r0, r1)
                block_stats(x, e, m, s, r0, r1, cap, mask, mask_step)
                for r in range(r0, r1):
                    lse = m[r - r0] + log_of(s[r - r0])
                    xr = x[r]
                    o = out[r]
                    mk = mask_row(mask, mask_step, r)
                    for c in range(n_cls):
                        v = logit(xr[c], cap) - lse
                        o[c] = store(v if is_live(mk, c) else NEG_INF)

    @outer
    def logsumexp(x, out, cap, mask, mask_step, per_block, n_tasks, t0, t1):
        n_rows, n_cls = x.shape
        for t in range(t0, t1):
            scratch, m, s = new_scratch(per_block, n_cls)
            for b in task_blocks(t, n_tasks, n_rows, per_block):
                r0, r1 = block_bounds(b, n_rows, per_block)
                e = scratch_rows(scratch, r0, r1)
                block_stats(x, e, m, s, r0, r1, cap, mask, mask_step)
                out_rows = out[r0:r1]
                for i in range(out_rows.shape[0]):  # (from 0: see chunk)
                    out_rows[i] = m[i] + log_of(s[i])

    # ---- cross entropy ---------------------------------------------------------
    # Row loss (hard target y, smoothing eps, weights w, W = sum w):
    #   (1-eps) w_y (lse - z_y) + (eps/C)(W lse - sum_c w_c z_c) + zl lse^2
    # Gradient wrt z: a_ce [K p_c - (eps/C) w_c - (1-eps) w_y [c==y]] + a_z 2 zl lse p_c,
    #   K = (1-eps) w_y + (eps/C) W; chained through softcap by (1 - (z/cap)^2).

    @inner
    def z_part(zl, lse):
        """zl * lse^2, and 0 when z-loss is off (an all -inf row has lse = -inf)."""
        return zl * lse * lse if zl > ZERO else ZERO

    @inner
    def zero_row(g):
        for c in range(g.shape[0]):
            g[c] = store(ZERO)

    @inner
    def live_stats(w, w_sum, mk, n_cls):
        """(live classes, their weight sum): what label smoothing spreads over."""
        if not masked:
            return acc(n_cls), w_sum
        n_live = ZERO
        w_live = ZERO
        for c in range(n_cls):
            on = mk[c] != 0
            n_live += ONE if on else ZERO
            w_live += w[c] if on else ZERO
        return n_live, w_live

    @inner
    def ce_hard_row(x, e, g, m, s, y, w, w_sum, a_ce, a_z, eps, zl, cap, write_grad, mk):
        """(CE part, lse) of one kept row; writes its gradient row from e."""
        n_cls = x.shape[0]
        if s == ZERO:  # every logit is -inf: the loss is +inf, nothing can move it
            if write_grad:
                zero_row(g)
            return acc(np.inf), NEG_INF
        log_s = acc(math.log(s))
        lse = m + log_s
        w_y = w[y]
        z_y = logit(x[y], cap)
        # (m - z) + log s, not lse - z: exact for large logits, and a sum of terms >= 0
        t_y = (ONE - eps) * w_y  # a zero weight (or eps = 1) times a -inf target logit is 0
        loss = ZERO if t_y == ZERO else t_y * cm.gap_plus(m, z_y, log_s)
        smooth = ZERO
        if eps > ZERO:
            n_live, w_sum = live_stats(w, w_sum, mk, n_cls)
            smooth = eps / n_live
            gap = 0.0  # in chunks, as exp_row's sum
            for c0 in range(0, n_cls, SUM_CHUNK):
                xc, wc_, mc = chunk(x, c0, n_cls), chunk(w, c0, n_cls), chunk_mask(mk, c0, n_cls)
                part = ZERO
                for c in range(xc.shape[0]):
                    wc = live_or_zero(wc_[c], mc, c)
                    part += ZERO if wc == ZERO else wc * (m - logit(xc[c], cap))  # 0 * inf: 0
                gap += part
            loss += smooth * (acc(gap) + w_sum * log_s)
        if write_grad:
            k_p = (a_ce * ((ONE - eps) * w_y + smooth * w_sum) + a_z * acc(2.0) * zl * lse) / s
            k_w = a_ce * smooth
            e_y = e[y]
            if softcapped:
                for c in range(n_cls):
                    v = (k_p * e[c] - k_w * w[c]) * grad_factor(logit(x[c], cap), cap)
                    g[c] = store(live_or_zero(v, mk, c))
            elif eps > ZERO:
                for c in range(n_cls):
                    g[c] = store(live_or_zero(k_p * e[c] - k_w * w[c], mk, c))
            else:
                for c in range(n_cls):
                    g[c] = store(k_p * e[c])  # (e is exactly 0 on masked classes)
            # target element from fp32 values, rounded once (p - 1 before bf16/fp16)
            g[y] = store((k_p * e_y - k_w * w_y - a_ce * (ONE - eps) * w_y) * grad_factor(z_y, cap))
        return loss, lse

    def make_ce_hard_block(grad_in_e):
        # grad_in_e: the gradient rows are the e rows; passing one name keeps loops vectorised
        @inner
        def ce_hard_block(x, g, e, m, s, r0, r1, tgt, w, w_sum, go, go_step, inv_ce, inv_z, eps, zl,
                          cap, ignore_index, loss_out, write_grad, mask, mask_step):
            block_stats(x, e, m, s, r0, r1, cap, mask, mask_step)
            for r in range(r0, r1):
                gr = e[r - r0] if grad_in_e else g[r]
                y = tgt[r]
                if y == ignore_index:
                    loss_out[r] = ZERO
                    if write_grad:
                        zero_row(gr)
                    continue
                scale = go[r * go_step]
                ce, lse = ce_hard_row(x[r], e[r - r0], gr, m[r - r0], s[r - r0], y, w, w_sum,
                                      scale * inv_ce, scale * inv_z, eps, zl, cap, write_grad,
                                      mask_row(mask, mask_step, r))
                loss_out[r] = ce * inv_ce + z_part(zl, lse) * inv_z
        return ce_hard_block

    ce_hard_block = make_ce_hard_block(e_in_out)
    ce_hard_block_inplace = make_ce_hard_block(False)

    @outer
    def ce_hard(x, g, tgt, w, w_sum, go, go_step, inv_ce, inv_z, eps, zl, cap, ignore_index,
                loss_out, write_grad, mask, mask_step, per_block, n_tasks, t0, t1):
        n_rows, n_cls = x.shape
        for t in range(t0, t1):
            scratch, m, s = new_scratch(per_block, n_cls)
            for b in task_blocks(t, n_tasks, n_rows, per_block):
                r0, r1 = block_bounds(b, n_rows, per_block)
                e = e_buffer(g, scratch, r0, r1) if write_grad else scratch_rows(scratch, r0, r1)
                ce_hard_block(x, g, e, m, s, r0, r1, tgt, w, w_sum, go, go_step, inv_ce, inv_z, eps, zl,
                              cap, ignore_index, loss_out, write_grad, mask, mask_step)

    @outer
    def ce_hard_inplace(x, tgt, w, w_sum, go, go_step, inv_ce, inv_z, eps, zl, cap,
                        ignore_index, loss_out, mask, mask_step, per_block, n_tasks, t0, t1):
        # x is read through the same name it is written through, so loops stay vectorised;
        # z_y and the smoothing sum are read before the row is overwritten.
        n_rows, n_cls = x.shape
        for t in range(t0, t1):
            scratch, m, s = new_scratch(per_block, n_cls)
            for b in task_blocks(t, n_tasks, n_rows, per_block):
                r0, r1 = block_bounds(b, n_rows, per_block)
                e = scratch_rows(scratch, r0, r1)
                ce_hard_block_inplace(x, x, e, m, s, r0, r1, tgt, w, w_sum, go, go_step, inv_ce, inv_z, eps, zl,
                              cap, ignore_index, loss_out, True, mask, mask_step)

    # Soft targets q (read in their own dtype), q' = (1-eps) q + eps/C:
    #   loss = sum_c w_c q'_c (lse - z_c), Q = sum_c w_c q'_c;  grad = Q p_c - w_c q'_c.

    @inner
    def ce_soft_row(x, e, q, g, m, s, w, a, eps, zl, cap, write_grad, mk):
        n_cls = x.shape[0]
        smooth = ZERO
        if eps > ZERO:
            smooth = eps / live_stats(w, ZERO, mk, n_cls)[0]
        keep = ONE - eps
        big_q64 = 0.0  # both sums in chunks, as exp_row's
        gap64 = 0.0  # sum_c w_c q'_c (m - z_c): terms >= 0, so the loss never goes below 0
        for c0 in range(0, n_cls, SUM_CHUNK):
            q_part = ZERO
            gap_part = ZERO
            xc, qc, wc, mc = (chunk(x, c0, n_cls), chunk(q, c0, n_cls), chunk(w, c0, n_cls),
                              chunk_mask(mk, c0, n_cls))
            for c in range(xc.shape[0]):
                wq = live_or_zero(wc[c] * (keep * load_q(qc[c]) + smooth), mc, c)
                q_part += wq
                gap_part += ZERO if wq == ZERO else wq * (m - logit(xc[c], cap))  # 0 * inf: 0
            big_q64 += q_part
            gap64 += gap_part
        big_q = acc(big_q64)
        gap = acc(gap64)
        if s == ZERO:
            if write_grad:
                zero_row(g)
            return acc(np.inf), NEG_INF
        lse = m + acc(math.log(s))
        if write_grad:
            k_p = (a * big_q + a * acc(2.0) * zl * lse) / s
            for c in range(n_cls):
                wq = w[c] * (keep * load_q(q[c]) + smooth)
                v = (k_p * e[c] - a * wq) * grad_factor(logit(x[c], cap), cap)
                g[c] = store(live_or_zero(v, mk, c))
        return gap + big_q * acc(math.log(s)), lse

    def make_ce_soft_block(grad_in_e):
        @inner
        def ce_soft_block(x, g, e, m, s, q, r0, r1, w, go, go_step, inv_den, eps, zl, cap, loss_out,
                          write_grad, mask, mask_step):
            block_stats(x, e, m, s, r0, r1, cap, mask, mask_step)
            for r in range(r0, r1):
                gr = e[r - r0] if grad_in_e else g[r]
                a = go[r * go_step] * inv_den
                ce, lse = ce_soft_row(x[r], e[r - r0], q[r], gr, m[r - r0], s[r - r0], w, a,
                                      eps, zl, cap, write_grad, mask_row(mask, mask_step, r))
                loss_out[r] = (ce + z_part(zl, lse)) * inv_den
        return ce_soft_block

    ce_soft_block = make_ce_soft_block(e_in_out)
    ce_soft_block_inplace = make_ce_soft_block(False)

    @outer
    def ce_soft(x, g, q, w, go, go_step, inv_den, eps, zl, cap, loss_out, write_grad, mask,
                mask_step, per_block, n_tasks, t0, t1):
        n_rows, n_cls = x.shape
        for t in range(t0, t1):
            scratch, m, s = new_scratch(per_block, n_cls)
            for b in task_blocks(t, n_tasks, n_rows, per_block):
                r0, r1 = block_bounds(b, n_rows, per_block)
                e = e_buffer(g, scratch, r0, r1) if write_grad else scratch_rows(scratch, r0, r1)
                ce_soft_block(x, g, e, m, s, q, r0, r1, w, go, go_step, inv_den, eps, zl, cap, loss_out,
                              write_grad, mask, mask_step)

    @outer
    def ce_soft_inplace(x, q, w, go, go_step, inv_den, eps, zl, cap, loss_out, mask, mask_step,
                        per_block, n_tasks, t0, t1):
        n_rows, n_cls = x.shape
        for t in range(t0, t1):
            scratch, m, s = new_scratch(per_block, n_cls)
            for b in task_blocks(t, n_tasks, n_rows, per_block):
                r0, r1 = block_bounds(b, n_rows, per_block)
                e = scratch_rows(scratch, r0, r1)
                ce_soft_block_inplace(x, x, e, m, s, q, r0, r1, w, go, go_step, inv_den, eps, zl, cap, loss_out,
                              True, mask, mask_step)

    # ---- accumulation (chunked linear CE: a half-precision partial into an fp32 sum) ----

    @outer
    def add_into(x, total, mask, mask_step, per_block, n_tasks, t0, t1):
        """total += x, each element widened to the accumulation dtype on the fly (no mask:
        the stand-in is never read)."""
        n_rows, n_cls = x.shape
        for t in range(t0, t1):
            for b in task_blocks(t, n_tasks, n_rows, per_block):
                r0, r1 = block_bounds(b, n_rows, per_block)
                for r in range(r0, r1):
                    xr = x[r]
                    tr = total[r]
                    for c in range(n_cls):
                        tr[c] += load(xr[c])

    return {
        "softmax": softmax, "log_softmax": log_softmax, "logsumexp": logsumexp,
        "ce_hard": ce_hard, "ce_hard_inplace": ce_hard_inplace,
        "ce_soft": ce_soft, "ce_soft_inplace": ce_soft_inplace, "add_into": add_into,
    }


# -inf as each dtype's storage word (the row max's starting key in the masked variant)
_NEG_INF_RAW = {"float16": np.uint16(0xFC00), "bfloat16": np.uint16(0xFF80),
                "float32": np.float32(-np.inf), "float64": np.float64(-np.inf)}


@njit(cache=True)
def hard_target_stats(tgt, w, n_cls, ignore_index):
    """(sum of w[y] over kept rows, kept row count, first bad row or -1)."""
    w_sum = 0.0
    kept = 0
    for i in range(tgt.shape[0]):
        y = tgt[i]
        if y == ignore_index:
            continue
        if y < 0 or y >= n_cls:
            return w_sum, kept, i
        w_sum += w[y]
        kept += 1
    return w_sum, kept, -1
