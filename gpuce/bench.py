"""``gpuce bench``: throughput of gpuce against every installed peer, in one run.

    gpuce bench [--quick] [--device cpu|cuda] [--ops ...] [--dtypes ...]
                [--classes ...] [--shapes NxC,...] [--size-mb MB] [--impls ...]
                [--threads N] [--json PATH] [--plot PATH] [--markdown PATH]
    gpuce bench --load results.json [--plot PATH] [--markdown PATH]   # re-render only

What it measures
----------------
ops: ``softmax``, ``log_softmax`` (last axis), ``ce_fwd`` (mean cross-entropy over rows of
integer class indices) and ``ce_fwd_bwd`` (that loss and its gradient with respect to the
logits; gpuce computes both in one fused pass). The sweep runs over C with N chosen so that
each case's logits take ``--size-mb`` (64 MB on CPU, 256 MB on GPU by default), or over the
exact ``--shapes``.

Bytes: one read of the logits, one write of each output of the logits' size, and one read
of the int64 targets (see ``bench_core.op_bytes``). GB/s = bytes / median time.

The floor: a copy of the logits into a preallocated buffer on the same device in the same
run (``np.copyto`` on CPU, a device-to-device copy on GPU) -- one read and one write.
Its bandwidth (2 * N * C * itemsize / time) is the yardstick: an op's floor time is its own
bytes at that bandwidth, and "% of floor" is its GB/s over the copy's GB/s. A read-only op
(ce_fwd) can pass 100%: reading is cheaper than copying.

Method: every result is first compared with a float64 reference (gpuce's on every row,
peers' on rows spread over the array); a result that fails is reported as wrong and never
timed. Then warm-up runs, then the median of repeated runs (perf_counter on CPU, CUDA events
on GPU), cycling through enough copies of the inputs that together they exceed twice the
last-level cache (the L2 on GPU). CPU thread counts are fixed for the run and reported.

JSON (``--json``)
-----------------
{
  "schema": "gpuce-bench/1",
  "created": "2026-01-01T00:00:00+00:00",
  "machine": {"cpu", "cores_logical", "cores_usable", "memory_bytes", "llc_bytes", "os",
              "python", "versions": {package: version}, "gpu": null | {"name", ...},
              "load_average"},
  "config":  {"device", "ops", "dtypes", "shapes": [[n, c], ...] | null, "classes",
              "size_mb", "quick", "warmup", "repeats", "budget_s", "rotate_bytes",
              "threads": {"numba", "torch", ...}, "floor": "np.copyto" | ..., "argv",
              "load_average_start": [1, 5, 15 min] | null},
  "impls":   [{"impl", "label", "note", "is_gpuce"}],
  "cases":   [{"dtype", "n", "c", "rotation", "copy_ms", "floor_gbps"}],
  "results": [{"op", "dtype", "n", "c", "bytes", "impl", "ms", "gbps", "pct_floor",
               "floor_ms", "checked", "max_err", "loss_err", "rows_checked",
               "ms_min", "ms_q1", "ms_q3", "runs", "error"}],
  "skipped": [{"impl", "reason", "op", "dtype"}]
}
``ms`` is the median. ``checked`` is true when the result matched the reference; a result
with ``checked`` false has ``ms``, ``gbps`` and ``pct_floor`` null and says why in ``error``.
``skipped`` lists each peer (or peer, op, dtype) that did not run, with the reason; ``op``
and ``dtype`` are null when the whole peer is missing.
"""
import argparse
import datetime
import gc
import json
import math
import sys

from . import bench_core as core
from .bench_peers import registry

SCHEMA = "gpuce-bench/1"
FULL_CLASSES = (10, 128, 1000, 4096, 32000, 128256, 262144)
QUICK_CLASSES = (128, 1000, 32000)
DEFAULTS = {
    # device: (dtypes, size_mb, warmup, repeats, budget_s)
    "cpu": (("float32", "bfloat16"), 64, 2, 15, 3.0),
    "cuda": (("float32", "bfloat16", "float16"), 256, 5, 100, 1.0),
}
QUICK = {
    "cpu": (("float32",), 16, 1, 5, 0.5),
    "cuda": (("float32",), 64, 3, 30, 0.3),
}
QUICK_OPS = ("softmax", "ce_fwd_bwd")
ROTATE_CAP = 1 << 30  # at most 1 GiB of rotated inputs


