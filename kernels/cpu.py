"""CPU kernels: @njit(parallel=True) over rows, one specialisation per storage dtype.

Each row is read from memory once: pass 1 finds the max, pass 2 sums exp (the row is
now in cache), pass 3 writes the output. ``make_kernels`` builds the set for one
storage dtype from its load/store/exp/tanh functions, so every dtype runs the same
source. Rows are independent; for short rows ``ROWS_PER_TASK`` rows share one task so
the per-row loop overhead is amortised.
"""
import math
from functools import lru_cache

import numpy as np
from numba import njit, prange

from . import cpu_math as cm

_TRAITS = {
    # name: (load, store, exp, tanh, accumulate dtype)
    "float16": (cm.load_f16, cm.store_f16, cm.exp_nonpos_f32, cm.tanh_f32, np.float32),
    "bfloat16": (cm.load_bf16, cm.store_bf16, cm.exp_nonpos_f32, cm.tanh_f32, np.float32),
    "float32": (cm.load_f32, cm.store_f32, cm.exp_nonpos_f32, cm.tanh_f32, np.float32),
    "float64": (cm.load_f64, cm.store_f64, cm.exp_nonpos_f64, cm.tanh_f64, np.float64),
}


@lru_cache(maxsize=None)
def make_kernels(dtype_name, softcapped):
    """Kernels for one storage dtype; ``softcapped`` compiles the s*tanh(x/s) transform in."""
    load, store, exp, tanh, acc = _TRAITS[dtype_name]
    fm = cm.FASTMATH
    inner = njit(inline="always", fastmath=fm)
    outer = njit(parallel=True, fastmath=fm)
    NEG_INF = acc(-np.inf)
    ZERO = acc(0.0)
    ONE = acc(1.0)

    @inner
    def logit(v, cap):
        z = load(v)
        if softcapped:
            z = cap * tanh(z / cap)
        return z

    @inner
    def row_stats(x, cap):
        """(max, sum exp(z - max)) of one row; an all -inf row gives (0, 0)."""
        m = NEG_INF
        for c in range(x.shape[0]):
            z = logit(x[c], cap)
            m = z if z > m else m
        if m == NEG_INF:
            m = ZERO
        s = ZERO
        for c in range(x.shape[0]):
            s += exp(logit(x[c], cap) - m)
        return m, s

    @inner
    def log_of(s):
        return acc(math.log(s)) if s > ZERO else NEG_INF

    # ---- softmax / log_softmax / logsumexp -------------------------------------

    @inner
    def softmax_row(x, out, cap):
        m, s = row_stats(x, cap)
        inv = ONE / s if s > ZERO else ZERO
        for c in range(x.shape[0]):
            out[c] = store(exp(logit(x[c], cap) - m) * inv)

    @inner
    def log_softmax_row(x, out, cap):
        m, s = row_stats(x, cap)
        lse = m + log_of(s)
        for c in range(x.shape[0]):
            out[c] = store(logit(x[c], cap) - lse)

    @outer
    def softmax(x, out, cap):
        for i in prange(x.shape[0]):
            softmax_row(x[i], out[i], cap)

    @outer
    def softmax_inplace(x, cap):
        for i in prange(x.shape[0]):
            softmax_row(x[i], x[i], cap)

    @outer
    def log_softmax(x, out, cap):
        for i in prange(x.shape[0]):
            log_softmax_row(x[i], out[i], cap)

    @outer
    def log_softmax_inplace(x, cap):
        for i in prange(x.shape[0]):
            log_softmax_row(x[i], x[i], cap)

    @outer
    def logsumexp(x, out, cap):
        for i in prange(x.shape[0]):
            m, s = row_stats(x[i], cap)
            out[i] = m + log_of(s)

    # ---- cross entropy ---------------------------------------------------------
    # Row loss (hard target y, smoothing e, weights w, W = sum w):
    #   (1-e) w_y (lse - z_y) + (e/C)(W lse - sum_c w_c z_c) + zl lse^2
    # Gradient wrt z: a_ce [K p_c - (e/C) w_c - (1-e) w_y [c==y]] + a_z 2 zl lse p_c,
    #   K = (1-e) w_y + (e/C) W; chained through softcap by (1 - (z/cap)^2).

    @inner
    def grad_factor(z, cap):
        if softcapped:
            t = z / cap
            return ONE - t * t
        return ONE

    @inner
    def ce_hard_row(x, g, y, w, w_sum, a_ce, a_z, eps, zl, cap, write_grad):
        n_cls = x.shape[0]
        m, s = row_stats(x, cap)
        if s == ZERO:  # every logit is -inf: the loss is +inf, nothing can move it
            if write_grad:
                for c in range(n_cls):
                    g[c] = store(ZERO)
            return acc(np.inf), NEG_INF
        lse = m + acc(math.log(s))
        w_y = w[y]
        z_y = logit(x[y], cap)
        loss = (ONE - eps) * w_y * (lse - z_y)
        smooth = eps / acc(n_cls)
        if eps > ZERO:
            wz = ZERO
            for c in range(n_cls):
                wz += w[c] * logit(x[c], cap)
            loss += smooth * (w_sum * lse - wz)
        if write_grad:
            k_p = (a_ce * ((ONE - eps) * w_y + smooth * w_sum) + a_z * acc(2.0) * zl * lse) / s
            k_w = a_ce * smooth
            if eps > ZERO:
                for c in range(n_cls):
                    z = logit(x[c], cap)
                    g[c] = store((k_p * exp(z - m) - k_w * w[c]) * grad_factor(z, cap))
            else:
                for c in range(n_cls):
                    z = logit(x[c], cap)
                    g[c] = store(k_p * exp(z - m) * grad_factor(z, cap))
            # target element from fp32 values, rounded once (p - 1 before bf16/fp16)
            g[y] = store((k_p * exp(z_y - m) - k_w * w_y - a_ce * (ONE - eps) * w_y)
                         * grad_factor(z_y, cap))
        return loss, lse

    @inner
    def ce_hard_rows(x, g, tgt, w, w_sum, go, go_step, inv_den_ce, inv_den_z, eps, zl, cap,
                     ignore_index, loss_out, write_grad, i):
        y = tgt[i]
        if y == ignore_index:
            loss_out[i] = ZERO
            if write_grad:
                for c in range(x.shape[1]):
                    g[i, c] = store(ZERO)
            return
        scale = go[i * go_step]
        ce, lse = ce_hard_row(x[i], g[i], y, w, w_sum, scale * inv_den_ce,
                              scale * inv_den_z, eps, zl, cap, write_grad)
        loss_out[i] = ce * inv_den_ce + zl * lse * lse * inv_den_z

    @outer
    def ce_hard(x, g, tgt, w, w_sum, go, go_step, inv_den_ce, inv_den_z, eps, zl, cap,
                ignore_index, loss_out, write_grad):
        for i in prange(x.shape[0]):
            ce_hard_rows(x, g, tgt, w, w_sum, go, go_step, inv_den_ce, inv_den_z, eps, zl, cap,
                         ignore_index, loss_out, write_grad, i)

    @outer
    def ce_hard_inplace(x, tgt, w, w_sum, go, go_step, inv_den_ce, inv_den_z, eps, zl, cap,
                        ignore_index, loss_out):
        for i in prange(x.shape[0]):
            ce_hard_rows(x, x, tgt, w, w_sum, go, go_step, inv_den_ce, inv_den_z, eps, zl, cap,
                         ignore_index, loss_out, True, i)

    # Soft targets q (already in the logits' storage dtype), q' = (1-e) q + e/C:
    #   loss = Q lse - sum_c w_c q'_c z_c with Q = sum_c w_c q'_c;  grad = Q p_c - w_c q'_c.

    @inner
    def ce_soft_row(x, q, g, w, a_ce, a_z, eps, zl, cap, write_grad):
        n_cls = x.shape[0]
        m, s = row_stats(x, cap)
        smooth = eps / acc(n_cls)
        keep = ONE - eps
        big_q = ZERO
        qz = ZERO
        for c in range(n_cls):
            wq = w[c] * (keep * load(q[c]) + smooth)
            big_q += wq
            qz += ZERO if wq == ZERO else wq * logit(x[c], cap)  # 0 * -inf is 0 here
        if s == ZERO:
            if write_grad:
                for c in range(n_cls):
                    g[c] = store(ZERO)
            return acc(np.inf), NEG_INF
        lse = m + acc(math.log(s))
        if write_grad:
            k_p = (a_ce * big_q + a_z * acc(2.0) * zl * lse) / s
            for c in range(n_cls):
                z = logit(x[c], cap)
                wq = w[c] * (keep * load(q[c]) + smooth)
                g[c] = store((k_p * exp(z - m) - a_ce * wq) * grad_factor(z, cap))
        return big_q * lse - qz, lse

    @outer
    def ce_soft(x, g, q, w, go, go_step, inv_den, eps, zl, cap, loss_out, write_grad):
        for i in prange(x.shape[0]):
            a = go[i * go_step] * inv_den
            ce, lse = ce_soft_row(x[i], q[i], g[i], w, a, a, eps, zl, cap, write_grad)
            loss_out[i] = (ce + zl * lse * lse) * inv_den

    @outer
    def ce_soft_inplace(x, q, w, go, go_step, inv_den, eps, zl, cap, loss_out):
        for i in prange(x.shape[0]):
            a = go[i * go_step] * inv_den
            ce, lse = ce_soft_row(x[i], q[i], x[i], w, a, a, eps, zl, cap, True)
            loss_out[i] = (ce + zl * lse * lse) * inv_den

    return {
        "softmax": softmax, "softmax_inplace": softmax_inplace,
        "log_softmax": log_softmax, "log_softmax_inplace": log_softmax_inplace,
        "logsumexp": logsumexp,
        "ce_hard": ce_hard, "ce_hard_inplace": ce_hard_inplace,
        "ce_soft": ce_soft, "ce_soft_inplace": ce_soft_inplace,
    }


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
