#!/usr/bin/env bash
# Regenerate the committed CPU results in benchmarks/results/:
#   cpu.json, cpu.png, cpu.md                the sweep over C, fp32 and bf16, all four ops
#   cpu_shapes.json, cpu_shapes.md           issue 2's shapes: 4096x32000, 65536x1000, 1048576x10
#   cpu_quick.json, cpu_quick.md             `gpuce bench --quick`, with its wall time
#
# Run it on a quiet machine: every number depends on having the cores to itself. It stops
# when the 1-minute load average is above LOAD_MAX (default 0.5); FORCE=1 runs anyway.
#
#   PYTHON=/work/venv/bin/python bash benchmarks/cpu_bench.sh
#
# Environment: PYTHON (default: python), THREADS (default: every usable core),
# LOAD_MAX, FORCE. Extra arguments go to the sweep's `gpuce bench` (e.g. --dtypes fp32).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=benchmarks/results
THREADS=${THREADS:-$("$PY" -c 'import os; print(len(os.sched_getaffinity(0)))')}
mkdir -p "$OUT"

load=$(cut -d' ' -f1 /proc/loadavg)
if [ "${FORCE:-0}" != 1 ] && "$PY" -c "import sys; sys.exit(not float('$load') > float('${LOAD_MAX:-0.5}'))"; then
    echo "cpu_bench.sh: the load average is $load; run it when the machine is quiet (or FORCE=1)" >&2
    exit 3
fi
if ! "$PY" -c 'import jax' 2>/dev/null; then
    echo "cpu_bench.sh: note: jax is not installed, so the JAX peer will be listed as skipped" >&2
fi

bench() { "$PY" -m gpuce.cli bench --device cpu --threads "$THREADS" "$@"; }

start=$(date +%s)
bench --quick --no-progress --json "$OUT/cpu_quick.json" --markdown "$OUT/cpu_quick.md"
quick_s=$(( $(date +%s) - start ))
printf '\n`gpuce bench --quick` took %s s of wall time on this machine, numba compilation included.\n' \
    "$quick_s" >> "$OUT/cpu_quick.md"
echo "gpuce bench --quick: ${quick_s} s"

bench --shapes 4096x32000,65536x1000,1048576x10 --ops ce_fwd_bwd,softmax,log_softmax \
    --dtypes fp32 --json "$OUT/cpu_shapes.json" --markdown "$OUT/cpu_shapes.md"

bench --json "$OUT/cpu.json" --plot "$OUT/cpu.png" --markdown "$OUT/cpu.md" "$@"
