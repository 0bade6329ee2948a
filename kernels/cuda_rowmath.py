"""Per-row and per-element math shared by every CUDA strategy (the same formulas as cpu.py).

Row loss (hard target y, smoothing e, weights w, kept row), with lse = log sum exp z:
    (1-e) w_y (lse - z_y) + sum_c w_c (e/C) (lse - z_c)            [+ zl lse^2]
Soft targets q replace the second term's (e/C) by (1-e) q_c + e/C and drop the first.
Both are ``t_y (lse - z_y) + Q (lse - m) - qz`` with Q = sum_c wq_c, qz = sum_c wq_c (z_c - m)
(m the row max: large logits cancel exactly) and wq_c = w_c ((1-e) q_c + e/C); t_y =
(1-e) w_y for a hard target, 0 for soft targets.
Gradient wrt z: a_ce (K p_c - wq_c - t_y [c == y]) + a_z 2 zl lse p_c with K = t_y + Q,
chained through the softcap z = cap tanh(x / cap) by 1 - tanh^2. ``finish`` turns the row's
(max, sum, Q, qz, z_y) into the loss and the coefficients of ``grad`` = (k_p e_c - coef_c) gf_c, where
e_c = exp(z_c - m), coef_c = k_q wq_c + k_y [c == y].

Row states: IDLE (ignored, or past the last row) gives loss 0 and a zero gradient; a bad
target gives a NaN loss and a zero gradient; an all -inf row gives +inf and a zero gradient.
"""
import math
from functools import lru_cache

import numpy as np
from numba import types

from .cuda_dtypes import device, namespace, traits
from .cuda_tanh import tanh_f32

IDLE, ACTIVE, BAD = np.int32(0), np.int32(1), np.int32(2)  # (32-bit compares per row)
U = types.uint64  # unsigned indices: no negative-index wraparound code


