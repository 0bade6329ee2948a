"""The short table that benchmarks/gpu_check.sh prints last, from a ``gpuce bench --json`` run.

Per shape and dtype: gpuce's fused loss+grad (``ce_fwd_bwd``; the default call, and with
``out=``) against PyTorch eager forward+backward and CuPy (log_softmax + gather), as median
ms over CUDA-event-timed runs, GB/s (2·N·C·size + 8N bytes over the time) and % of the
device-to-device copy measured in the same run; then issue 3's targets: >= 2x PyTorch eager
and >= 80% of the copy bandwidth.

    python benchmarks/gpu_bench.py results.json [--markdown summary.md]

Two more jobs for gpu_check.sh (on a machine with a GPU and torch):

    python benchmarks/gpu_bench.py --strategies [--roofline roofline.json] [--markdown s.md]

times every strategy that can hold each shape (forced with gpuce._cuda.force_strategy) for
cross entropy (loss + gradient into ``out=``) and softmax (into ``out=``), CUDA events,
median of 20 after 3 warm-ups, against a device-to-device copy of the same bytes measured in
the same run, and prints the static roofline's prediction (benchmarks/roofline.py --json:
the automatic plan only) and measured / predicted time;

    python benchmarks/gpu_bench.py --first-call

prints the seconds of one first ``cross_entropy_with_grad`` call in this (fresh) process,
for the CUDA disk-cache check (run it twice with the same NUMBA_CACHE_DIR: cold, warm).
"""
import argparse
import json
import sys

IMPLS = ("gpuce", "gpuce_out", "torch", "cupy")
TARGET_VS_TORCH = 2.0
TARGET_PCT_COPY = 80.0


def _ms(row):
    return None if row is None or row.get("ms") is None else row["ms"]


def _fmt(v, spec="{:.3f}"):
    return "-" if v is None else spec.format(v)


