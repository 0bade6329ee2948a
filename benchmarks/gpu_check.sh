#!/usr/bin/env bash
# Every GPU check of the CUDA backend in one go, with a short table printed last.
#
#   bash benchmarks/gpu_check.sh                 # logs: benchmarks/results/gpu_check-<UTC time>/
#   OUT=/some/dir bash benchmarks/gpu_check.sh   # logs: $OUT
#
# 1. names the GPU and the library versions;
# 2. installs gpuce with `pip install --no-deps -e .` (the machine's numba-cuda, CuPy, torch
#    are used as they are: a newer NVVM's PTX may be refused by an older driver);
# 3. runs the GPU tests: python -m pytest -m gpu (tests/test_gpu.py and the other gpu tests);
# 4. times gpuce against PyTorch eager forward+backward and CuPy with `gpuce bench` (CUDA
#    events, medians, rotated inputs, and a device-to-device copy in the same run as the
#    floor) on issue 3's shapes, fp32 and bf16;
# 5. prints the summary (benchmarks/gpu_bench.py): ms, GB/s, % of the copy bandwidth, the
#    speedups and whether the targets are met. summary.md can be committed under
#    benchmarks/results/.
# Environment: PYTHON (default python), OUT, SHAPES, DTYPES, TEST_TIMEOUT, BENCH_TIMEOUT (s).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LOG=${OUT:-benchmarks/results/gpu_check-$(date -u +%Y%m%dT%H%M%SZ)}
SHAPES=${SHAPES:-"8192x32768 8192x131072 65536x1024 1048576x10"}
DTYPES=${DTYPES:-"fp32 bf16"}
mkdir -p "$LOG"
status=0
t0=$(date +%s)

echo "== GPU" | tee "$LOG/gpu.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv,noheader \
    2>&1 | tee -a "$LOG/gpu.txt"

echo "== install" | tee "$LOG/install.log"
$PY -m pip install --no-deps -e . >> "$LOG/install.log" 2>&1 || { echo "pip install failed"; status=1; }
$PY - <<'EOF' 2>&1 | tee -a "$LOG/gpu.txt"
import importlib
for name in ("numba", "numba_cuda", "cupy", "torch", "triton", "gpuce"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as exc:
        print(f"{name}: not importable ({type(exc).__name__})")
from numba import cuda
dev = cuda.get_current_device()
print(f"numba sees {dev.name.decode() if isinstance(dev.name, bytes) else dev.name}, "
      f"cc {dev.compute_capability}, {dev.MULTIPROCESSOR_COUNT} SMs")
EOF

echo "== pytest -m gpu"
timeout "${TEST_TIMEOUT:-420}" $PY -m pytest -q -m gpu -p no:cacheprovider --durations=15 tests/ \
    > "$LOG/pytest_gpu.log" 2>&1
rc=$?
tail -n 25 "$LOG/pytest_gpu.log"
[ $rc -eq 0 ] || { echo "pytest -m gpu: exit status $rc"; status=1; }
echo "   ($(( $(date +%s) - t0 )) s so far)"

echo "== benchmark"
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-300}" $PY -m gpuce.cli bench --device cuda --ops ce_fwd_bwd \
    --shapes $SHAPES --dtypes $DTYPES --impls gpuce gpuce_out torch cupy --budget 2 \
    --no-progress --json "$LOG/bench.json" --markdown "$LOG/bench.md" > "$LOG/bench.log" 2>&1
rc=$?
tail -n 5 "$LOG/bench.log"
[ $rc -eq 0 ] || { echo "gpuce bench: exit status $rc"; status=1; }

echo
echo "== summary ($(( $(date +%s) - t0 )) s; logs in $LOG)"
head -n 2 "$LOG/gpu.txt" | tail -n 1
grep -E "passed|failed|error" "$LOG/pytest_gpu.log" | tail -n 1
if [ -f "$LOG/bench.json" ]; then
    $PY benchmarks/gpu_bench.py "$LOG/bench.json" --markdown "$LOG/summary.md" || status=1
else
    echo "no benchmark results"
    status=1
fi
exit $status
