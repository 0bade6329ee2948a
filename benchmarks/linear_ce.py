"""Linear + cross-entropy: time and peak memory of gpuce's chunked op against the naive torch
path, the unchunked path from the same parts, cut-cross-entropy and (GPU) Liger.

    python benchmarks/linear_ce.py            # (4096, 512, 32000), fp32 and bf16, CPU
    python benchmarks/linear_ce.py --quick    # (1024, 256, 8000)
    python benchmarks/linear_ce.py --device cuda --shape 16384,4096,128256 --dtypes bf16

Same as ``gpuce bench --op linear_ce``; writes benchmarks/results/linear_ce_<device>.{json,md}
unless --json/--markdown are given. See gpuce/bench_linear.py for the method.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gpuce.bench_linear import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    device = argv[argv.index("--device") + 1] if "--device" in argv else "cpu"
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"linear_ce_{device}")
    if "--json" not in argv and "--quick" not in argv:
        argv += ["--json", out + ".json"]
    if "--markdown" not in argv and "--quick" not in argv:
        argv += ["--markdown", out + ".md"]
    sys.exit(main(argv))