@lru_cache(maxsize=None)
def rowmath(dt, qdt=None):
    """Device functions for logits stored as ``dt`` and soft targets stored as ``qdt``
    (default: the same dtype)."""
    T = traits(dt)
    qload = traits(qdt or dt).load
    A = T.acc_np
    acc = T.acc
    load = T.load
    store = T.store
    NEG_INF, ZERO, ONE, TWO = A(-np.inf), A(0.0), A(1.0), A(2.0)
    INF, NAN = A(np.inf), A(np.nan)

    if A is np.float32:
        tanh = tanh_f32  # no libdevice, no division: the softcap's cap tanh(x (1/cap))
    else:
        @device
        def tanh(u):
            return math.tanh(u)

    @device
    def online(m, s, z):
        """Add one logit to an online (max, sum exp) state; -inf adds nothing, NaN spreads."""
        if z > m:
            s = s * math.exp(m - z) + ONE
            m = z
        elif z != NEG_INF:
            s += math.exp(z - m)
        return m, s

    @device
    def step_max(m, vals, n):
        """The larger of m and the n values (max.f32: a NaN is passed over, as by z > m)."""
        for k in range(n):
            m = max(m, vals[k])
        return m

    @device
    def online_vals(m, s, vals, n):
        """Add n values (one loaded step) to an online (max, sum exp) state: one rescale a
        step and one exp a value, no test or branch a value. The sum is kept relative to
        finite_max(m), so -inf values add 0 (and a row of them keeps m = -inf, s = 0), a NaN
        spreads, and a +inf gives NaN, as a two-pass softmax does (tests/reference.py)."""
        m_new = step_max(m, vals, n)
        shift = finite_max(m_new)
        s = s * math.exp(m - shift)  # (x 1 exactly while the max holds; 0 from m = -inf)
        for k in range(n):
            s += math.exp(vals[k] - shift)
        return m_new, s

    @device
    def dist_term(wq, z, m):
        """wq (z - m): one class's share of qz, kept relative to the row max so that large
        logits (1e4) cancel exactly; a weighted -inf logit makes it -inf (+inf loss)."""
        if wq == ZERO:
            return ZERO
        if z == NEG_INF:
            return NEG_INF
        return wq * (z - m)

    @device
    def rebase(qz, big_q, m_old, m_new):
        """qz = sum wq (z - m_old) re-expressed relative to m_new >= m_old."""
        if big_q == ZERO or m_new == m_old:
            return qz
        return qz - big_q * (m_new - m_old)

    @device
    def finite_max(m):
        """The shift used in exp(z - m): 0 for an all -inf row, so no -inf - -inf."""
        return ZERO if m == NEG_INF else m

    @device
    def weight_of(qc, w, c, weighted, keep, smooth):
        """wq_c = w_c ((1-e) q_c + e/C), q_c already loaded (0 for hard targets)."""
        wc = w[U(c)] if weighted else ONE
        return wc * (keep * qc + smooth)

    @device
    def class_weight(q, w, off, c, soft, weighted, keep, smooth):
        """wq_c read from the soft targets q at row offset ``off``."""
        qc = qload(q[U(off + c)]) if soft else ZERO
        return weight_of(qc, w, c, weighted, keep, smooth)

    @device
    def hard_target(tgt, row, live, n_cls, ignore_index):
        """(state, y) of a hard-target row; y is only a safe index when state == ACTIVE."""
        if not live:
            return IDLE, -1
        y = tgt[U(row)]
        if y == ignore_index:
            return IDLE, -1
        if y < 0 or y >= n_cls:
            return BAD, -1
        return ACTIVE, y

    @device
    def grad_scale(go, go_mode, go_scalar, row):
        """grad_output for this row: a number (mode 0), one per row (1) or a 0-d array (2)."""
        if go_mode == 1:
            return acc(go[U(row)])
        if go_mode == 2:
            return acc(go[0])
        return go_scalar

    @device
    def row_weights(state, soft, weighted, keep, w, y, go, go_mode, go_scalar, row):
        """(t_y, grad_output) of a row for ``finish``: the target's weight (1-eps) w[y]
        (0 for soft targets) and the row's grad_output; neutral unless the row is active."""
        if state != ACTIVE:
            return ZERO, ONE
        t_y = ZERO if soft else keep * (w[U(y)] if weighted else ONE)
        return t_y, grad_scale(go, go_mode, go_scalar, row)

    @device
    def divisors(st, use_st, inv_ce, inv_z):
        """The mean's 1/divisors: computed on the device (st) or passed by the host."""
        if use_st:
            return st[0], st[1]
        return inv_ce, inv_z

    @device
    def finish(state, m, s, z_y, t_y, big_q, qz, zl, inv_ce, inv_z, go):
        """(loss, k_p, k_q, k_y) of one row; m must be finite_max'd, s = sum exp(z - m), qz
        relative to m. lse - z is formed as (m - z) + log s: exact for large logits."""
        if state != ACTIVE:
            return (NAN if state == BAD else ZERO), ZERO, ZERO, ZERO
        if s == ZERO:  # every logit is -inf: nothing can lower the loss
            return INF * inv_ce, ZERO, ZERO, ZERO
        log_s = math.log(s)
        lse = m + log_s
        ce = big_q * log_s - qz
        if t_y != ZERO:
            ce += t_y * ((m - z_y) + log_s)
        loss = ce * inv_ce
        if zl > ZERO:
            loss += zl * lse * lse * inv_z
        a_ce = go * inv_ce
        k_p = (a_ce * (t_y + big_q) + go * inv_z * TWO * zl * lse) / s
        return loss, k_p, a_ce, a_ce * t_y

    @device
    def grad_value(e, k_p, coef, gf):
        """One gradient element in the accumulator type; the target's -1 is in coef, so
        it is applied before the single rounding to the storage dtype."""
        return (k_p * e - coef) * gf

    @device
    def grad(e, k_p, coef, gf):
        return store(grad_value(e, k_p, coef, gf))

    @device
    def coef_of(c, y, k_q, k_y, dist, wq):
        r = ZERO
        if dist:
            r = k_q * wq
        if c == y:
            r += k_y
        return r

    @device
    def coef(c, y, k_q, k_y, dist, q, w, off, soft, weighted, keep, smooth):
        wq = ZERO
        if dist:
            wq = class_weight(q, w, off, c, soft, weighted, keep, smooth)
        return coef_of(c, y, k_q, k_y, dist, wq)

    # ---- class masks (the masked kernel variants; mask[i] False: class left out) ----

    @device
    def keep_live(v, mask, i, fill):
        """v when mask element i is set, else ``fill`` (-inf before the sums: exp gives 0
        and the max ignores it; 0 or -inf for the outputs)."""
        return v if mask[U(i)] else fill

    @device
    def mask_out(vals, mask, first, n, fill):
        """keep_live over the n values of one step, mask elements first..first+n-1."""
        for k in range(n):
            if not mask[U(first + k)]:
                vals[k] = fill

    @device
    def masked_target(state, y, mask, mo):
        """A kept row whose target class is masked is a bad target: NaN loss, zero grad."""
        if state == ACTIVE and y >= 0 and not mask[U(mo + y)]:  # (soft targets: y = -1)
            return BAD, y
        return state, y

    @device
    def live_smooth(eps, n_live, row, m_stride):
        """eps spread over the row's live classes (n_live: their counts, one per mask row)."""
        if eps > ZERO:
            n = n_live[U(row if m_stride != 0 else 0)]
            if n > ZERO:  # (a row with every class masked has nothing to smooth over)
                return eps / n
        return ZERO

    @device
    def drop(wq, qc, on):
        """A class's wq when the mask may leave it out: 0, or NaN when a soft target puts
        probability on it (the row then counts as a bad target)."""
        if on:
            return wq
        return NAN if qc != ZERO else ZERO

    return namespace(T=T, tanh=tanh, keep_live=keep_live, mask_out=mask_out,
                     masked_target=masked_target, live_smooth=live_smooth, drop=drop, weight_of=weight_of, grad_value=grad_value,
                     coef_of=coef_of, online=online, step_max=step_max, online_vals=online_vals,
                           dist_term=dist_term, rebase=rebase, finite_max=finite_max, class_weight=class_weight,
                           hard_target=hard_target, grad_scale=grad_scale, row_weights=row_weights,
                           divisors=divisors,
                           finish=finish, grad=grad, coef=coef, store=store, load=load,
                           NEG_INF=NEG_INF, ZERO=ZERO, ONE=ONE, NAN=NAN)