# ---- command line ----------------------------------------------------------------------

def _split(values):
    out = []
    for v in values or ():
        out.extend(p for p in v.replace(",", " ").split() if p)
    return out


def _shape(text):
    try:
        n, c = text.lower().split("x")
        n, c = int(n), int(c)
        if n < 1 or c < 1:
            raise ValueError
        return n, c
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: expected NxC, e.g. 4096x32000")


def build_parser():
    p = argparse.ArgumentParser(
        prog="gpuce bench",
        description="Throughput of gpuce's softmax and cross-entropy against every installed "
                    "peer, with a copy of the same bytes as the floor.")
    p.add_argument("--quick", action="store_true",
                   help="a reduced sweep: C in 128, 1000, 32000; fp32; softmax and the fused "
                        "loss+grad; 16 MB per case on CPU (64 MB on GPU); few repeats")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="default: cuda if a GPU is usable, else cpu")
    p.add_argument("--ops", nargs="+", metavar="OP",
                   help=f"some of {', '.join(core.OPS)} (default: all)")
    p.add_argument("--dtypes", nargs="+", metavar="DTYPE",
                   help="fp32, bf16, fp16, fp64 (default: fp32 bf16 on CPU; fp32 bf16 fp16 on GPU)")
    p.add_argument("--classes", nargs="+", metavar="C",
                   help=f"class counts to sweep (default: {' '.join(map(str, FULL_CLASSES))})")
    p.add_argument("--shapes", nargs="+", metavar="NxC",
                   help="exact shapes instead of the sweep, e.g. 4096x32000,65536x1000")
    p.add_argument("--size-mb", type=float,
                   help="logits size per case in the sweep, MB (default: 64 on CPU, 256 on GPU)")
    p.add_argument("--impls", nargs="+", metavar="NAME",
                   help="only these implementations (gpuce, gpuce_out, torch, numpy, scipy, jax, "
                        "torch_compile, cupy, liger)")
    p.add_argument("--skip-impls", nargs="+", metavar="NAME", help="leave these out")
    p.add_argument("--threads", type=int, help="threads for numba and torch (default: theirs)")
    p.add_argument("--warmup", type=int, help="untimed runs before timing")
    p.add_argument("--repeats", type=int, help="most timed runs per implementation and case")
    p.add_argument("--budget", type=float, metavar="S",
                   help="seconds per implementation and case after which no more runs start "
                        "(at least 3 runs are always taken)")
    p.add_argument("--rotate-mb", type=float,
                   help="cycle through copies of the inputs adding up to this many MB "
                        "(default: twice the last-level cache, at most 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write every number and the machine here")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of GB/s against C here")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown here")
    p.add_argument("--load", metavar="PATH",
                   help="read a JSON written by --json and only print/plot it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: tiny cases
    return p


def config_from_args(args):
    """The run's configuration (a plain dict, stored in the JSON) from parsed arguments."""
    device = args.device or core.default_device()
    dtypes, size_mb, warmup, repeats, budget = (QUICK if args.quick else DEFAULTS)[device]
    classes = QUICK_CLASSES if args.quick else FULL_CLASSES
    ops = QUICK_OPS if args.quick else core.OPS
    rotate_mb = None
    if args.tiny:
        dtypes, size_mb, warmup, repeats, budget = ("float32",), 0.02, 1, 2, 0.05
        classes, rotate_mb = (10, 128), 0.1
    if args.ops:
        ops = _split(args.ops)
        bad = [o for o in ops if o not in core.OPS]
        if bad:
            raise SystemExit(f"gpuce bench: unknown op(s) {', '.join(bad)}; "
                             f"expected some of {', '.join(core.OPS)}")
    if args.dtypes:
        try:
            dtypes = [core.canonical_dtype(d) for d in _split(args.dtypes)]
        except ValueError as exc:
            raise SystemExit(f"gpuce bench: {exc}")
    if args.classes:
        classes = [int(c) for c in _split(args.classes)]
    try:
        shapes = [_shape(s) for s in _split(args.shapes)] if args.shapes else None
    except argparse.ArgumentTypeError as exc:
        raise SystemExit(f"gpuce bench: {exc}")
    size_mb = args.size_mb if args.size_mb is not None else size_mb
    warmup = args.warmup if args.warmup is not None else warmup
    repeats = args.repeats if args.repeats is not None else repeats
    budget = args.budget if args.budget is not None else budget
    rotate_mb = args.rotate_mb if args.rotate_mb is not None else rotate_mb
    return {
        "device": device, "ops": list(dict.fromkeys(ops)), "dtypes": list(dict.fromkeys(dtypes)),
        "classes": list(classes), "shapes": [list(s) for s in shapes] if shapes else None,
        "size_mb": size_mb, "quick": bool(args.quick), "warmup": warmup, "repeats": repeats,
        "budget_s": budget, "rotate_mb": rotate_mb, "seed": args.seed,
        "impls": _split(args.impls) or None, "skip_impls": _split(args.skip_impls) or None,
        "threads_requested": args.threads,
    }


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--op" in argv and "linear_ce" in argv:  # linear + CE: time and memory, gpuce/bench_linear.py
        from .bench_linear import main as linear_main
        return linear_main(argv)
    args = build_parser().parse_args(argv)
    if args.load:
        with open(args.load) as f:
            doc = json.load(f)
    else:
        cfg = config_from_args(args)
        if cfg["device"] == "cuda" and not core.CudaDevice.available():
            print("gpuce bench: --device cuda, but no usable GPU (torch with CUDA or CuPy)",
                  file=sys.stderr)
            return 2
        if args.threads is not None:
            try:
                core.set_threads(args.threads)
            except ValueError as exc:
                print(f"gpuce bench: {exc}", file=sys.stderr)
                return 2
        doc = run(cfg, progress=not args.no_progress, argv=argv)
    print(format_report(doc))
    if args.json and not args.load:
        write_json(doc, args.json)
        print(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(doc))
        print(f"wrote {args.markdown}")
    if args.plot:
        try:
            plot(doc, args.plot)
        except ImportError as exc:
            print(f"gpuce bench: --plot needs matplotlib (pip install gpuce[plot]): {exc}",
                  file=sys.stderr)
            return 2
        print(f"wrote {args.plot}")
    return 1 if gpuce_failed(doc) else 0


def gpuce_failed(doc):
    """gpuce gave a wrong result, raised, or could not run at all (its backend missing)."""
    mine = {i["impl"] for i in doc["impls"] if i["is_gpuce"]}
    return (any(r["impl"] in mine and not r["checked"] for r in doc["results"]) or
            any(s["impl"] in mine and s["op"] is None for s in doc["skipped"]))


# ---- the run ---------------------------------------------------------------------------

def plan_shapes(cfg, dtype):
    """(n, c) for each case of one dtype."""
    if cfg["shapes"]:
        return [tuple(s) for s in cfg["shapes"]]
    size = cfg["size_mb"] * core.MiB
    return [(core.rows_for(c, core.ITEMSIZE[dtype], size), c) for c in cfg["classes"]]


def select_impls(cfg, impls):
    names = {i.name for i in impls}
    for chosen in (cfg.get("impls") or []) + (cfg.get("skip_impls") or []):
        if chosen not in names:
            raise SystemExit(f"gpuce bench: unknown implementation {chosen!r} on "
                             f"{cfg['device']}; expected some of {', '.join(sorted(names))}")
    if cfg.get("impls"):
        impls = [i for i in impls if i.name in cfg["impls"]]
    if cfg.get("skip_impls"):
        impls = [i for i in impls if i.name not in cfg["skip_impls"]]
    return impls


def run(cfg, impls=None, progress=True, argv=None, device=None):
    """Run the benchmark described by ``cfg``; returns the JSON document (a dict).
    ``impls`` and ``device`` replace the registry's and the real device (tests)."""
    from tqdm import tqdm

    device = core.make_device(cfg["device"]) if device is None else device
    load_start = core.load_average()
    impls = select_impls(cfg, registry(device.kind) if impls is None else impls)
    skipped, usable = [], []
    for impl in impls:
        reason = impl.available(device)
        if reason:
            skipped.append({"impl": impl.name, "reason": reason, "op": None, "dtype": None})
        else:
            usable.append(impl)

    if cfg.get("rotate_mb") is not None:
        rotate_bytes = int(cfg["rotate_mb"] * core.MiB)
    else:
        rotate_bytes = min(2 * (device.cache_bytes or 64 * core.MiB), ROTATE_CAP)
    timer_kw = dict(warmup=cfg["warmup"], repeats=cfg["repeats"], budget_s=cfg["budget_s"])
    timer = device.timer(**timer_kw)

    plan = [(dt, n, c) for dt in cfg["dtypes"] for n, c in plan_shapes(cfg, dt)]
    total = len(plan) * (1 + len(cfg["ops"]) * len(usable))
    cases, results = [], []
    seen_skip = set()
    bar = tqdm(total=total, desc="gpuce bench", unit="run", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    try:
        for dtype, n, c in plan:
            bar.set_postfix_str(f"{core.SHORT[dtype]} {n}x{c} inputs")
            try:
                case = core.make_case(device, dtype, n, c, rotate_bytes, seed=cfg["seed"])
            except Exception as exc:  # e.g. an array library without bf16
                skipped.append({"impl": "all", "op": None, "dtype": dtype,
                                "reason": f"could not make {n}x{c} {dtype} inputs on "
                                          f"{device.kind}: {type(exc).__name__}: {exc}"})
                bar.update(1 + len(cfg["ops"]) * len(usable))
                continue
            copy_ms = measure_floor(case, timer)
            floor_gbps = core.gbps(core.copy_bytes(n, c, case.itemsize), copy_ms)
            cases.append({"dtype": dtype, "n": n, "c": c, "rotation": case.k,
                          "copy_ms": copy_ms, "floor_gbps": floor_gbps})
            bar.update(1)
            for op in cfg["ops"]:
                for impl in usable:
                    bar.set_postfix_str(f"{core.SHORT[dtype]} {n}x{c} {op} {impl.name}")
                    row = bench_one(impl, op, case, timer, floor_gbps, skipped, seen_skip)
                    if row is not None:
                        results.append(row)
                    bar.update(1)
            del case
            gc.collect()
    finally:
        bar.close()

    config = dict(cfg)
    config.update(rotate_bytes=rotate_bytes, threads=core.thread_counts(),
                  load_average_start=load_start,
                  floor=device.floor_name, argv=list(argv) if argv is not None else sys.argv[1:])
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": core.machine_info(device),
        "config": config,
        "impls": [{"impl": i.name, "label": i.label, "note": i.note, "is_gpuce": i.is_gpuce}
                  for i in impls],
        "cases": cases,
        "results": results,
        "skipped": skipped,
    }


def measure_floor(case, timer):
    dev = case.device
    dsts = [dev.empty_like(x) for x in case.xs]
    try:
        return timer.time(lambda i: dev.copy(dsts[i], case.xs[i]), k=case.k).median
    finally:
        del dsts


def bench_one(impl, op, case, timer, floor_gbps, skipped, seen_skip):
    """Check one implementation on one case, then time it: a result row, or None if skipped."""
    def skip(reason):
        key = (impl.name, op, case.dtype, reason)
        if key not in seen_skip:
            seen_skip.add(key)
            skipped.append({"impl": impl.name, "reason": reason, "op": op, "dtype": case.dtype})
        return None

    reason = impl.unsupported(op, case.dtype)
    if reason:
        return skip(reason)
    nbytes = case.bytes(op)
    row = {"op": op, "dtype": case.dtype, "n": case.n, "c": case.c, "bytes": nbytes,
           "impl": impl.name, "ms": None, "gbps": None, "pct_floor": None,
           "floor_ms": nbytes / (floor_gbps * 1e9) * 1e3, "checked": False, "max_err": None,
           "loss_err": None, "rows_checked": 0, "error": None}
    try:
        prepared = impl.setup(op, case)
        if prepared.pre:
            prepared.pre(0)
        result = prepared.run(0)
        case.device.synchronize()
    except Exception as exc:
        if not impl.is_gpuce:
            return skip(f"{type(exc).__name__}: {exc}")
        row["error"] = f"raised {type(exc).__name__}: {exc}"
        return row
    chk = core.check_result(op, case, result, full=impl.is_gpuce, strict_loss=impl.is_gpuce)
    del result
    row.update(max_err=chk.err, loss_err=chk.loss_err, rows_checked=chk.rows)
    if not chk.ok:
        row["error"] = f"wrong result: {chk.reason}"
        return row
    try:
        timing = timer.time(prepared.run, prepared.pre, k=case.k)
    except Exception as exc:
        row["error"] = f"raised while timed: {type(exc).__name__}: {exc}"
        return row
    finally:
        del prepared
    row.update(timing.summary())
    row["checked"] = True
    row["gbps"] = core.gbps(nbytes, row["ms"])
    row["pct_floor"] = 100.0 * row["gbps"] / floor_gbps
    return row


def write_json(doc, path):
    with open(path, "w") as f:
        json.dump(_finite(doc), f, indent=1, allow_nan=False, default=_jsonable)
        f.write("\n")


def _finite(v):
    """The document with NaN and infinities as null: strict JSON, and a run is never lost."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _jsonable(v):
    if hasattr(v, "item"):
        return v.item()
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


# ---- tables ----------------------------------------------------------------------------

def _impl_order(doc):
    present = {r["impl"] for r in doc["results"]}
    return [i for i in doc["impls"] if i["impl"] in present]


def _groups(doc):
    """{(op, dtype, n, c): {impl: row}} in run order."""
    groups = {}
    for r in doc["results"]:
        groups.setdefault((r["op"], r["dtype"], r["n"], r["c"]), {})[r["impl"]] = r
    return groups


def _floor_gbps(doc, dtype, n, c):
    for case in doc["cases"]:
        if (case["dtype"], case["n"], case["c"]) == (dtype, n, c):
            return case["floor_gbps"]
    return None


def summarise(rows):
    """Headline numbers of one case: gpuce's speedup over torch and over the best peer (by
    time, default gpuce call), the best peer, and each gpuce variant's ratio to the floor."""
    ok = {k: r for k, r in rows.items() if r["checked"]}
    g = ok.get("gpuce")
    peers = {k: r for k, r in ok.items() if not k.startswith("gpuce")}
    best = min(peers, key=lambda k: peers[k]["ms"]) if peers else None
    out = {"best_peer": best, "vs_best": None, "vs_torch": None}
    if g and best:
        out["vs_best"] = peers[best]["ms"] / g["ms"]
    if g and "torch" in peers:
        out["vs_torch"] = peers["torch"]["ms"] / g["ms"]
    for k in ("gpuce", "gpuce_out"):
        if k in ok:
            out[f"{k}_floor_ratio"] = ok[k]["ms"] / ok[k]["floor_ms"]
            out[f"{k}_pct_floor"] = ok[k]["pct_floor"]
    return out


