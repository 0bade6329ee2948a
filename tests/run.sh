#!/usr/bin/env bash
# The whole test suite, as the README and CI run it: the CPU/PTX tests, and the CUDA kernels
# under Numba's simulator (a separate process: the simulator replaces numba.cuda). Both are
# single-core bound, so they run side by side; the simulator's log is printed when both end.
set -uo pipefail
cd "$(dirname "$0")/.."
sim_log=$(mktemp)
NUMBA_ENABLE_CUDASIM=1 python -m pytest -q -p no:cacheprovider tests/test_cuda_sim.py tests/test_cuda_sim_reliability.py tests/test_fuzz.py tests/test_cuda_tanh.py "$@" \
    > "$sim_log" 2>&1 &
sim_pid=$!
main_rc=0
python -m pytest -q "$@" || main_rc=$?
sim_rc=0
wait "$sim_pid" || sim_rc=$?
echo "---- CUDA kernels under the simulator (NUMBA_ENABLE_CUDASIM=1) ----"
cat "$sim_log"
rm -f "$sim_log"
[ "$main_rc" -eq 0 ] && [ "$sim_rc" -eq 0 ]