def summary(doc, op="ce_fwd_bwd"):
    rows = {}
    for r in doc["results"]:
        if r["op"] == op and r["impl"] in IMPLS:
            rows[(r["dtype"], r["n"], r["c"], r["impl"])] = r
    cases = sorted({(d, n, c) for d, n, c, _ in rows}, key=lambda k: (k[0], k[1] * k[2], k[2]))
    floors = {(c["dtype"], c["n"], c["c"]): c.get("floor_gbps") for c in doc.get("cases", [])}
    gpu = (doc.get("machine") or {}).get("gpu") or {}
    lines = [f"GPU: {gpu.get('name', '?')}; op {op}; median of CUDA-event-timed runs",
             "",
             "| shape | dtype | copy GB/s | gpuce ms | GB/s | % copy | out= % copy | torch ms "
             "| vs torch | cupy ms | vs cupy | targets |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    met_all = True
    for dt, n, c in cases:
        g = rows.get((dt, n, c, "gpuce"))
        go = rows.get((dt, n, c, "gpuce_out"))
        t = rows.get((dt, n, c, "torch"))
        cp = rows.get((dt, n, c, "cupy"))
        vs_t = _ms(t) / _ms(g) if _ms(t) and _ms(g) else None
        vs_c = _ms(cp) / _ms(g) if _ms(cp) and _ms(g) else None
        pct = g.get("pct_floor") if g else None
        pct_out = go.get("pct_floor") if go else None
        ok = (vs_t is not None and vs_t >= TARGET_VS_TORCH and
              max(pct or 0, pct_out or 0) >= TARGET_PCT_COPY)
        met_all &= ok
        lines.append(
            f"| {n}x{c} | {dt} | {_fmt(floors.get((dt, n, c)), '{:.0f}')} | {_fmt(_ms(g))} | "
            f"{_fmt(g.get('gbps') if g else None, '{:.0f}')} | {_fmt(pct, '{:.0f}%')} | "
            f"{_fmt(pct_out, '{:.0f}%')} | {_fmt(_ms(t))} | {_fmt(vs_t, '{:.2f}x')} | "
            f"{_fmt(_ms(cp))} | {_fmt(vs_c, '{:.2f}x')} | {'met' if ok else 'NOT met'} |")
    wrong = [r for r in doc["results"] if r["impl"].startswith("gpuce") and not r.get("checked")]
    lines.append("")
    lines.append(f"Targets (>= {TARGET_VS_TORCH:g}x PyTorch eager fwd+bwd, >= {TARGET_PCT_COPY:g}% "
                 f"of the copy): {'all met' if met_all and cases else 'NOT all met'}. "
                 f"gpuce results failing the reference check: {len(wrong)}.")
    return "\n".join(lines), met_all and not wrong


STRATEGY_SHAPES = ((16384, 32), (16384, 128), (16384, 512), (16384, 1000), (16384, 8192),
                   (4096, 32000), (4096, 50257), (2048, 128256), (64, 128256))


def _event_ms(torch, fn, warm=3, runs=20):
    for _ in range(warm):
        fn()
    times = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def _predictions(path):
    if not path:
        return {}
    with open(path) as f:
        doc = json.load(f)
    return {(r["op"], r["dtype"], r["n_rows"], r["n_cls"]): r.get("predicted_us")
            for r in doc.get("cases", []) if r.get("predicted_us")}


def time_strategies(roofline_json="", shapes=STRATEGY_SHAPES, dtypes=("float32", "bfloat16"),
                    budget_s=240):
    """Markdown table: every strategy x shape x dtype, measured against the model."""
    import time

    import torch

    import gpuce
    from gpuce import _cuda
    from gpuce._cuda_plan import STRATEGIES, plan_for
    pred = _predictions(roofline_json)
    limits = _cuda._device_limits(torch.cuda.current_device())
    lines = ["| op | shape | dtype | strategy | 128-bit | ms | % copy | model µs | measured / model |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    t_end = time.time() + budget_s
    for n, c in shapes:
        for dt in dtypes:
            tdt = getattr(torch, dt)
            x = torch.randn(n, c, device="cuda").to(tdt)
            y = torch.randint(0, c, (n,), device="cuda")
            out = torch.empty_like(x)
            dst = torch.empty_like(x)
            copy_ms = _event_ms(torch, lambda: dst.copy_(x))
            auto = plan_for(n, c, dt, limits).strategy
            for op in ("ce", "softmax"):
                for strategy in STRATEGIES:
                    if time.time() > t_end:
                        lines.append(f"| (time budget of {budget_s} s spent) |")
                        return "\n".join(lines)
                    try:
                        plan = plan_for(n, c, dt, limits, strategy=strategy)
                    except ValueError:
                        continue  # cannot hold this row
                    if op == "ce":
                        def fn():
                            gpuce.cross_entropy_with_grad(x, y, out=out)
                    else:
                        def fn():
                            gpuce.softmax(x, out=out)
                    try:
                        with _cuda.force_strategy(strategy):
                            ms = _event_ms(torch, fn)
                    except Exception as exc:  # e.g. block_cached refused its shared memory
                        lines.append(f"| {op} | {n}x{c} | {dt} | {strategy} | - | "
                                     f"{type(exc).__name__} | | | |")
                        continue
                    p_us = pred.get((op, dt, n, c)) if strategy == auto else None
                    ratio = f"{ms * 1e3 / p_us:.2f}" if p_us else "-"
                    mark = " (auto)" if strategy == auto else ""
                    lines.append(f"| {op} | {n}x{c} | {dt} | {strategy}{mark} | "
                                 f"{'yes' if plan.vectorized else 'no'} | {ms:.3f} | "
                                 f"{100 * copy_ms / ms:.0f}% | {_fmt(p_us, '{:.0f}')} | {ratio} |")
            torch.cuda.empty_cache()
    return "\n".join(lines)


def first_call_s():
    """Seconds of the first fused call in this process (import excluded)."""
    import time

    import numpy as np
    from numba import cuda

    import gpuce
    x = cuda.to_device(np.random.default_rng(0).standard_normal((64, 1000)).astype(np.float32))
    y = cuda.to_device(np.arange(64) % 1000)
    t0 = time.perf_counter()
    loss, grad = gpuce.cross_entropy_with_grad(x, y)
    cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json_path", nargs="?")
    ap.add_argument("--markdown", help="also write the table here")
    ap.add_argument("--op", default="ce_fwd_bwd")
    ap.add_argument("--strategies", action="store_true")
    ap.add_argument("--roofline", default="", help="benchmarks/roofline.py --json output")
    ap.add_argument("--budget", type=float, default=240, help="seconds for --strategies")
    ap.add_argument("--first-call", action="store_true")
    args = ap.parse_args(argv)
    if args.first_call:
        print(f"{first_call_s():.3f}")
        return 0
    if args.strategies:
        text = time_strategies(args.roofline, budget_s=args.budget)
        print(text)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text + "\n")
        return 0
    with open(args.json_path) as f:
        doc = json.load(f)
    text, ok = summary(doc, args.op)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
