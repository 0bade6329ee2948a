"""Vocab-parallel cross-entropy, the arithmetic without communication (torch tensors).

Each rank holds the classes [vocab_start, vocab_start + V_local) of every row. It reduces its
capped logits z to a few numbers per row (``local_stats``); one all-gather brings every
rank's rows of stats to every rank; ``combine`` merges them in rank order, so every rank
computes bitwise the same loss; ``local_grad`` then gives this rank's slice of the gradient
from the merged per-row values, with no further communication.

Per row, with q'_c the coefficient of -log p_c (hard target y, smoothing ε, weights w,
global class count V):  ce = (1-ε)·(A·lse - B) + (ε/V)·(W·lse - D), where
A = Σ w q (hard: w_y), B = Σ w q z (hard: w_y z_y), W = Σ_c w_c, D = Σ_c w_c z_c. Each is a
sum over classes, so each rank contributes its share and the shares add; lse merges as a
log-sum-exp of the ranks' local lse. Smoothing uses the global V and the global Σ w.

Stats layout: one row per logits row, plus a last header row (V_local, W_local).
Columns: "lse" always; hard targets "own" (1 if this rank holds y), "zy", and "wy" with
class weights; soft targets "wq", "wqz"; "wz" with smoothing. 12-20 bytes per row in fp32.
"""
from dataclasses import dataclass

import torch

import gpuce


def layout(soft, weighted, smoothing):
    cols = ["lse"] + (["wq", "wqz"] if soft else ["own", "zy"] + (["wy"] if weighted else []))
    return cols + (["wz"] if smoothing else [])


def capped(x, softcap, acc):
    z = x.to(acc)
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _times(w, v):
    """w * v, and 0 where w == 0 (so a zero weight on a -inf logit adds 0, not NaN)."""
    return torch.where(w != 0, w * v, torch.zeros((), dtype=v.dtype, device=v.device))


def local_stats(z, target, vocab_start, weight, ignore_index, label_smoothing):
    """Stats (N + 1, K) of this rank's capped logits ``z`` (N, V_local), accumulation dtype.

    target: (N,) global class ids, or this rank's (N, V_local) slice of the probabilities.
    weight: this rank's (V_local,) slice of the class weights, or None.
    """
    n, v_local = z.shape
    soft = target.is_floating_point()
    cols = layout(soft, weight is not None, label_smoothing > 0)
    stats = torch.zeros((n + 1, len(cols)), dtype=z.dtype, device=z.device)
    col = {name: i for i, name in enumerate(cols)}
    if n:
        stats[:n, 0] = gpuce.logsumexp(z)  # the kernel; -inf for a row of -inf
    w = None if weight is None else weight.to(z.dtype)
    if soft:
        wq = target.to(z.dtype) if w is None else target.to(z.dtype) * w
        stats[:n, col["wq"]] = wq.sum(1)
        stats[:n, col["wqz"]] = _times(wq, z).sum(1)
    else:
        local_y = target - vocab_start
        own = (target != ignore_index) & (local_y >= 0) & (local_y < v_local)
        idx = local_y.clamp(0, max(v_local - 1, 0)).unsqueeze(1)
        zero = torch.zeros((), dtype=z.dtype, device=z.device)
        stats[:n, col["own"]] = own.to(z.dtype)
        stats[:n, col["zy"]] = torch.where(own, z.gather(1, idx).squeeze(1), zero)
        if w is not None:
            stats[:n, col["wy"]] = torch.where(own, w[idx.squeeze(1)], zero)
    if label_smoothing > 0:
        stats[:n, col["wz"]] = (z if w is None else _times(w, z)).sum(1)
    stats[n, 0] = v_local
    stats[n, 1] = v_local if w is None else w.sum()
    return stats


@dataclass
class Combined:
    """What every rank knows after the merge (identical on every rank)."""
    loss: torch.Tensor        # per row ('none') or 0-d
    lse: torch.Tensor         # (N,) global log-sum-exp (0 where the row is all -inf)
    coef_p: torch.Tensor      # (N,) gradient = go·(coef_p·p_c - coef_q·q'_c) on class c
    coef_q: torch.Tensor      # (N,)
    n_classes: torch.Tensor   # global V (0-d; no host sync)
    bad: torch.Tensor         # (N,) kept rows whose target no rank holds


def _safe_inverse(den):
    nonzero = den != 0
    return nonzero / (den + (~nonzero).to(den.dtype))