def _fmt(v, digits=1, suffix=""):
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}{suffix}"
    if v >= 10:
        return f"{v:.{max(digits - 1, 0)}f}{suffix}" if digits > 1 else f"{v:.1f}{suffix}"
    return f"{v:.{digits + 1}f}{suffix}" if v < 1 else f"{v:.{digits}f}{suffix}"


def _cell(row, key, digits=1):
    if row is None:
        return "-"
    if not row["checked"]:
        return "WRONG" if row["error"] and row["error"].startswith("wrong") else "ERROR"
    return _fmt(row[key], digits)


def table_rows(doc, kind):
    """Header and rows of the GB/s table (kind='gbps') or the ms table (kind='ms')."""
    impls = _impl_order(doc)
    head = ["op", "dtype", "N x C"] + [i["label"] for i in impls]
    if kind == "gbps":
        head += ["floor", "vs best peer", "% floor", "% floor out="]
    else:
        head += ["floor", "vs torch", "/floor", "/floor out="]
    body = []
    for (op, dtype, n, c), rows in _groups(doc).items():
        s = summarise(rows)
        line = [op, core.SHORT[dtype], f"{n}x{c}"]
        line += [_cell(rows.get(i["impl"]), "gbps" if kind == "gbps" else "ms", 2 if kind == "ms" else 1)
                 for i in impls]
        if kind == "gbps":
            best = s["best_peer"]
            label = next((i["label"] for i in impls if i["impl"] == best), best)
            line += [_fmt(_floor_gbps(doc, dtype, n, c)),
                     f"{s['vs_best']:.2f}x ({label})" if s["vs_best"] else "-",
                     _fmt(s.get("gpuce_pct_floor"), 0, "%"),
                     _fmt(s.get("gpuce_out_pct_floor"), 0, "%")]
        else:
            any_row = next(iter(rows.values()))
            line += [_fmt(any_row["floor_ms"], 2),
                     f"{s['vs_torch']:.2f}x" if s["vs_torch"] else "-",
                     f"{s['gpuce_floor_ratio']:.2f}x" if "gpuce_floor_ratio" in s else "-",
                     f"{s['gpuce_out_floor_ratio']:.2f}x" if "gpuce_out_floor_ratio" in s else "-"]
        body.append(line)
    return head, body


