"""The float64 reference that defines gpuce's semantics. Every backend is tested against it.

It is written with plain numpy in float64, term by term as in the contract
(../shared/GUIDE.md §1), and is itself checked against PyTorch where PyTorch agrees.
Deliberate differences from PyTorch: the class axis is last; a mean over rows that are all
ignored is 0 with a zero gradient (PyTorch: NaN); a row whose logits are all -inf has loss
+inf, softmax 0 and a zero gradient (PyTorch: NaN).

``class_mask`` (True = the class takes part, as in torch.masked.softmax): masked classes are
dropped from the row -- probability 0, log_softmax -inf, gradient exactly 0 -- and label
smoothing spreads eps over the row's live classes only (their count replaces C). The
reference computes that by giving masked classes exp = 0 (a float64 -inf here); validity
checks (masked targets, probability on masked classes) belong to the callers.
"""
import numpy as np


def as_f64(a):
    if a is None:
        return None
    if hasattr(a, "detach"):  # torch tensor
        return a.detach().to("cpu").double().numpy()
    return np.asarray(a).astype(np.float64)


def _capped(x, softcap):
    return x if softcap is None else softcap * np.tanh(x / softcap)


def live_classes(class_mask, shape, axis=-1):
    """The mask broadcast to ``shape`` (bool), or None without a mask."""
    if class_mask is None:
        return None
    m = np.asarray(class_mask.detach().cpu().numpy() if hasattr(class_mask, "detach")
                   else class_mask, dtype=bool)
    if m.ndim == 1:
        m = m.reshape((-1,) + (1,) * (len(shape) - 1 - axis % len(shape)))
    return np.broadcast_to(m, shape)


def _dropped(x, class_mask, axis):
    """x with masked classes at -inf: exp gives exactly 0 there in float64."""
    live = live_classes(class_mask, x.shape, axis)
    return x if live is None else np.where(live, x, -np.inf)


def ref_logsumexp(x, axis=-1, class_mask=None):
    x = _dropped(as_f64(x), class_mask, axis)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)
    with np.errstate(divide="ignore"):
        return np.squeeze(m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)), axis)


def ref_softmax(x, axis=-1, class_mask=None):
    x = _dropped(as_f64(x), class_mask, axis)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)
    e = np.exp(x - m)
    s = np.sum(e, axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s > 0, e / np.where(s > 0, s, 1.0), 0.0)


def ref_log_softmax(x, axis=-1, class_mask=None):
    x = _dropped(as_f64(x), class_mask, axis)
    with np.errstate(invalid="ignore"):
        out = x - np.expand_dims(ref_logsumexp(x, axis), axis)
    live = live_classes(class_mask, x.shape, axis)
    return out if live is None else np.where(live, out, -np.inf)


def ref_cross_entropy(logits, target, weight=None, ignore_index=-100, reduction="mean",
                      label_smoothing=0.0, z_loss=0.0, softcap=None, grad_output=None,
                      class_mask=None):
    """(loss, grad) in float64. ``grad`` is d(sum_i go_i * loss_i)/d logits for 'none',
    go * dL/dlogits otherwise."""
    x = as_f64(logits)
    shape = x.shape
    n_cls = shape[-1]
    x2 = x.reshape(-1, n_cls)
    n = x2.shape[0]
    z = _capped(x2, softcap)
    live = live_classes(class_mask, shape)
    live = np.ones((n, n_cls), dtype=bool) if live is None else live.reshape(n, n_cls)
    z = np.where(live, z, -np.inf)  # dropped: exp 0, no share of the smoothing
    n_live = live.sum(axis=1, keepdims=True).astype(np.float64)
    w = np.ones(n_cls) if weight is None else as_f64(weight)
    eps = float(label_smoothing)
    lse = ref_logsumexp(z)                        # (n,)
    p = ref_softmax(z)                            # (n, C)
    with np.errstate(invalid="ignore"):
        logp = z - lse[:, None]
    masked_row = np.isneginf(lse)

    t = np.asarray(target.detach().numpy() if hasattr(target, "detach") else target)
    if np.issubdtype(t.dtype, np.integer):
        y = t.reshape(-1).astype(np.int64)
        kept = y != ignore_index
        ys = np.where(kept, y, 0)
        onehot = np.zeros((n, n_cls))
        onehot[np.arange(n), ys] = 1.0
        # q: the effective per-class coefficient of -log p, per row
        with np.errstate(divide="ignore", invalid="ignore"):
            smooth = np.where(live, eps / n_live, 0.0)  # over the live classes
            q = (1 - eps) * onehot * w[ys][:, None] + smooth * w[None, :]
        q = q * kept[:, None]
        den_ce = float(np.sum(w[ys] * kept))
        den_z = float(np.sum(kept))
    else:
        qt = as_f64(target).reshape(-1, n_cls)
        kept = np.ones(n, dtype=bool)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = w[None, :] * ((1 - eps) * qt + np.where(live, eps / n_live, 0.0))
        den_ce = den_z = float(n)

    with np.errstate(invalid="ignore"):
        ce = -np.sum(np.where(q == 0, 0.0, q * logp), axis=1)
    ce = np.where(kept & masked_row, np.inf, ce)
    zpart = np.where(kept, z_loss * lse ** 2, 0.0) if z_loss else np.zeros(n)
    # d ce / dz = p * sum(q) - q ;  d zpart / dz = 2 z lse p
    gz_ce = p * q.sum(axis=1, keepdims=True) - q
    gz_z = (2 * z_loss * np.where(masked_row, 0.0, lse))[:, None] * p * kept[:, None]
    gz_ce = np.where(masked_row[:, None] | ~live, 0.0, gz_ce)

    if reduction == "mean":
        a_ce = 0.0 if den_ce == 0 else 1.0 / den_ce
        a_z = 0.0 if den_z == 0 else 1.0 / den_z
    else:
        a_ce = a_z = 1.0
    rows_loss = ce * a_ce + zpart * a_z
    if reduction == "none":
        loss = rows_loss.reshape(shape[:-1])
        go = np.ones(n) if grad_output is None else np.broadcast_to(as_f64(grad_output), shape[:-1]).reshape(-1)
    else:
        loss = np.float64(rows_loss.sum())
        go = np.full(n, 1.0 if grad_output is None else float(as_f64(grad_output)))
    gz = go[:, None] * (a_ce * gz_ce + a_z * gz_z)
    if softcap is not None:
        with np.errstate(invalid="ignore"):
            gz = np.where(live, gz * (1 - np.tanh(x2 / softcap) ** 2), 0.0)
    return loss, gz.reshape(shape)
