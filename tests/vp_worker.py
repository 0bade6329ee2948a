"""Worker for the gloo tests of gpuce.torch.vocab_parallel_* (run by torch.multiprocessing.spawn).

Every rank builds the same dense data from a seed, keeps its shard of the classes, runs the
forward and the backward, counts the collectives each issues, and saves what it got for the
parent process to compare with the dense float64 reference.
"""
import os

import numpy as np
import torch
import torch.distributed as dist

COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast", "reduce",
               "reduce_scatter_tensor", "all_to_all_single", "gather", "scatter", "barrier")


def shard_bounds(n_cls, world):
    """Uneven shards: the first rank gets the remainder (V=1001 over 2: 501 + 500)."""
    base, extra = divmod(n_cls, world)
    sizes = [base + (1 if r < extra else 0) for r in range(world)]
    return np.concatenate([[0], np.cumsum(sizes)]).tolist()


def make_case(case):
    """Dense inputs of one case, the same on every rank (seeded by the case)."""
    g = torch.Generator().manual_seed(case["seed"])
    n, v, h = case["rows"], case["classes"], case.get("hidden", 0)
    data = {}
    if h:
        data["hidden"] = torch.randn(n, h, generator=g, dtype=torch.float64).float()
        data["classifier"] = (torch.randn(v, h, generator=g, dtype=torch.float64) * 0.3).float()
        data["bias"] = torch.randn(v, generator=g, dtype=torch.float64).float()
    else:
        data["logits"] = (torch.randn(n, v, generator=g, dtype=torch.float64) * 3).float()
    if case.get("soft"):
        q = torch.rand(n, v, generator=g, dtype=torch.float64)
        data["target"] = (q / q.sum(1, keepdim=True)).float()
    else:
        lo, hi = case.get("target_range", (0, v))
        y = torch.randint(lo, hi, (n,), generator=g)
        y[1] = -100
        data["target"] = y
    if case.get("weighted"):
        data["weight"] = (torch.rand(v, generator=g, dtype=torch.float64) + 0.2).float()
    return data


class _Counter:
    def __init__(self):
        self.count = 0
        self._orig = {}

    def __enter__(self):
        for name in COLLECTIVES:
            orig = getattr(dist, name, None)
            if orig is None:
                continue
            self._orig[name] = orig

            def counted(*a, _orig=orig, **k):
                self.count += 1
                return _orig(*a, **k)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(dist, name, orig)


def run_case(rank, world, case):
    import gpuce.torch as gt
    data = make_case(case)
    b = shard_bounds(case["classes"], world)
    lo, hi = b[rank], b[rank + 1]
    kw = dict(reduction=case["reduction"], label_smoothing=case.get("smoothing", 0.0),
              z_loss=case.get("z_loss", 0.0), softcap=case.get("softcap"))
    if "weight" in data:
        kw["weight"] = data["weight"][lo:hi]
    t = data["target"][:, lo:hi] if case.get("soft") else data["target"]
    out = {}
    if "logits" in data:
        x = data["logits"][:, lo:hi].clone().requires_grad_(True)
        with _Counter() as fwd:
            loss = gt.vocab_parallel_cross_entropy(x, t, vocab_start=lo, **kw)
        go = torch.linspace(-1, 2, loss.numel()).reshape(loss.shape) if loss.dim() else torch.tensor(1.5)
        with _Counter() as bwd:
            loss.backward(go.to(loss.dtype))
        out["grads"] = {"logits": x.grad}
    else:
        hid = data["hidden"].clone().requires_grad_(True)
        cls = data["classifier"][lo:hi].clone().requires_grad_(True)
        bias = data["bias"][lo:hi].clone().requires_grad_(True)
        with _Counter() as fwd:
            loss = gt.vocab_parallel_linear_cross_entropy(hid, cls, t, vocab_start=lo, bias=bias,
                                                          chunk_rows=case.get("chunk_rows"), **kw)
        go = torch.linspace(-1, 2, loss.numel()).reshape(loss.shape) if loss.dim() else torch.tensor(1.5)
        with _Counter() as bwd:
            loss.backward(go.to(loss.dtype))
        out["grads"] = {"hidden": hid.grad, "classifier": cls.grad, "bias": bias.grad}
    out.update(loss=loss.detach(), go=go, bounds=(lo, hi), fwd=fwd.count, bwd=bwd.count)
    return out


def worker(rank, world, port, cases, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = [run_case(rank, world, c) for c in cases]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
