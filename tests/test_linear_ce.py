"""Chunked linear + cross-entropy (gpuce.linear_cross_entropy[_with_grad] for numpy,
gpuce.torch.linear_cross_entropy with autograd) against the dense float64 reference:
logits = hidden @ classifier.T + bias in float64, tests/reference.py's loss and gradient,
then grad_hidden = g @ C, grad_classifier = g.T @ h, grad_bias = Σ g.

Errors are max-abs relative to the reference's max-abs (2e-5 for fp32, the acceptance bar).
"""
import numpy as np
import pytest
import torch

import gpuce
import gpuce.torch as gt
from reference import ref_cross_entropy

N, H, V = 29, 12, 53
TOL = {"float32": 2e-5, "float64": 1e-12}

OPTIONS = {
    "plain": dict(),
    "ignore": dict(ignore=True),
    "weights": dict(weight=True, ignore=True),
    "smooth": dict(label_smoothing=0.15, ignore=True),
    "zloss": dict(z_loss=1e-2, ignore=True),
    "softcap": dict(softcap=4.0),
    "all": dict(weight=True, label_smoothing=0.1, z_loss=1e-2, softcap=6.0, ignore=True),
    "soft": dict(soft=True, label_smoothing=0.1, z_loss=1e-3),
    "soft_weights": dict(soft=True, weight=True),
}


def _inputs(rng, opt, bias=True, shape=(N,)):
    h = rng.standard_normal(shape + (H,))
    c = rng.standard_normal((V, H)) * 0.4
    b = rng.standard_normal(V) if bias else None
    if opt.get("soft"):
        q = rng.random(shape + (V,))
        t = q / q.sum(-1, keepdims=True)
    else:
        t = rng.integers(0, V, shape)
        if opt.get("ignore"):
            t.reshape(-1)[::5] = -100
    # class weights as float32 values (the torch tests pass them as float32)
    w = (rng.random(V) + 0.1).astype(np.float32).astype(np.float64) if opt.get("weight") else None
    kw = {k: opt[k] for k in ("label_smoothing", "z_loss", "softcap") if k in opt}
    return h, c, b, t, w, kw


def _reference(h, c, b, t, w, kw, reduction, go):
    logits = h @ c.T + (0 if b is None else b)
    loss, g = ref_cross_entropy(logits, t, weight=w, reduction=reduction, grad_output=go, **kw)
    g2, h2 = g.reshape(-1, V), h.reshape(-1, H)
    return loss, g.reshape(h.shape[:-1] + (V,)) @ c, g2.T @ h2, g2.sum(0)


def _rel(got, ref):
    if hasattr(got, "detach"):
        got = got.detach().double().numpy()
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape
    return float(np.max(np.abs(got - ref), initial=0.0) / max(np.max(np.abs(ref), initial=0.0), 1e-300))


def _grad_output(rng, reduction, shape=(N,)):
    return rng.standard_normal(shape) if reduction == "none" else 1.7


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("chunk_rows", [None, 6])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_numpy_matches_dense(option, reduction, chunk_rows, dtype, rng):
    opt = OPTIONS[option]
    h, c, b, t, w, kw = _inputs(rng, opt)
    go = _grad_output(rng, reduction)
    cast = (lambda a: None if a is None else a.astype(dtype))
    h, c, b = cast(h), cast(c), cast(b)
    t_in = t.astype(dtype) if opt.get("soft") else t
    loss, gh, gc, gb = gpuce.linear_cross_entropy_with_grad(
        h, c, t_in, bias=b, weight=w, reduction=reduction, grad_output=go,
        chunk_rows=chunk_rows, **kw)
    ref = _reference(h.astype(float), c.astype(float), b.astype(float), t, w, kw, reduction, go)
    assert loss.dtype == np.dtype(dtype) and gh.dtype == gc.dtype == gb.dtype == np.dtype(dtype)
    for what, got, want in zip(("loss", "grad_hidden", "grad_classifier", "grad_bias"),
                               (loss, gh, gc, gb), ref):
        assert _rel(got, want) <= TOL[dtype], what
    only_loss = gpuce.linear_cross_entropy(h, c, t_in, bias=b, weight=w, reduction=reduction,
                                           chunk_rows=chunk_rows, **kw)
    assert _rel(only_loss, ref[0]) <= TOL[dtype]