def _aligned(head, body):
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]
    def fmt(line):
        return "  ".join(str(x).ljust(w) if k < 3 else str(x).rjust(w)
                         for k, (x, w) in enumerate(zip(line, widths)))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(b) for b in body])


def machine_line(doc):
    m, cfg = doc["machine"], doc["config"]
    if cfg["device"] == "cuda" and m.get("gpu"):
        return f"GPU: {m['gpu'].get('name', '?')} (via {m['gpu'].get('array_library')}); CPU: {m['cpu']}"
    threads = cfg.get("threads", {})
    return (f"CPU: {m['cpu']}, {m['cores_usable']} usable cores; threads: numba "
            f"{threads.get('numba', '?')}, torch {threads.get('torch', '?')}, numpy/scipy 1")


def skipped_lines(doc):
    """What did not run and why: one line per (implementation, reason), then wrong results."""
    labels = {i["impl"]: i["label"] for i in doc["impls"]}
    grouped = {}
    for s in doc["skipped"]:
        ops, dts = grouped.setdefault((s["impl"], s["reason"]), ([], []))
        if s.get("op") and s["op"] not in ops:
            ops.append(s["op"])
        if s.get("dtype") and core.SHORT[s["dtype"]] not in dts:
            dts.append(core.SHORT[s["dtype"]])
    out = []
    for (impl, reason), (ops, dts) in grouped.items():
        where = "; ".join(x for x in (", ".join(ops), ", ".join(dts)) if x)
        out.append(f"{labels.get(impl, impl)}{' (' + where + ')' if where else ''}: {reason}")
    for r in doc["results"]:
        if not r["checked"]:
            out.append(f"{labels.get(r['impl'], r['impl'])} ({r['op']} {core.SHORT[r['dtype']]} "
                       f"{r['n']}x{r['c']}): {r['error']}")
    return out


