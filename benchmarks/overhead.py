"""Microseconds per call for tiny shapes: gpuce against torch, on the CPU (fp32).

    python benchmarks/overhead.py [--shapes 32x10,256x10] [--out benchmarks/results/overhead.md]

Each figure is the best (minimum) over rounds of the mean time of many back-to-back calls
(the timeit convention: on a shared machine the other rounds measure the neighbours), every
column of a row taken in the same run. The CUDA host path is timed by
benchmarks/overhead_cuda.py (launches recorded, not executed), appended when present.
"""
import argparse
import os
import subprocess
import sys
import time

import numpy as np


CLOCK = time.perf_counter  # --clock cpu: time.process_time (this process's CPU time only)


def per_call_us(fn, min_time=0.15, rounds=15):
    fn()
    n = 1
    while True:
        t0 = CLOCK()
        for _ in range(n):
            fn()
        dt = CLOCK() - t0
        if dt >= min_time / rounds:
            break
        n *= 2
    times = []
    for _ in range(rounds):
        t0 = CLOCK()
        for _ in range(n):
            fn()
        times.append((CLOCK() - t0) / n)
    return min(times) * 1e6


def cases(n, c):
    import torch
    import torch.nn.functional as F

    import gpuce
    import gpuce.torch as gt

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c), dtype=np.float32)
    y = rng.integers(0, c, n)
    xt, yt = torch.from_numpy(x.copy()), torch.from_numpy(y)
    leaf_g, leaf_t = xt.clone().requires_grad_(), xt.clone().requires_grad_()

    def gpuce_fwd_bwd():
        leaf_g.grad = None
        gt.cross_entropy(leaf_g, yt).backward()

    def torch_fwd_bwd():
        leaf_t.grad = None
        F.cross_entropy(leaf_t, yt).backward()

    def torch_ce_with_grad():  # the closest torch has: loss and grad by autograd.grad
        a = xt.requires_grad_()
        loss = F.cross_entropy(a, yt)
        torch.autograd.grad(loss, a)
        xt.requires_grad_(False)

    return [
        ("softmax", lambda: gpuce.softmax(x), lambda: torch.softmax(xt, -1)),
        ("log_softmax", lambda: gpuce.log_softmax(x), lambda: torch.log_softmax(xt, -1)),
        ("cross_entropy", lambda: gpuce.cross_entropy(x, y), lambda: F.cross_entropy(xt, yt)),
        ("cross_entropy_with_grad", lambda: gpuce.cross_entropy_with_grad(x, y),
         torch_ce_with_grad),
        ("gpuce.torch fwd+bwd", gpuce_fwd_bwd, torch_fwd_bwd),
    ]


def autograd_rows(shapes):
    """gpuce.torch fwd+bwd against torch's and against the raw fused call, same run."""
    import torch
    import torch.nn.functional as F

    import gpuce
    import gpuce.torch as gt
    lines = ["| N × C | gpuce.torch ms | torch ms | raw gpuce ms | torch / gpuce.torch "
             "| gpuce.torch / raw |", "|---|---:|---:|---:|---:|---:|"]
    for shape in shapes.split(","):
        n, c = (int(v) for v in shape.split("x"))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, c, generator=g)
        y = torch.randint(0, c, (n,), generator=g)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()

        def ours():
            a.grad = None
            gt.cross_entropy(a, y).backward()

        def theirs():
            b.grad = None
            F.cross_entropy(b, y).backward()

        def raw():
            gpuce.cross_entropy_with_grad(x, y)

        t = [per_call_us(f, min_time=1.0, rounds=9) / 1e3 for f in (ours, theirs, raw)]
        lines.append(f"| {n} × {c} | {t[0]:.2f} | {t[1]:.2f} | {t[2]:.2f} | {t[1] / t[0]:.2f}× "
                     f"| {t[0] / t[2]:.2f}× |")
        print(lines[-1], flush=True)
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="32x10,256x10,32x1000")
    p.add_argument("--autograd-shapes", default="2048x4096,8192x1000,1024x8192,512x32000",
                   help="gpuce.torch fwd+bwd vs torch vs the raw fused call ('' to skip)")
    p.add_argument("--threads", type=int, default=None, help="torch/numba threads (default: all)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: process CPU time, for a loaded machine (all threads summed)")
    p.add_argument("--out", default=None, help="also write the markdown here")
    args = p.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
        import numba
        numba.set_num_threads(args.threads)
    lines = ["| N × C | call | gpuce µs | torch µs | gpuce / torch |", "|---|---|---:|---:|---:|"]
    for shape in args.shapes.split(","):
        n, c = (int(v) for v in shape.split("x"))
        for name, ours, theirs in cases(n, c):
            a, b = per_call_us(ours), per_call_us(theirs)
            lines.append(f"| {n} × {c} | {name} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
            print(lines[-1], flush=True)
    text = ("## CPU, fp32 (torch " + torch.__version__ + ", " + str(torch.get_num_threads()) +
            f" threads, {args.clock} clock)\n\n" + "\n".join(lines) + "\n")
    if args.autograd_shapes:
        text += ("\n## gpuce.torch forward+backward at training shapes (fp32, "
                 "`loss.backward()`)\n\n" + "\n".join(autograd_rows(args.autograd_shapes)) + "\n")
    here = os.path.dirname(os.path.abspath(__file__))
    cuda_script = os.path.join(here, "overhead_cuda.py")
    if os.path.exists(cuda_script):
        res = subprocess.run([sys.executable, cuda_script], capture_output=True, text=True)
        text += "\n## CUDA host path (launches recorded)\n\n" + res.stdout
        if res.returncode:
            text += f"\n(overhead_cuda.py failed, exit {res.returncode}: {res.stderr[-2000:]})\n"
    else:
        text += "\n## CUDA host path\n\nbenchmarks/overhead_cuda.py is absent: not measured.\n"
    print()
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Per-call overhead (`python benchmarks/overhead.py`)\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