def _torch_run(h, c, b, t, w, kw, reduction, go, dtype, chunk_rows=None, fn=None):
    td = getattr(torch, dtype)
    ht = torch.tensor(h, dtype=td, requires_grad=True)
    ct = torch.tensor(c, dtype=td, requires_grad=True)
    bt = None if b is None else torch.tensor(b, dtype=td, requires_grad=True)
    tt = torch.tensor(t, dtype=td) if np.issubdtype(t.dtype, np.floating) else torch.tensor(t)
    wt = None if w is None else torch.tensor(w, dtype=torch.float32)
    fn = fn or (lambda *a: gt.linear_cross_entropy(*a, weight=wt, reduction=reduction,
                                                   chunk_rows=chunk_rows, **kw))
    loss = fn(ht, ct, tt, bt)
    loss.backward(torch.as_tensor(go, dtype=loss.dtype))
    return loss, ht.grad, ct.grad, None if bt is None else bt.grad


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("chunk_rows", [None, 6])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_torch_matches_dense(option, reduction, chunk_rows, dtype, rng):
    opt = OPTIONS[option]
    h, c, b, t, w, kw = _inputs(rng, opt, shape=(3, N // 3 + 1))  # 3-d hidden
    go = _grad_output(rng, reduction, shape=(3, N // 3 + 1))
    got = _torch_run(h, c, b, t, w, kw, reduction, go, dtype, chunk_rows)
    ref = _reference(h, c, b, t, w, kw, reduction, go)
    assert got[0].dtype == getattr(torch, dtype) and got[2].dtype == getattr(torch, dtype)
    for what, g, want in zip(("loss", "grad_hidden", "grad_classifier", "grad_bias"), got, ref):
        assert _rel(g, want) <= TOL[dtype], what


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(reduction, rng):
    h, c, b, t, w, kw = _inputs(rng, OPTIONS["all"])
    go = _grad_output(rng, reduction)
    wt = torch.tensor(w, dtype=torch.float32)
    fn = torch.compile(lambda h_, c_, t_, b_: gt.linear_cross_entropy(
        h_, c_, t_, b_, weight=wt, reduction=reduction, chunk_rows=7, **kw), fullgraph=True)
    got = _torch_run(h, c, b, t, w, kw, reduction, go, "float32", fn=fn)
    ref = _reference(h, c, b, t, w, kw, reduction, go)
    for what, g, want in zip(("loss", "grad_hidden", "grad_classifier", "grad_bias"), got, ref):
        assert _rel(g, want) <= TOL["float32"], what


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_bf16_accumulates_classifier_grad_in_fp32(lib, rng):
    """One row per chunk vs one chunk: with fp32 accumulation the classifier gradient is
    the same up to rounding the sum once (a bf16 running sum over 256 chunks would drift).
    hidden holds signed powers of two, so a one-row chunk's product g_r * h_r is exact in
    bf16: torch rounds each chunk's product once (a bf16 GEMM), and here that is a no-op."""
    import ml_dtypes
    n = 256
    h, c, b, t, w, kw = _inputs(rng, {}, shape=(n,))
    h = np.sign(h) * 2.0 ** rng.integers(-2, 3, h.shape)
    grads = []
    for rows in (1, n):
        if lib == "numpy":
            bf = ml_dtypes.bfloat16
            out = gpuce.linear_cross_entropy_with_grad(h.astype(bf), c.astype(bf), t,
                                                       bias=b.astype(bf), chunk_rows=rows,
                                                       reduction="sum")
            grads.append(out[2].astype(np.float64))
        else:
            out = _torch_run(h, c, b, t, None, {}, "sum", 1.0, "bfloat16", rows)
            grads.append(out[2].double().numpy())
    ulp = np.abs(grads[1]) * 2.0 ** -7 + 1e-30
    assert np.all(np.abs(grads[0] - grads[1]) <= 1.01 * ulp + 1e-6 * np.max(np.abs(grads[1])))
    ref = _reference(h, c, b, t, None, {}, "sum", 1.0)[2]
    assert _rel(grads[0], ref) <= 3e-2  # bf16 logits and gradient: a sanity bound only


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_all_ignored_mean_is_zero(lib, rng):
    h, c, b, t, w, kw = _inputs(rng, {"weight": True}, shape=(N,))
    t[:] = -100
    if lib == "numpy":
        loss, gh, gc, gb = gpuce.linear_cross_entropy_with_grad(h, c, t, bias=b, weight=w,
                                                                z_loss=1e-2, chunk_rows=4)
    else:
        loss, gh, gc, gb = _torch_run(h, c, b, t, w, {"z_loss": 1e-2}, "mean", 1.0, "float64", 4)
    for a in (loss, gh, gc, gb):
        a = a.detach().numpy() if hasattr(a, "detach") else a
        assert np.all(np.asarray(a) == 0)


def test_zero_target_weights_keep_z_loss(rng):
    """Σ w[y] = 0 while rows are kept: the CE part is dropped (contract), z part is not."""
    h, c, b, t, w, kw = _inputs(rng, {"weight": True})
    w[t] = 0.0
    got = gpuce.linear_cross_entropy_with_grad(h, c, t, bias=b, weight=w, z_loss=1e-2,
                                               label_smoothing=0.1, chunk_rows=5)
    ref = _reference(h, c, b, t, w, dict(z_loss=1e-2, label_smoothing=0.1), "mean", 1.0)
    assert float(ref[0]) > 0
    for g, want in zip(got, ref):
        assert _rel(g, want) <= 1e-12


def test_memory_budget_sets_chunks(monkeypatch, rng):
    """The default chunk follows memory_budget_bytes; chunk_rows overrides it."""
    from gpuce import _chunking
    seen = []
    real = _chunking.cross_entropy_with_grad
    monkeypatch.setattr(_chunking, "cross_entropy_with_grad",
                        lambda x, *a, **k: seen.append(x.shape[0]) or real(x, *a, **k))
    h, c, b, t, w, kw = _inputs(rng, {})
    gpuce.linear_cross_entropy_with_grad(h, c, t, memory_budget_bytes=V * 8 * 10)
    assert seen == [10, 10, 9]
    seen.clear()
    gpuce.linear_cross_entropy_with_grad(h, c, t, memory_budget_bytes=V * 8 * 10, chunk_rows=20)
    assert seen == [20, 9]


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("bad, exc, name", [
    (dict(classifier=np.zeros((V, H + 1))), ValueError, "classifier"),
    (dict(bias=np.zeros(V + 1)), ValueError, "bias"),
    (dict(target=np.zeros(N + 1, dtype=np.int64)), ValueError, "target"),
    (dict(chunk_rows=0), ValueError, "chunk_rows"),
    (dict(memory_budget_bytes=-1), ValueError, "memory_budget_bytes"),
    (dict(classifier=np.zeros((V, H), dtype=np.float32)), TypeError, "classifier"),
    (dict(target=np.full(N, V, dtype=np.int64)), ValueError, "target"),
])
def test_bad_arguments(lib, bad, exc, name, rng):
    h, c, b, t, w, kw = _inputs(rng, {})
    args = dict(hidden=h, classifier=c, target=t, bias=b)
    extra = {k: v for k, v in bad.items() if k not in args}
    args.update({k: v for k, v in bad.items() if k in args})
    with pytest.raises(exc, match=name):
        if lib == "numpy":
            gpuce.linear_cross_entropy_with_grad(args["hidden"], args["classifier"],
                                                 args["target"], bias=args["bias"], **extra)
        else:
            gt.linear_cross_entropy(*(torch.from_numpy(args[k]) for k in
                                      ("hidden", "classifier", "target", "bias")), **extra)


def test_bench_linear_child_measures(rng):
    """`gpuce bench --op linear_ce`'s measuring code, in-process on a tiny shape: gpuce's
    loss equals the naive path's, and the table shows both with their ratios."""
    from gpuce import bench_linear
    rows = [bench_linear.child(impl, "float32", 64, 16, 300, 1, "cpu")
            for impl in ("naive", "unchunked", "gpuce")]
    assert abs(rows[2]["loss"] - rows[0]["loss"]) <= 1e-5 * abs(rows[0]["loss"])
    assert all(r["time_s"] > 0 and isinstance(r["peak_extra_bytes"], int) for r in rows)
    doc = dict(shape=[64, 16, 300], device="cpu", repeats=1, dtypes=["float32"],
               results=rows + [dict(impl="liger", dtype="float32", skipped="needs a GPU")])
    text = bench_linear.format_markdown(doc)
    assert "| float32 | gpuce |" in text and "needs a GPU" in text and "| 1.00 |" in text


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_cpu_add_into_widens_in_place(dtype, rng):
    """The chunked half-precision path's fp32 sum: total += part, part widened on the fly."""
    from gpuce import _cpu
    part = torch.tensor(rng.standard_normal((37, 70)), dtype=getattr(torch, dtype))
    total = torch.tensor(rng.standard_normal((37, 70)), dtype=torch.float32)
    want = total + part.float()  # exact widening, then one fp32 rounding per element
    _cpu.add_into(total, part)
    assert torch.equal(total, want)
    with pytest.raises(ValueError, match="total"):
        _cpu.add_into(total[:, :5], part)
    with pytest.raises(ValueError, match="total"):
        _cpu.add_into(total.double(), part)
