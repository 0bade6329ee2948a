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
# 6. the CUDA disk cache: the first call of a fresh process, twice, with NUMBA_CACHE_DIR in a
#    fresh folder (cold: compiles and fills it; warm: should load from it) -> cache.md;
# 7. every strategy timed on this device against the static roofline's prediction
#    (benchmarks/roofline.py --json, H100 model) -> strategies.md.
# Everything lands in $LOG and is copied to benchmarks/results/ (gpu_*_latest.md).
# Environment: PYTHON (default python), OUT, SHAPES, DTYPES, TEST_TIMEOUT, BENCH_TIMEOUT,
# STRATEGY_TIMEOUT (s).
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

echo "== CUDA disk cache (first call in a fresh process)"
CACHE_DIR=$(mktemp -d)
cold=$(NUMBA_CACHE_DIR=$CACHE_DIR timeout 120 $PY benchmarks/gpu_bench.py --first-call 2>>"$LOG/cache.log")
warm=$(NUMBA_CACHE_DIR=$CACHE_DIR timeout 120 $PY benchmarks/gpu_bench.py --first-call 2>>"$LOG/cache.log")
{
    echo "| first cross_entropy_with_grad call (64x1000 fp32, fresh process) | s |"
    echo "|---|---:|"
    echo "| cold (empty NUMBA_CACHE_DIR) | ${cold:-failed} |"
    echo "| warm (the same NUMBA_CACHE_DIR) | ${warm:-failed} |"
    echo "| cache files | $(find "$CACHE_DIR" -type f | wc -l) |"
} | tee "$LOG/cache.md"
rm -rf "$CACHE_DIR"
echo "   ($(( $(date +%s) - t0 )) s so far)"

echo "== pytest -m gpu"
timeout "${TEST_TIMEOUT:-180}" $PY -m pytest -q -m gpu -p no:cacheprovider --durations=15 tests/ \
    > "$LOG/pytest_gpu.log" 2>&1
rc=$?
tail -n 25 "$LOG/pytest_gpu.log"
[ $rc -eq 0 ] || { echo "pytest -m gpu: exit status $rc"; status=1; }
echo "   ($(( $(date +%s) - t0 )) s so far)"

echo "== benchmark"
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-100}" $PY -m gpuce.cli bench --device cuda --ops ce_fwd_bwd \
    --shapes $SHAPES --dtypes $DTYPES --impls gpuce gpuce_out torch cupy --budget 2 \
    --no-progress --json "$LOG/bench.json" --markdown "$LOG/bench.md" > "$LOG/bench.log" 2>&1
rc=$?
tail -n 5 "$LOG/bench.log"
[ $rc -eq 0 ] || { echo "gpuce bench: exit status $rc"; status=1; }

echo "== strategies against the static roofline"
if [ -f benchmarks/roofline.py ]; then
    timeout 90 $PY benchmarks/roofline.py --json "$LOG/roofline.json" --jobs 12 \
        > "$LOG/roofline.log" 2>&1 || echo "roofline.py failed (see roofline.log); no predictions"
fi
timeout "${STRATEGY_TIMEOUT:-120}" $PY benchmarks/gpu_bench.py --strategies --budget 90 \
    --roofline "$LOG/roofline.json" --markdown "$LOG/strategies.md" > "$LOG/strategies.log" 2>&1
rc=$?
cat "$LOG/strategies.log" | tail -n 80
[ $rc -eq 0 ] || { echo "strategy timing: exit status $rc"; status=1; }

mkdir -p benchmarks/results
for f in cache strategies summary; do
    [ -f "$LOG/$f.md" ] && cp "$LOG/$f.md" "benchmarks/results/gpu_${f}_latest.md"
done

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
