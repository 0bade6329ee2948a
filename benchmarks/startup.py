"""Start-up costs, each in a fresh process: ``import gpuce`` against ``import numpy, numba``,
and the first call of a process -- cold (empty cache) and warm (a variant an earlier
process compiled, with NUMBA_CACHE_DIR pointing at a shared fresh folder).

    python benchmarks/startup.py [--repeat 3] [--baseline DIR] [--out benchmarks/results/startup.md]

``--baseline DIR`` adds the same first calls for another gpuce tree (e.g. an export of the
previous commit: ``git archive HEAD~5 | tar -x -C /tmp/base``), run the same way.
Times are medians over --repeat fresh processes (each cold run gets its own empty folder).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CLOCK = "s"  # --clock cpu: "cpu", the child's CPU time (all threads), for a loaded machine
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IMPORT_CHILD = """
import time, json, sys
t, c = time.perf_counter(), time.process_time()
{imports}
print(json.dumps({{"s": time.perf_counter() - t, "cpu": time.process_time() - c}}))
"""

CALL_CHILD = """
import time, json
import numpy as np
import gpuce
rng = np.random.default_rng(0)
x = rng.standard_normal({shape}).astype({dtype})
y = rng.integers(0, {shape}[-1], {shape}[:-1])
if {cuda}:  # numba device arrays: every numba-cuda install has them (bf16 as raw words)
    from numba import cuda
    dt = x.dtype
    x = (cuda.to_device(x.view(np.int16)).view(dt) if dt.itemsize == 2 and dt.kind == "V"
         else cuda.to_device(x))
    y = cuda.to_device(y)
    cuda.synchronize()
t, c = time.perf_counter(), time.process_time()
{call}
if {cuda}:
    cuda.synchronize()
print(json.dumps({{"s": time.perf_counter() - t, "cpu": time.process_time() - c}}))
"""

CASES = [
    ("cross_entropy_with_grad fp32 32×10", "(32, 10)", "np.float32",
     "gpuce.cross_entropy_with_grad(x, y)"),
    ("cross_entropy_with_grad fp32 4096×1000", "(4096, 1000)", "np.float32",
     "gpuce.cross_entropy_with_grad(x, y)"),
    ("cross_entropy_with_grad fp32 65536×10 (short rows, parallel)", "(65536, 10)",
     "np.float32", "gpuce.cross_entropy_with_grad(x, y)"),
    ("softmax bf16 32×1000", "(32, 1000)", "__import__('ml_dtypes').bfloat16",
     "gpuce.softmax(x)"),
    ("cross_entropy fp64 smoothing 256×100", "(256, 100)", "np.float64",
     "gpuce.cross_entropy(x, y, label_smoothing=0.1)"),
]


def _run(code, env):
    # cwd: the tree itself, since `python -c` puts the working directory first on sys.path
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=env["PYTHONPATH"],
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])[CLOCK]


def _env(tree, cache_dir):
    env = dict(os.environ, PYTHONPATH=tree, NUMBA_CACHE_DIR=cache_dir)
    env.pop("GPUCE_DISK_CACHE", None)
    return env


def measure(tree, repeat, device="cpu"):
    """{case: (cold s, warm s)} for the gpuce in ``tree``."""
    res = {}
    for name, shape, dtype, call in CASES:
        code = CALL_CHILD.format(shape=shape, dtype=dtype, call=call, cuda=device == "cuda")
        cold, warm = [], []
        for _ in range(repeat):
            with tempfile.TemporaryDirectory(prefix="gpuce-startup-") as d:
                cold.append(_run(code, _env(tree, d)))
                warm.append(_run(code, _env(tree, d)))
        res[name] = (statistics.median(cold), statistics.median(warm))
        print(f"  {name}: cold {res[name][0]:.2f} s, warm {res[name][1]:.2f} s", flush=True)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--baseline", default=None, help="another gpuce tree to compare against")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: the first calls on numba device arrays (a GPU machine)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: the child's CPU time (all threads), for a loaded machine")
    p.add_argument("--out", default=None, help="also write the markdown here")
    args = p.parse_args(argv)
    global CLOCK
    CLOCK = "cpu" if args.clock == "cpu" else "s"
    with tempfile.TemporaryDirectory() as d:
        env = _env(ROOT, d)
        imports = {name: statistics.median(_run(IMPORT_CHILD.format(imports=stmt), env)
                                           for _ in range(max(args.repeat, 3)))
                   for name, stmt in (("import numpy, numba", "import numpy, numba"),
                                      ("import gpuce", "import gpuce"))}
    print("first calls (this tree):", flush=True)
    ours = measure(ROOT, args.repeat, args.device)
    base = None
    if args.baseline:
        print(f"first calls ({args.baseline}):", flush=True)
        base = measure(os.path.abspath(args.baseline), args.repeat, args.device)
    lines = ["| import | seconds |", "|---|---:|"]
    lines += [f"| `{k}` | {v:.2f} |" for k, v in imports.items()]
    lines.append(f"| difference | {imports['import gpuce'] - imports['import numpy, numba']:.2f} |")
    lines += ["", f"| first call in a fresh process ({args.device}) | cold s | warm s |"
              + (" baseline cold s | baseline warm s |" if base else ""),
              "|---|---:|---:|" + ("---:|---:|" if base else "")]
    for name, (cold, warm) in ours.items():
        row = f"| {name} | {cold:.2f} | {warm:.2f} |"
        if base:
            row += f" {base[name][0]:.2f} | {base[name][1]:.2f} |"
        lines.append(row)
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Start-up (`python benchmarks/startup.py`)\n\n"
                    f"{args.clock} clock. Medians over {args.repeat} fresh processes; cold: an empty "
                    "NUMBA_CACHE_DIR, warm: the same folder after the cold run.\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
