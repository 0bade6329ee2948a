"""Determinism and batch invariance on the CPU, as the README guarantees them:

- the same call gives the same bits every time, whatever numba's thread count (1, 2, 4);
- a row's loss (reduction='none'), its gradient ('none' and 'sum'), its softmax,
  log_softmax and logsumexp are bitwise the same whatever other rows share the batch
  (rows added, removed, permuted), for every dtype and option.
'mean' divides by a count or weight sum over the batch, and the 'mean'/'sum' loss is a
float64 sum of the row losses in a fixed order (numpy's; row order in the short-row kernel),
so those change with the batch (but not from run to run or with the thread count).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpuce
from helpers import make_logits, np_dtype, rng_for

DTYPES = ["float16", "bfloat16", "float32", "float64"]
# C: below and above the block-at-once cutoff (64), and a row longer than a block's share
N_CLS = [5, 63, 64, 300, 20000]
OPTIONS = {
    "plain": {},
    "all_hard": dict(label_smoothing=0.1, z_loss=1e-3, softcap=20.0, weight=True, ignore=True),
    "soft_all": dict(soft=True, label_smoothing=0.1, z_loss=1e-3, softcap=20.0, weight=True),
}


def _case(rng, n, c, dtype, opt):
    x = make_logits(rng, (n, c), dtype, scale=4.0)
    x[3, : c // 2] = -np.inf  # a partly masked row
    kw = {k: v for k, v in opt.items() if k not in ("soft", "weight", "ignore")}
    if opt.get("weight"):
        kw["weight"] = rng.uniform(0.5, 2, c).astype(np.float32)
    if opt.get("soft"):
        t = rng.dirichlet(np.ones(c), size=n).astype(np_dtype(dtype))
    else:
        t = rng.integers(0, c, n)
        if opt.get("ignore"):
            t[::5] = -100
    return x, t, kw


def _rows_results(x, t, kw):
    loss, grad = gpuce.cross_entropy_with_grad(x, t, reduction="none", **kw)
    _, grad_sum = gpuce.cross_entropy_with_grad(x, t, reduction="sum", **kw)
    return [np.asarray(loss), grad, grad_sum, gpuce.softmax(x), gpuce.log_softmax(x),
            np.asarray(gpuce.logsumexp(x))]


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint8).reshape(a.shape[0], -1)


@pytest.mark.parametrize("opt", OPTIONS)
@pytest.mark.parametrize("n_cls", N_CLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_invariance(dtype, n_cls, opt):
    rng = rng_for("batch", dtype, n_cls, opt)
    n = 12 if n_cls < 20000 else 5
    x, t, kw = _case(rng, n, n_cls, dtype, OPTIONS[opt])
    full = _rows_results(x, t, kw)
    again = _rows_results(x, t, kw)
    for a, b in zip(full, again):
        assert _bits(a).tobytes() == _bits(b).tobytes()
    extra_x, extra_t, _ = _case(rng, 7, n_cls, dtype, OPTIONS[opt])
    perm = rng.permutation(n)
    batches = {
        "permuted": (x[perm], t[perm], perm),
        "every_third": (x[::3], t[::3], np.arange(n)[::3]),
        "one_row": (x[4:5], t[4:5], np.array([4])),
        "grown": (np.concatenate([extra_x[:3], x, extra_x[3:]]),
                  np.concatenate([extra_t[:3], t, extra_t[3:]]), None),
    }
    for name, (bx, bt, rows) in batches.items():
        got = _rows_results(bx, bt, kw)
        for i, (a, b) in enumerate(zip(full, got)):
            b = b[3:3 + n] if rows is None else b
            a = a if rows is None else a[rows]
            assert np.array_equal(_bits(a), _bits(b)), f"{name}: result {i} changed"


THREADS_SCRIPT = r"""
import hashlib, json, numba, numpy as np, gpuce
rng = np.random.default_rng(7)
out = {}
for dt in ("float32", "bfloat16", "float64"):
    import ml_dtypes
    npdt = ml_dtypes.bfloat16 if dt == "bfloat16" else dt
    x = (rng.standard_normal((300, 1000)) * 4).astype(npdt)
    t = rng.integers(0, 1000, 300)
    for n in (1, 2, 4):
        numba.set_num_threads(n)
        h = hashlib.sha256()
        for red in ("none", "mean", "sum"):
            loss, grad = gpuce.cross_entropy_with_grad(x, t, reduction=red, label_smoothing=0.1,
                                                       softcap=30.0, z_loss=1e-4)
            h.update(np.asarray(loss).tobytes()); h.update(grad.tobytes())
        h.update(gpuce.softmax(x).tobytes()); h.update(np.asarray(gpuce.logsumexp(x)).tobytes())
        out[f"{dt}/{n}"] = h.hexdigest()
print(json.dumps(out))
"""


def test_bitwise_across_thread_counts():
    """1, 2 and 4 threads (NUMBA_NUM_THREADS=4 in a fresh process, whatever the core
    count), on inputs big enough for the parallel kernels: the same bits."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, NUMBA_NUM_THREADS="4")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    res = subprocess.run([sys.executable, "-c", THREADS_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    digests = json.loads(res.stdout.strip().splitlines()[-1])
    for dt in ("float32", "bfloat16", "float64"):
        assert digests[f"{dt}/1"] == digests[f"{dt}/2"] == digests[f"{dt}/4"], dt
