"""Vocab-parallel cross-entropy: the pure merge (``combine``) over 1-7 uneven shards, and
2/3/4-process gloo runs of gpuce.torch.vocab_parallel_* against the dense float64 reference.

The gloo runs start processes with torch.multiprocessing.spawn (never fork) on 127.0.0.1;
each process pays torch's import and numba's compile, so all cases of one world size run in
one spawn. The 3- and 4-rank runs are slow: ``GPUCE_SLOW_TESTS=1 pytest tests/test_vocab_parallel.py``.
"""
import os
import socket

import numpy as np
import pytest
import torch

from gpuce import _vocab_parallel as vp
from reference import ref_cross_entropy
from vp_worker import make_case, shard_bounds

OPTIONS = [
    dict(),
    dict(weighted=True),
    dict(smoothing=0.1),
    dict(weighted=True, smoothing=0.2, z_loss=1e-3, softcap=20.0),
    dict(soft=True, smoothing=0.1, z_loss=1e-3),
    dict(soft=True, weighted=True),
]


def _uneven_bounds(n_cls, n_shards, rng):
    cuts = np.sort(rng.choice(np.arange(1, n_cls), n_shards - 1, replace=False))
    return [0] + cuts.tolist() + [n_cls]


def _dense_ref(x, target, weight, opt, reduction, go):
    return ref_cross_entropy(x, target, weight=weight, reduction=reduction,
                             label_smoothing=opt.get("smoothing", 0.0),
                             z_loss=opt.get("z_loss", 0.0), softcap=opt.get("softcap"),
                             grad_output=go)