def combine(stats, kept, *, soft, weighted, label_smoothing=0.0, z_loss=0.0, reduction="mean"):
    """Merge stats gathered from every rank, ``stats`` (R, N + 1, K) in rank order.

    kept: (N,) bool, the rows whose target is not ignore_index (all rows for soft targets).
    Ranks are merged one after another in rank order, so the result depends only on the
    gathered tensor: every rank gets bitwise the same loss.
    """
    cols = layout(soft, weighted, label_smoothing > 0)
    col = {name: i for i, name in enumerate(cols)}
    eps = float(label_smoothing)
    rows, header = stats[:, :-1, :], stats[:, -1, :]
    n_ranks = stats.shape[0]
    dt = stats.dtype
    n_cls_f = header[0, 0].clone()
    w_total = header[0, 1].clone()
    for r in range(1, n_ranks):
        n_cls_f += header[r, 0]
        w_total += header[r, 1]

    m = rows[:, :, 0].amax(0)
    m_safe = torch.where(torch.isneginf(m), torch.zeros((), dtype=dt, device=m.device), m)
    total = {name: rows[0, :, i].clone() for name, i in col.items() if name != "lse"}
    s = torch.exp(rows[0, :, 0] - m_safe)
    for r in range(1, n_ranks):
        s += torch.exp(rows[r, :, 0] - m_safe)
        for name, t in total.items():
            t += rows[r, :, col[name]]
    lse = m_safe + torch.log(s)
    masked = torch.isneginf(lse)

    if soft:
        a, b = total["wq"], total["wqz"]
        bad = torch.zeros_like(kept)
    else:
        a = total["wy"] if weighted else total["own"]
        b = _times(a, total["zy"]) if weighted else total["zy"]
        bad = kept & (total["own"] != 1)
    lse0 = torch.where(masked, torch.zeros((), dtype=dt, device=lse.device), lse)
    ce = torch.zeros_like(lse)
    if eps < 1:
        ce = ce + (1 - eps) * (a * lse0 - b)
    if eps > 0:
        ce = ce + (eps / n_cls_f) * (w_total * lse0 - total["wz"])
    inf = torch.full((), float("inf"), dtype=dt, device=lse.device)
    zero = torch.zeros((), dtype=dt, device=lse.device)
    ce = torch.where(kept, torch.where(masked, inf, ce), zero)
    zpart = torch.where(kept, z_loss * lse * lse, zero) if z_loss else torch.zeros_like(lse)
    ce = torch.where(bad, torch.full((), float("nan"), dtype=dt, device=lse.device), ce)

    if reduction == "mean":
        den_z = kept.to(dt).sum()
        den_ce = den_z if soft else torch.where(kept, a, zero).sum()
        a_ce, a_z = _safe_inverse(den_ce), _safe_inverse(den_z)
    else:
        a_ce = a_z = torch.ones((), dtype=dt, device=lse.device)
    rows_loss = ce * a_ce + zpart * a_z
    if reduction == "none":
        loss = rows_loss
    else:
        loss = rows_loss.sum(dtype=torch.float64).to(dt)
    q_sum = (1 - eps) * a + (eps / n_cls_f) * w_total
    live = kept & ~masked
    coef_p = torch.where(live, a_ce * q_sum + a_z * 2 * z_loss * lse0, zero)
    coef_q = torch.where(live, a_ce.expand_as(lse), zero)
    return Combined(loss, lse0, coef_p, coef_q, n_cls_f, bad)


def local_grad(z, x, target, vocab_start, weight, comb, label_smoothing, softcap, go, out_dtype):
    """This rank's slice of the gradient, (N, V_local) in ``out_dtype``.

    z: capped logits (accumulation dtype), x: the raw logits (for the softcap chain rule),
    go: (N,) or 0-d grad_output. No communication.
    """
    eps = float(label_smoothing)
    dt = z.dtype
    go = go.to(dt)
    cp = (comb.coef_p * go).unsqueeze(1)
    cq = comb.coef_q * go
    g = torch.exp(z - comb.lse.unsqueeze(1)) * cp
    w = None if weight is None else weight.to(dt)
    smooth = eps / comb.n_classes
    if target.is_floating_point():
        q = target.to(dt) if w is None else target.to(dt) * w
        g -= cq.unsqueeze(1) * ((1 - eps) * q + smooth * (1.0 if w is None else w))
    else:
        if eps > 0:
            g -= cq.unsqueeze(1) * (smooth * (torch.ones_like(z[0]) if w is None else w))
        v_local = z.shape[1]
        local_y = target - vocab_start
        own = (local_y >= 0) & (local_y < v_local)
        idx = local_y.clamp(0, max(v_local - 1, 0))
        wy = torch.ones_like(cq) if w is None else w[idx]
        hit = torch.where(own, -(1 - eps) * cq * wy, torch.zeros((), dtype=dt, device=z.device))
        g.scatter_add_(1, idx.unsqueeze(1), hit.unsqueeze(1))
    if softcap is not None:
        g *= 1 - (z / softcap) ** 2  # z = s·tanh(x/s): d z / d x = 1 - tanh²
    return g.to(out_dtype)
