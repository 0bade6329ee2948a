"""The short table that benchmarks/gpu_check.sh prints last, from a ``gpuce bench --json`` run.

Per shape and dtype: gpuce's fused loss+grad (``ce_fwd_bwd``; the default call, and with
``out=``) against PyTorch eager forward+backward and CuPy (log_softmax + gather), as median
ms over CUDA-event-timed runs, GB/s (2·N·C·size + 8N bytes over the time) and % of the
device-to-device copy measured in the same run; then issue 3's targets: >= 2x PyTorch eager
and >= 80% of the copy bandwidth.

    python benchmarks/gpu_bench.py results.json [--markdown summary.md]
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json_path")
    ap.add_argument("--markdown", help="also write the table here")
    ap.add_argument("--op", default="ce_fwd_bwd")
    args = ap.parse_args(argv)
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