def headlines(doc):
    """One line per (op, dtype): gpuce's speedup over PyTorch and over the best peer at
    C >= 128 (default call, ranges over the cases), and its time over the floor's at
    C >= 1000 (the out= call where there is one)."""
    by = {}
    for (op, dtype, n, c), rows in _groups(doc).items():
        by.setdefault((op, dtype), []).append((c, summarise(rows)))
    lines = []
    for (op, dtype), items in by.items():
        big = [s for c, s in items if c >= 128]
        parts = []
        vt = [s["vs_torch"] for s in big if s["vs_torch"]]
        vb = [s["vs_best"] for s in big if s["vs_best"]]
        if vt:
            parts.append(f"speedup over PyTorch {_range(vt)}")
        if vb:
            worst = min(big, key=lambda s: s["vs_best"] or math.inf)
            parts.append(f"over the best peer {_range(vb)} "
                         f"(closest: {_label(doc, worst['best_peer'])})")
        speed = f"at C >= 128: {', '.join(parts)}" if parts else ""
        out_used = any(s.get("gpuce_out_floor_ratio") for c, s in items)
        fr = [s.get("gpuce_out_floor_ratio" if out_used else "gpuce_floor_ratio")
              for c, s in items if c >= 1000]
        fr = [x for x in fr if x]
        floor = (f"at C >= 1000{' with out=' if out_used else ''}: {_range(fr)} the time of "
                 f"the floor ({doc['config'].get('floor', 'copy')})") if fr else ""
        text = "; ".join(x for x in (speed, floor) if x)
        if text:
            lines.append(f"{op} {core.SHORT[dtype]}: gpuce {text}")
    return lines


