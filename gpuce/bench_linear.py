"""``gpuce bench --op linear_ce``: linear layer + cross-entropy, fwd+bwd, time and peak memory.

    gpuce bench --op linear_ce [--shape N,H,V] [--dtypes fp32 bf16] [--impls ...]
                [--repeats R] [--rounds K] [--quick] [--json PATH] [--markdown PATH]

Implementations (torch, on the CPU or one GPU):
- ``naive``: ``logits = hidden @ classifier.T``, ``F.cross_entropy``, ``loss.backward()``.
- ``unchunked``: the same parts as gpuce's, without chunks: one matmul, gpuce's fused
  loss+grad kernel in place on the whole (N, V) logits, two matmuls for the gradients.
- ``unchunked_fp32acc`` (half dtypes only): the same, with the classifier's gradient GEMM in
  fp32 on upcast operands (exact products summed in fp32; torch's CPU has no bf16 GEMM with
  an fp32 output), the price of an fp32 weight gradient without chunking.
- ``gpuce``: ``gpuce.torch.linear_cross_entropy`` (default memory budget), fwd+bwd.
- ``cce``: Apple's cut-cross-entropy, ``impl="torch_compile"`` (runs on the CPU), if installed.
- ``liger``: Liger-Kernel's LigerFusedLinearCrossEntropyLoss, on a GPU only.

Method: every case runs in a FRESH process (so one case's allocator cache or compiled code
cannot lower another's peak). The process builds the inputs, runs one untimed fwd+bwd (JIT
and torch.compile warm-up), frees the gradients, resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``), runs one fwd+bwd and reads the peak (VmHWM). Peak extra memory =
peak RSS - RSS before that run (inputs included) - the returned gradients' bytes. Then the
median time of ``--repeats`` fwd+bwd runs. On CUDA the same with torch's peak allocator
statistics. Ratios compare implementations measured in the same run; ``--rounds K`` runs
the whole set K times, interleaved, and reports medians over the rounds (for a loaded
machine, whose load then falls on every case alike).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

IMPLS = ("naive", "unchunked", "unchunked_fp32acc", "gpuce", "cce", "liger")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}


# ---- the child: one implementation, one dtype, one shape ----------------------------------

def _rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _make_step(impl, device):
    import torch
    import torch.nn.functional as F

    if impl == "naive":
        def step(h, c, y):
            loss = F.cross_entropy(h @ c.t(), y)
            loss.backward()
            return loss, (h.grad, c.grad)
    elif impl == "unchunked":
        import gpuce

        def step(h, c, y):
            with torch.no_grad():
                logits = h @ c.t()
                loss, g = gpuce.cross_entropy_with_grad(logits, y, inplace=True)
                return loss, (g @ c, g.t() @ h)
    elif impl == "unchunked_fp32acc":
        import gpuce

        def step(h, c, y):
            with torch.no_grad():
                logits = h @ c.t()
                loss, g = gpuce.cross_entropy_with_grad(logits, y, inplace=True)
                return loss, (g @ c, (g.t().float() @ h.float()).to(c.dtype))
    elif impl == "gpuce":
        import gpuce.torch as gt

        def step(h, c, y):
            loss = gt.linear_cross_entropy(h, c, y)
            loss.backward()
            return loss, (h.grad, c.grad)
    elif impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def step(h, c, y):
            loss = linear_cross_entropy(h, c, y, impl="torch_compile")
            loss.backward()
            return loss, (h.grad, c.grad)
    elif impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        fn = LigerFusedLinearCrossEntropyLoss()

        def step(h, c, y):
            loss = fn(c, h, y)
            loss.backward()
            return loss, (h.grad, c.grad)
    else:
        raise ValueError(impl)
    return step


def child(impl, dtype, n, h_dim, v, repeats, device):
    import torch
    td = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h_dim, generator=g).to(device=device, dtype=td).requires_grad_(True)
    classifier = (torch.randn(v, h_dim, generator=g) * 0.02).to(device=device, dtype=td)
    classifier.requires_grad_(True)
    target = torch.randint(0, v, (n,), generator=g).to(device)
    step = _make_step(impl, device)
    cuda = device == "cuda"

    def run():
        hidden.grad = classifier.grad = None
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, grads = step(hidden, classifier, target)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, float(loss), grads

    run()  # warm-up: JIT, torch.compile, first-touch of the allocator
    hidden.grad = classifier.grad = None
    import gc
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        base = _rss("VmRSS")
    _, loss, grads = run()
    peak = torch.cuda.max_memory_allocated() if cuda else _rss("VmHWM")
    grad_bytes = sum(t.numel() * t.element_size() for t in grads)
    del grads
    times = [run()[0] for _ in range(repeats)]
    return dict(impl=impl, dtype=dtype, shape=[n, h_dim, v], loss=loss,
                time_s=statistics.median(times), times=times,
                peak_extra_bytes=peak - base - grad_bytes, device=device)


# ---- the parent: one fresh process per case -----------------------------------------------

def _available(impl, device):
    """None if it can run here, else the reason it is skipped."""
    import importlib.util
    if impl == "cce" and importlib.util.find_spec("cut_cross_entropy") is None:
        return "cut-cross-entropy is not installed (pip install cut-cross-entropy)"
    if impl == "liger":
        if device != "cuda":
            return "Liger's FusedLinearCrossEntropy needs a GPU (Triton)"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed"
    return None


def run_case(impl, dtype, shape, repeats, device, timeout=1800):
    cmd = [sys.executable, "-m", "gpuce.bench_linear", "--child", impl, dtype,
           ",".join(map(str, shape)), str(repeats), device]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this gpuce, wherever cwd is
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(impl=impl, dtype=dtype, shape=list(shape), error=tail[:200])
    return json.loads(lines[-1])


def _over_rounds(runs):
    """One case's rounds as one row: median time and median peak over the rounds that ran."""
    ok = [r for r in runs if "time_s" in r]
    if not ok:
        return runs[-1]
    row = dict(ok[0], rounds=len(ok), times=[t for r in ok for t in r["times"]])
    row["time_s"] = statistics.median(r["time_s"] for r in ok)
    row["peak_extra_bytes"] = int(statistics.median(r["peak_extra_bytes"] for r in ok))
    return row


