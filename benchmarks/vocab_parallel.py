"""Vocab-parallel cross-entropy on gloo: collectives, bytes per row on the wire, and time.

    python benchmarks/vocab_parallel.py [--world 2 4] [--rows 2048] [--classes 32000]

Compares, fwd+bwd on fp32 local logits (N, V / world) per rank:
- ``gpuce``: gpuce.torch.vocab_parallel_cross_entropy (one all-gather of packed row stats);
- ``megatron``: Megatron-style reference, 3 all-reduces (max, Σexp, target logit);
- ``loss_parallel``: torch's DTensor ``loss_parallel()`` with F.cross_entropy, if it runs here.

Wire bytes per row per rank: all-gather receives (R-1)·payload; a ring all-reduce sends
and receives 2·(R-1)/R·payload (counted from the tensors handed to torch.distributed;
loss_parallel's are counted by CommDebugMode, bytes not available). Processes are started
with torch.multiprocessing.spawn on 127.0.0.1. Times: median over repeats, rank 0, with a
barrier before each run. Writes benchmarks/results/vocab_parallel_cpu.{json,md}.
"""
import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


class _Megatron(torch.autograd.Function):
    """Megatron-LM's vocab_parallel_cross_entropy (no smoothing): 3 all-reduces."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start):
        m = logits.max(-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        x = logits - m.unsqueeze(1)
        v_local = logits.shape[1]
        own = (target >= vocab_start) & (target < vocab_start + v_local)
        idx = (target - vocab_start).clamp(0, v_local - 1)
        zy = torch.where(own, x.gather(1, idx.unsqueeze(1)).squeeze(1), torch.zeros(()))
        dist.all_reduce(zy)
        e = x.exp()
        s = e.sum(-1)
        dist.all_reduce(s)
        ctx.save_for_backward(e, s, own, idx)
        return (s.log() - zy).mean()

    @staticmethod
    def backward(ctx, go):
        e, s, own, idx = ctx.saved_tensors
        g = e / s.unsqueeze(1)
        g.scatter_add_(1, idx.unsqueeze(1), -own.to(g.dtype).unsqueeze(1))
        return g * (go / g.shape[0]), None, None


class _Wire:
    """Counts collectives and the bytes each rank receives, per call."""
    def __init__(self, world):
        self.world, self.count, self.bytes = world, 0, 0.0
        self._orig = {}

    def __enter__(self):
        r = self.world
        rules = {"all_gather_single": lambda out, inp, *a, **k: (r - 1) * inp.numel() * inp.element_size(),
                 "all_gather_into_tensor": lambda out, inp, *a, **k: (r - 1) * inp.numel() * inp.element_size(),
                 "all_reduce": lambda t, *a, **k: 2 * (r - 1) / r * t.numel() * t.element_size()}
        for name, rule in rules.items():
            orig = getattr(dist, name, None)
            if orig is None:
                continue
            self._orig[name] = orig

            def wrapped(*a, _o=orig, _rule=rule, **k):
                self.count += 1
                self.bytes += _rule(*a, **k)
                return _o(*a, **k)
            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(dist, name, orig)


def _worker(rank, world, port, rows, n_cls, repeats, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)  # ranks share the machine's cores
    import gpuce.torch as gt
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, n_cls, generator=g) * 3
    target = torch.randint(0, n_cls, (rows,), generator=g)
    v_local = n_cls // world
    lo = rank * v_local
    local = logits[:, lo:lo + v_local].contiguous()

    def run_gpuce(x):
        return gt.vocab_parallel_cross_entropy(x, target, vocab_start=lo)

    def run_megatron(x):
        return _Megatron.apply(x, target, lo)

    impls = {"gpuce": run_gpuce, "megatron": run_megatron}
    results = {}
    for name, fn in impls.items():
        x = local.clone().requires_grad_(True)
        fn(x).backward()  # warm-up
        with _Wire(world) as fwd:
            loss = fn(x)
        with _Wire(world) as bwd:
            loss.backward()
        times = []
        for _ in range(repeats):
            x.grad = None
            dist.barrier()
            t0 = time.perf_counter()
            fn(x).backward()
            times.append(time.perf_counter() - t0)
        results[name] = dict(loss=float(loss), time_s=statistics.median(times),
                             collectives_fwd=fwd.count, collectives_bwd=bwd.count,
                             wire_bytes_per_row=(fwd.bytes + bwd.bytes) / rows)
    try:  # torch's DTensor loss_parallel
        import torch.nn.functional as F
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard
        from torch.distributed.tensor.debug import CommDebugMode
        from torch.distributed.tensor.parallel import loss_parallel
        mesh = init_device_mesh("cpu", (world,))

        def run_lp(x):  # call inside loss_parallel(), backward too (contexts do not nest)
            return F.cross_entropy(DTensor.from_local(x, mesh, [Shard(1)]), target)

        x = local.clone().requires_grad_(True)
        with loss_parallel():
            run_lp(x).backward()
        with CommDebugMode() as cm, loss_parallel():
            loss = run_lp(x)
        n_fwd = cm.get_total_counts()
        with CommDebugMode() as cm, loss_parallel():
            loss.backward()
        n_bwd = cm.get_total_counts()
        times = []
        for _ in range(repeats):
            x.grad = None
            dist.barrier()
            t0 = time.perf_counter()
            with loss_parallel():
                run_lp(x).backward()
            times.append(time.perf_counter() - t0)
        results["loss_parallel"] = dict(loss=float(loss.full_tensor()), time_s=statistics.median(times),
                                        collectives_fwd=n_fwd, collectives_bwd=n_bwd,
                                        wire_bytes_per_row=None)
    except Exception as exc:  # report why, do not fail the benchmark
        results["loss_parallel"] = dict(error=f"{type(exc).__name__}: {str(exc)[:150]}")
    if rank == 0:
        dense = float(gt.cross_entropy(logits.double(), target))
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(dict(results=results, dense_loss=dense), f)
    dist.destroy_process_group()


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, nargs="+", default=[2, 4])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--classes", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "results", "vocab_parallel_cpu"))
    args = p.parse_args(argv)
    docs = []
    for world in args.world:
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(_worker, args=(world, _port(), args.rows, args.classes, args.repeats, d),
                     nprocs=world, join=True)
            with open(os.path.join(d, "result.json")) as f:
                docs.append(dict(world=world, **json.load(f)))
    lines = [f"Vocab-parallel CE fwd+bwd on gloo (CPU, 1 thread per rank), N = {args.rows} rows, "
             f"V = {args.classes} (even shards), fp32, median of {args.repeats} runs on rank 0.", "",
             "| ranks | impl | collectives fwd / bwd | wire bytes per row per rank | time (ms) | × gpuce | |loss - dense| |",
             "|---|---|---|---|---|---|---|"]
    for doc in docs:
        base = doc["results"]["gpuce"]["time_s"]
        for name, r in doc["results"].items():
            if "error" in r:
                lines.append(f"| {doc['world']} | {name} | did not run: {r['error']} | | | | |")
                continue
            wire = "n/a" if r["wire_bytes_per_row"] is None else f"{r['wire_bytes_per_row']:.1f}"
            lines.append(f"| {doc['world']} | {name} | {r['collectives_fwd']} / {r['collectives_bwd']} | "
                         f"{wire} | {1e3 * r['time_s']:.1f} | {r['time_s'] / base:.2f} | "
                         f"{abs(r['loss'] - doc['dense_loss']):.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(dict(args=vars(args), runs=docs), f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
