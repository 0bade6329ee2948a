#!/usr/bin/env bash
# The whole test suite, as the README and CI run it, in three processes side by side (each
# is single-core bound, or nearly): the CUDA compile tests (PTX, ptxas, the static roofline),
# the rest of the CPU suite (the fuzz with it: they share compiled CPU kernels in memory), and
# the CUDA kernels under Numba's simulator (a process of its own: the simulator replaces
# numba.cuda). Each log is printed when all three end.
set -uo pipefail
cd "$(dirname "$0")/.."
COMPILE_TESTS=(tests/test_ptx.py tests/test_roofline.py tests/test_cuda_tanh.py)
SIM_TESTS=(tests/test_cuda_sim.py tests/test_cuda_sim_reliability.py tests/test_fuzz.py
           tests/test_cuda_tanh.py)
logs=$(mktemp -d)
NUMBA_ENABLE_CUDASIM=1 python -m pytest -q -p no:cacheprovider "${SIM_TESTS[@]}" "$@" \
    > "$logs/sim" 2>&1 &
sim_pid=$!
python -m pytest -q -p no:cacheprovider "${COMPILE_TESTS[@]}" "$@" > "$logs/compile" 2>&1 &
compile_pid=$!
ignores=()
for t in "${COMPILE_TESTS[@]}"; do ignores+=(--ignore="$t"); done
main_rc=0
python -m pytest -q "${ignores[@]}" "$@" || main_rc=$?
compile_rc=0
wait "$compile_pid" || compile_rc=$?
sim_rc=0
wait "$sim_pid" || sim_rc=$?
echo "---- CUDA kernels compiled for sm_80 / sm_90: PTX, ptxas, the static roofline ----"
cat "$logs/compile"
echo "---- CUDA kernels under the simulator (NUMBA_ENABLE_CUDASIM=1) ----"
cat "$logs/sim"
rm -rf "$logs"
[ "$main_rc" -eq 0 ] && [ "$compile_rc" -eq 0 ] && [ "$sim_rc" -eq 0 ]
