"""Host-side cost of a CUDA call, without a GPU: kernel launches are recorded, not run.

    python benchmarks/overhead_cuda.py [--repeat 300] [--out benchmarks/results/overhead_cuda.md]

Runs gpuce's CUDA backend on Numba's simulator arrays (the script turns the simulator on)
with the launch point (``gpuce._cuda._bind``: the bound, compiled kernel) replaced by a
recorder. So it times everything gpuce does on the host per call -- checks, dispatch, the
launch plan, allocations, kernel views, argument lists -- and counts the launches, but not
numba's own argument marshalling, nor the driver. Allocation here is the simulator's (a
junk-filled numpy array), slower than CuPy's or torch's pools: read the figures as an upper
bound on gpuce's part. Prints a markdown table (median µs per call of ``--repeat`` calls).
"""
import argparse
import os
import statistics
import sys
import time

os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before numba is imported

import numpy as np  # noqa: E402

SHAPES = ((32, 10), (256, 1000), (8, 32000))
DTYPES = ("float32", "bfloat16")


def _ops():
    import gpuce
    return {
        "cross_entropy_with_grad": lambda x, t, r: gpuce.cross_entropy_with_grad(x, t, reduction=r),
        "cross_entropy": lambda x, t, r: gpuce.cross_entropy(x, t, reduction=r),
        "softmax": lambda x, t, r: gpuce.softmax(x),
        "log_softmax": lambda x, t, r: gpuce.log_softmax(x),
        "logsumexp": lambda x, t, r: gpuce.logsumexp(x),
    }


def _device_inputs(n, c, dt):
    from numba import cuda
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c)).astype(np.float32)
    if dt == "bfloat16":
        import ml_dtypes
        xd = cuda.to_device(x.astype(ml_dtypes.bfloat16).view(np.int16)).view(ml_dtypes.bfloat16)
    else:
        xd = cuda.to_device(x.astype(dt))
    return xd, cuda.to_device(rng.integers(0, c, n))


def measure(repeat=300):
    import gpuce._cuda as gc
    launches = []
    gc._BOUND.clear()
    gc._bind = lambda name, key: (lambda args, grid, block, stream, shmem:
                                  launches.append(name))
    rows = []
    for (n, c) in SHAPES:
        for dt in DTYPES:
            x, t = _device_inputs(n, c, dt)
            for op, fn in _ops().items():
                reductions = ("mean", "sum", "none") if op.startswith("cross") else ("-",)
                for red in reductions:
                    for _ in range(5):  # warm: kernels bound, plans and stand-ins cached
                        fn(x, t, red)
                    launches.clear()
                    fn(x, t, red)
                    per_call = len(launches)
                    times = []
                    for _ in range(repeat):
                        t0 = time.perf_counter()
                        fn(x, t, red)
                        times.append(time.perf_counter() - t0)
                    rows.append(dict(op=op, shape=f"{n}x{c}", dtype=dt, reduction=red,
                                     us=statistics.median(times) * 1e6, launches=per_call))
    return rows


def table(rows):
    out = ["| op | shape | dtype | reduction | µs/call host path | launches/call |",
           "|---|---|---|---|---:|---:|"]
    for r in rows:
        out.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['reduction']} | "
                   f"{r['us']:.1f} | {r['launches']} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=300)
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    args = ap.parse_args(argv)
    text = table(measure(args.repeat))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# CUDA host path per call (launches recorded, simulator arrays)\n\n"
                    f"`python benchmarks/overhead_cuda.py`; python {sys.version.split()[0]}, "
                    "median of the calls. Not a GPU measurement: see the script's docstring."
                    "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