def _label(doc, impl):
    return next((i["label"] for i in doc["impls"] if i["impl"] == impl), impl)


def _range(vals):
    lo, hi = min(vals), max(vals)
    return f"{lo:.2f}x" if math.isclose(lo, hi, rel_tol=0.005) else f"{lo:.2f}-{hi:.2f}x"


def format_report(doc):
    parts = [machine_line(doc), "",
             "GB/s (higher is better; floor = a copy of the logits, GB/s counts its read and write)",
             _aligned(*table_rows(doc, "gbps")), "",
             "ms, median (lower is better; floor = the op's bytes at the copy's bandwidth)",
             _aligned(*table_rows(doc, "ms"))]
    hl = headlines(doc)
    if hl:
        parts += ["", "Headline"] + [f"  {x}" for x in hl]
    sk = skipped_lines(doc)
    if sk:
        parts += ["", "Not run"] + [f"  {x}" for x in sk]
    return "\n".join(parts)


def _md_table(head, body):
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if k < 3 else "---:" for k in range(len(head))) + "|"]
    lines += ["| " + " | ".join(str(x) for x in b) + " |" for b in body]
    return "\n".join(lines)


def format_markdown(doc):
    m, cfg = doc["machine"], doc["config"]
    vers = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    out = [f"# gpuce bench: {cfg['device'].upper()}", "",
           f"- Machine: {machine_line(doc)}",
           f"- Run: {doc['created']}, `gpuce bench {' '.join(cfg.get('argv') or [])}`",
           f"- Versions: {vers}",
           f"- Load average (1, 5, 15 min) at start: {cfg.get('load_average_start')}, at end: "
           f"{m.get('load_average')}",
           f"- Floor: {cfg.get('floor')} of the logits into a preallocated buffer, same run",
           f"- Bytes per op: one read of the logits, one write per output of the logits' size, "
           f"one read of the int64 targets", ""]
    hl = headlines(doc)
    if hl:
        out += ["## Headline", ""] + [f"- {x}" for x in hl] + [""]
    out += ["## GB/s", "", _md_table(*table_rows(doc, "gbps")), "",
            "## Median time (ms)", "", _md_table(*table_rows(doc, "ms")), "",
            "## Implementations", ""]
    out += [f"- **{i['label']}**: {i['note']}" for i in doc["impls"] if i["note"]]
    sk = skipped_lines(doc)
    if sk:
        out += ["", "## Not run", ""] + [f"- {x}" for x in sk]
    return "\n".join(out) + "\n"