def _sharded(x, target, weight, bounds, opt, reduction, go, dtype=torch.float64):
    """combine() over the shards' local_stats, and every shard's local_grad, concatenated."""
    soft = opt.get("soft", False)
    eps = opt.get("smoothing", 0.0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    xs = torch.as_tensor(x).to(dtype)
    t = torch.as_tensor(target)
    w = None if weight is None else torch.as_tensor(weight).to(dtype)
    parts, zs = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        z = vp.capped(xs[:, lo:hi], opt.get("softcap"), acc)
        zs.append(z)
        parts.append(vp.local_stats(z, t[:, lo:hi] if soft else t, lo,
                                    None if w is None else w[lo:hi], -100, eps))
    kept = torch.ones(len(xs), dtype=torch.bool) if soft else t != -100
    comb = vp.combine(torch.stack(parts), kept, soft=soft, weighted=w is not None,
                      label_smoothing=eps, z_loss=opt.get("z_loss", 0.0), reduction=reduction)
    go_t = torch.as_tensor(go, dtype=acc)
    grads = [vp.local_grad(z, xs[:, lo:hi], t[:, lo:hi] if soft else t, lo,
                           None if w is None else w[lo:hi], comb, eps, opt.get("softcap"), go_t,
                           dtype)
             for z, lo, hi in zip(zs, bounds[:-1], bounds[1:])]
    return comb, torch.cat(grads, 1)


def _data(rng, n, n_cls, opt, scale=3.0, target_range=None):
    x = rng.standard_normal((n, n_cls)) * scale
    if opt.get("soft"):
        q = rng.random((n, n_cls))
        target = q / q.sum(1, keepdims=True)
    else:
        lo, hi = target_range or (0, n_cls)
        target = rng.integers(lo, hi, n)
        target[1] = -100
    weight = rng.random(n_cls) + 0.2 if opt.get("weighted") else None
    return x, target, weight


def _rel(got, ref):
    got = np.asarray(got.detach().double() if hasattr(got, "detach") else got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.max(np.abs(got - ref), initial=0.0) / max(np.max(np.abs(ref), initial=0.0), 1e-300))


@pytest.mark.parametrize("n_shards", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_combine_matches_dense(n_shards, reduction, opt, rng):
    x, target, weight = _data(rng, 9, 1001, opt)
    bounds = _uneven_bounds(1001, n_shards, rng)
    go = rng.standard_normal(9) if reduction == "none" else 1.3
    ref_loss, ref_grad = _dense_ref(x, target, weight, opt, reduction, go)
    comb, grad = _sharded(x, target, weight, bounds, opt, reduction, go)
    assert _rel(comb.loss, ref_loss) <= 1e-13
    assert _rel(grad, ref_grad) <= 1e-13
    assert not bool(comb.bad.any())


@pytest.mark.parametrize("case", ["x1000", "all_ignored", "one_rank_holds_all", "masked_row"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_combine_edge_cases(case, reduction, rng):
    # smoothing puts -inf logits into the loss (+inf, as in the reference): not for masked_row
    opt = dict(weighted=True, smoothing=0.0 if case == "masked_row" else 0.1, z_loss=1e-3)
    n, n_cls, n_shards = 8, 1001, 4
    bounds = _uneven_bounds(n_cls, n_shards, rng)
    x, target, weight = _data(rng, n, n_cls, opt, scale=1000.0 if case == "x1000" else 3.0,
                              target_range=(bounds[2], bounds[3]) if case == "one_rank_holds_all"
                              else None)
    if case == "all_ignored":
        target[:] = -100
    if case == "masked_row":  # a row of -inf except its target, and a -inf non-target class
        x[2, :] = -np.inf
        x[2, target[2]] = 0.5
        x[3, (target[3] + 1) % n_cls] = -np.inf
    go = rng.standard_normal(n) if reduction == "none" else 0.7
    ref_loss, ref_grad = _dense_ref(x, target, weight, opt, reduction, go)
    comb, grad = _sharded(x, target, weight, bounds, opt, reduction, go)
    assert np.all(np.isfinite(np.asarray(comb.loss))), "no NaN/inf from -inf logits or empty means"
    assert np.all(np.isfinite(grad.numpy()))
    assert _rel(comb.loss, ref_loss) <= 1e-12
    assert _rel(grad, ref_grad) <= 1e-12
    if case == "all_ignored":
        assert not np.any(grad.numpy()), "all rows ignored: zero gradient"


def test_combine_fp32_stats(rng):
    """fp32 logits: stats and merge in fp32, within 1e-6 of the float64 dense result."""
    opt = dict(weighted=True, smoothing=0.1, z_loss=1e-3, softcap=30.0)
    x, target, weight = _data(rng, 16, 1000, opt)
    x = x.astype(np.float32).astype(np.float64)
    bounds = _uneven_bounds(1000, 3, rng)
    ref_loss, ref_grad = _dense_ref(x, target, weight, opt, "mean", 1.0)
    comb, grad = _sharded(x, target, weight, bounds, opt, "mean", 1.0, dtype=torch.float32)
    assert comb.loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert _rel(comb.loss, ref_loss) <= 1e-6
    assert _rel(grad, ref_grad) <= 1e-6


def test_combine_flags_targets_no_rank_holds(rng):
    x, target, _ = _data(rng, 5, 50, {})
    target[3] = 50  # outside [0, V)
    comb, _ = _sharded(x, target, None, [0, 20, 50], {}, "mean", 1.0)
    assert comb.bad.tolist() == [False, False, False, True, False]
    assert np.isnan(float(comb.loss))


# ---- multi-process (gloo) ---------------------------------------------------------------

GLOO_CASES = [
    dict(seed=1, rows=7, classes=1001, reduction="mean", smoothing=0.1, z_loss=1e-3,
         softcap=20.0, weighted=True),
    dict(seed=2, rows=7, classes=1000, reduction="sum", smoothing=0.2),
    dict(seed=3, rows=7, classes=1001, reduction="none", z_loss=1e-3, softcap=10.0),
    dict(seed=4, rows=7, classes=1000, reduction="mean", soft=True, smoothing=0.1),
    dict(seed=5, rows=9, classes=1001, hidden=16, reduction="mean", smoothing=0.1,
         z_loss=1e-3, weighted=True),                                  # linear, one chunk
    dict(seed=6, rows=9, classes=1000, hidden=16, reduction="none", softcap=15.0,
         chunk_rows=4),                                                # linear, 3 chunks
]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dense_case(case, go):
    data = {k: v.double() if v.is_floating_point() else v for k, v in make_case(case).items()}
    opt = dict(smoothing=case.get("smoothing", 0.0), z_loss=case.get("z_loss", 0.0),
               softcap=case.get("softcap"))
    if "hidden" in data:
        x = data["hidden"] @ data["classifier"].T + data["bias"]
    else:
        x = data["logits"]
    loss, gz = _dense_ref(x.numpy(), data["target"].numpy(), data.get("weight"), opt,
                          case["reduction"], go.double().numpy())
    grads = {"logits": gz}
    if "hidden" in data:
        grads = {"hidden": gz @ data["classifier"].numpy(), "classifier": gz.T @ data["hidden"].numpy(),
                 "bias": gz.sum(0)}
    return loss, grads


def _run_gloo(world, tmp_path):
    import torch.multiprocessing as mp
    import vp_worker
    mp.spawn(vp_worker.worker, args=(world, _free_port(), GLOO_CASES, str(tmp_path)),
             nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for i, case in enumerate(GLOO_CASES):
        got = [res[i] for res in results]
        ref_loss, ref_grads = _dense_case(case, got[0]["go"])
        bounds = shard_bounds(case["classes"], world)
        for r, g in enumerate(got):
            assert g["bounds"] == (bounds[r], bounds[r + 1])
            assert torch.equal(g["loss"].view(torch.int32), got[0]["loss"].view(torch.int32)), \
                f"case {i}: the loss differs between rank 0 and rank {r}"
            assert _rel(g["loss"], ref_loss) <= 1e-6, f"case {i} rank {r}: loss"
            assert g["fwd"] == 1, f"case {i}: {g['fwd']} collectives in the forward"
            n_chunks = -(-case["rows"] // case.get("chunk_rows", case["rows"]))
            assert g["bwd"] == (n_chunks if "hidden" in case else 0), \
                f"case {i}: {g['bwd']} collectives in the backward"
            for name, grad in g["grads"].items():
                ref = ref_grads[name]
                if name in ("logits", "classifier", "bias"):
                    ref = ref[bounds[r]:bounds[r + 1]] if name != "logits" else \
                        ref[:, bounds[r]:bounds[r + 1]]
                assert _rel(grad, ref) <= 1e-6, f"case {i} rank {r}: grad of {name}"


_SLOW = [pytest.mark.slow,
         pytest.mark.skipif(not os.environ.get("GPUCE_SLOW_TESTS"),
                            reason="45-75 s on 2 shared cores: set GPUCE_SLOW_TESTS=1 to run")]


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=_SLOW), pytest.param(4, marks=_SLOW)])
def test_gloo(world, tmp_path):
    """45-75 s each on the 2 shared cores (mostly import + numba compile in every process)."""
    _run_gloo(world, tmp_path)
