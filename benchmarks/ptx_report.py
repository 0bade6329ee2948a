"""Registers, spills, stack and shared memory of every gpuce CUDA kernel, per target.

Compiles each kernel x dtype to PTX with numba-cuda (no GPU needed) and assembles it with
ptxas through nvJitLink (-arch=sm_XY -verbose), then prints one markdown table. Zero spills
is the bar; the exit status is 1 if any kernel spills. Kernels named ``*_vec`` are the
128-bit variants (their ld.v4 / st.v4 columns count 16-byte global accesses in the PTX).

    python benchmarks/ptx_report.py                  # every kernel, sm_80 and sm_90
    python benchmarks/ptx_report.py --main-only      # the softmax / cross-entropy kernels
    python benchmarks/ptx_report.py --targets sm_90 --filter ce_warp --ptx-dir /tmp/ptx
"""
import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    sys.exit("ptx_report.py: unset NUMBA_ENABLE_CUDASIM (the simulator compiles nothing)")

from gpuce.kernels import cuda_ptx, cuda_registry  # noqa: E402


def _one(job):
    name, key, ccs, ptx_dir = job
    try:
        out = {}
        for cc, ptx in cuda_ptx.compile_ptx(name, key, ccs).items():
            _, res = cuda_ptx.ptxas(ptx, cc)
            res["v4_loads"] = ptx.count("ld.global.v4") + ptx.count("ld.global.nc.v4")
            res["v4_stores"] = ptx.count("st.global.v4")
            res["ex2_approx"] = ptx.count("ex2.approx")
            out[cc] = res
            if ptx_dir:
                label = (cuda_ptx.key_label(key, name).replace("->", "_to_")
                         .replace(",q=", "_q_"))
                with open(os.path.join(ptx_dir, f"{name}.{label}.sm_{cc[0]}{cc[1]}.ptx"), "w") as f:
                    f.write(ptx)
        return out
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="sm_80,sm_90", help="comma-separated sm_XY list")
    ap.add_argument("--main-only", action="store_true",
                    help="only the softmax / cross-entropy kernels (not the small helpers)")
    ap.add_argument("--filter", default="", help="only kernels whose name contains this")
    ap.add_argument("--ptx-dir", default="", help="also write each kernel's PTX here")
    ap.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args(argv)
    ccs = tuple((int(t[3:-1]), int(t[-1])) for t in args.targets.split(","))
    specs = [s for s in cuda_registry.all_specs(main_only=args.main_only) if args.filter in s[0]]
    if args.ptx_dir:
        os.makedirs(args.ptx_dir, exist_ok=True)
    t0 = time.time()
    jobs = [(name, key, ccs, args.ptx_dir) for name, key in specs]
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(_one, jobs, chunksize=1))

    print("| kernel | dtype | target | registers | spill st/ld (B) | stack (B) | smem (B) "
          "| ld.v4 | st.v4 | ex2.approx |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    spilled = failed = 0
    for (name, key), res in zip(specs, results):
        if isinstance(res, str):
            failed += 1
            print(f"| {name} | {cuda_ptx.key_label(key, name)} | - | FAILED: {res[:200]} |||||")
            continue
        for cc, r in res.items():
            spill = r["spill_stores"] + r["spill_loads"]
            spilled += spill > 0
            mark = " **SPILLS**" if spill else ""
            print(f"| {name} | {cuda_ptx.key_label(key, name)} | sm_{cc[0]}{cc[1]} | {r['registers']} | "
                  f"{r['spill_stores']}/{r['spill_loads']}{mark} | {r['stack']} | {r['smem']} | "
                  f"{r['v4_loads']} | {r['v4_stores']} | {r['ex2_approx']} |")
    print(f"\n{len(specs)} kernels x {len(ccs)} targets in {time.time() - t0:.0f} s: "
          f"{spilled} spilling, {failed} failed to compile.")
    return 1 if spilled or failed else 0


if __name__ == "__main__":
    sys.exit(main())