# ---- plot ------------------------------------------------------------------------------

def plot(doc, path):
    """GB/s against C, one line per implementation and the floor dashed; one panel per
    (op, dtype). Needs matplotlib; uses no global pyplot state."""
    from matplotlib.figure import Figure

    panels = []
    for r in doc["results"]:
        key = (r["op"], r["dtype"])
        if key not in panels:
            panels.append(key)
    if not panels:
        raise ValueError("nothing to plot: the run has no results")
    ncols = min(len(panels), 2 if len(panels) <= 4 else 3)
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.5 * ncols, 3.8 * nrows), layout="constrained")
    labels = {i["impl"]: i["label"] for i in doc["impls"]}
    order = [i["impl"] for i in _impl_order(doc)]
    colors = {impl["impl"]: f"C{k % 10}" for k, impl in enumerate(doc["impls"])}
    for k, (op, dtype) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        rows = [r for r in doc["results"] if (r["op"], r["dtype"]) == (op, dtype)]
        for impl in order:
            pts = sorted((r["c"], r["gbps"]) for r in rows if r["impl"] == impl and r["checked"])
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, color=colors.get(impl),
                        linewidth=2.2 if impl.startswith("gpuce") else 1.2, label=labels[impl])
        shapes = {(r["n"], r["c"]) for r in rows}
        floor = sorted((c, _floor_gbps(doc, dtype, n, c)) for n, c in shapes)
        if floor:
            ax.plot(*zip(*floor), linestyle="--", color="black", linewidth=1.2,
                    label=f"floor ({doc['config'].get('floor', 'copy')})")
        ax.set_xscale("log")
        ax.set_xlabel("classes C")
        ax.set_ylabel("GB/s")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{op}, {core.SHORT[dtype]}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"gpuce bench: {machine_line(doc)}", fontsize=9)
    fig.savefig(path, dpi=110)
    return path
