#!/usr/bin/env bash
# The whole test suite, as the README and CI run it: the CPU/PTX tests, then the CUDA
# kernels under Numba's simulator (a separate process: the simulator replaces numba.cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q "$@"
NUMBA_ENABLE_CUDASIM=1 python -m pytest -q tests/test_cuda_sim.py "$@"
