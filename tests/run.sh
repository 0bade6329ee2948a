#!/usr/bin/env bash
# The whole test suite, as the README and CI run it, in four processes side by side (each is
# single-core bound, or nearly; the CPU kernels compile into numba's disk cache, which the
# processes share):
#   compile  the CUDA compile tests (PTX, ptxas, the static roofline; a pool of its own)
#   cpu-api  the API matrix of the CPU backend (test_api, the class mask, the torch layer),
#            the disk cache's tests (fresh processes) and determinism
#   cpu      the rest of the CPU suite (the fuzz, extremes, the bench harness, ...)
#   sim      the CUDA kernels under Numba's simulator (a process of its own: the simulator
#            replaces numba.cuda)
# Each log is printed when all four end; the exit status fails if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
COMPILE_TESTS=(tests/test_ptx.py tests/test_roofline.py tests/test_cuda_tanh.py)
API_TESTS=(tests/test_api.py tests/test_class_mask.py tests/test_torch.py
           tests/test_torch_backward.py tests/test_torch_opinfo.py tests/test_errors.py
           tests/test_reference.py tests/test_cache.py tests/test_determinism.py)
SIM_TESTS=(tests/test_cuda_sim.py tests/test_cuda_sim_reliability.py tests/test_fuzz.py
           tests/test_cuda_tanh.py)
logs=$(mktemp -d)
pids=()
failed=""
names=()
start() {  # start NAME COMMAND...: run it in the background, its output to $logs/NAME
    local name=$1
    shift
    "$@" > "$logs/$name" 2>&1 &
    pids+=($!)
    names+=("$name")
}
rest=()
for t in "${COMPILE_TESTS[@]}" "${API_TESTS[@]}"; do rest+=(--ignore="$t"); done
start sim env NUMBA_ENABLE_CUDASIM=1 python -m pytest -q -p no:cacheprovider "${SIM_TESTS[@]}" "$@"
start compile python -m pytest -q -p no:cacheprovider "${COMPILE_TESTS[@]}" "$@"
start cpu-api python -m pytest -q -p no:cacheprovider "${API_TESTS[@]}" "$@"
start cpu python -m pytest -q -p no:cacheprovider "${rest[@]}" "$@"
rc=0
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
        rc=1
        failed+=" ${names[$i]}"
    fi
done
for name in cpu-api cpu compile sim; do
    echo "---- $name ----"
    cat "$logs/$name"
done
rm -rf "$logs"
[ "$rc" -eq 0 ] && echo "tests/run.sh: all four passed" || echo "tests/run.sh: failed:$failed"
exit "$rc"