def format_markdown(doc):
    n, h, v = doc["shape"]
    out = [f"Linear + cross-entropy fwd+bwd, (N, H, V) = ({n}, {h}, {v}), {doc['device']}, "
           f"median of {doc['repeats']} runs" + (
               f", median over {doc['rounds']} interleaved rounds" if doc.get("rounds", 1) > 1
               else "") + "; peak extra memory = peak RSS above inputs and "
           "returned gradients, fresh process per case.", "",
           "| dtype | impl | time (s) | × unchunked | peak extra (MiB) | × naive memory | loss |",
           "|---|---|---|---|---|---|---|"]
    for dt in doc["dtypes"]:
        rows = [r for r in doc["results"] if r["dtype"] == dt]
        ref_t = next((r["time_s"] for r in rows if r["impl"] == "unchunked" and "time_s" in r), None)
        ref_m = next((r["peak_extra_bytes"] for r in rows if r["impl"] == "naive"
                      and "peak_extra_bytes" in r), None)
        for r in rows:
            if "skipped" in r or "error" in r:
                why = r.get("skipped") or "error: " + r["error"]
                out.append(f"| {dt} | {r['impl']} | {why} | | | | |")
                continue
            tr = f"{r['time_s'] / ref_t:.2f}" if ref_t else "-"
            mr = f"{r['peak_extra_bytes'] / ref_m:.3f}" if ref_m else "-"
            out.append(f"| {dt} | {r['impl']} | {r['time_s']:.3f} | {tr} | "
                       f"{r['peak_extra_bytes'] / 2**20:.1f} | {mr} | {r['loss']:.5f} |")
    return "\n".join(out) + "\n"


def build_parser():
    p = argparse.ArgumentParser(prog="gpuce bench --op linear_ce", description=__doc__.split("\n")[0])
    p.add_argument("--op", default="linear_ce", choices=["linear_ce"])
    p.add_argument("--shape", default=None, help="N,H,V (default 4096,512,32000)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole set of cases this many times, interleaved (a loaded "
                        "machine then slows every case alike); report medians over rounds")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="(1024, 256, 8000), 2 repeats")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--markdown", metavar="PATH")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        impl, dtype, shape, repeats, device = argv[1:6]
        n, h, v = map(int, shape.split(","))
        print(json.dumps(child(impl, dtype, n, h, v, int(repeats), device)))
        return 0
    args = build_parser().parse_args(argv)
    shape = [int(x) for x in (args.shape or ("1024,256,8000" if args.quick
                                             else "4096,512,32000")).split(",")]
    repeats = 2 if args.quick and args.repeats == 3 else args.repeats
    cases = [(dt, impl) for dt in args.dtypes for impl in args.impls
             if not (impl == "unchunked_fp32acc" and dt in ("fp32", "fp64"))]  # = unchunked
    runs = {case: [] for case in cases}
    for r in range(args.rounds):
        for dt, impl in cases:
            why = _available(impl, args.device)
            if why:
                runs[dt, impl] = [dict(impl=impl, dtype=DTYPES[dt], skipped=why)]
                continue
            print(f"  round {r + 1}/{args.rounds}: {impl} {dt} ...", file=sys.stderr, flush=True)
            runs[dt, impl].append(run_case(impl, DTYPES[dt], shape, repeats, args.device))
    results = [_over_rounds(runs[case]) for case in cases]
    doc = dict(shape=shape, device=args.device, repeats=repeats, rounds=args.rounds,
               results=results,
               dtypes=[DTYPES[d] for d in args.dtypes], cpu_count=os.cpu_count(),
               date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    text = format_markdown(doc)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
