"""The CPU kernels' machine code: their row loops load contiguous vectors, never AVX-512
gathers or scatters (a loop indexed from a run-time start took them on a Zen 4: softmax and
CE 2.5-4x slower there). The code is compiled for a Zen 4 (znver4: AVX-512) whatever this
machine is, in a child process that only compiles and never runs it."""
import json
import os
import subprocess
import sys

import pytest

# runs the kernels here (any CPU) and saves their argument types
_RECORD = r"""
import pickle, sys
import ml_dtypes, numpy as np
import gpuce
from gpuce.kernels import cpu, cpu_small
rng = np.random.default_rng(0)
n, c = 8, 1500  # rows long enough for the chunked loops (SUM_CHUNK)
for dt in (np.float32, ml_dtypes.bfloat16):
    x = rng.standard_normal((n, c)).astype(dt)
    y = rng.integers(0, c, n)
    gpuce.softmax(x)
    gpuce.logsumexp(x)
    gpuce.cross_entropy_with_grad(x, y, label_smoothing=0.1)
    if dt is np.float32:
        q = rng.random((n, c)).astype(dt)
        gpuce.cross_entropy_with_grad(x, q / q.sum(1, keepdims=True))
x = rng.standard_normal((256, 10)).astype(np.float32)  # the short-row kernel (C = 10)
gpuce.cross_entropy_with_grad(x, rng.integers(0, 10, 256), reduction="none")
sigs = {}
for dt in ("float32", "bfloat16"):
    for name, fn in cpu.tasks(dt, False, None).items():
        if fn.signatures:
            sigs[(dt, name)] = list(fn.signatures)
sigs[("float32", "short_rows_10")] = list(cpu_small._small_tasks("float32", 10)[0].signatures)
pickle.dump(sigs, open(sys.argv[1], "wb"))
"""

# compiles the same functions for znver4 and counts gathers/scatters in each
_CROSS = r"""
import json, pickle, re, sys
from gpuce.kernels import cpu, cpu_small
out = {}
for (dt, name), sigs in pickle.load(open(sys.argv[1], "rb")).items():
    if name == "short_rows_10":
        fn = cpu_small._small_tasks(dt, 10)[0]
    else:
        fn = cpu.tasks(dt, False, None)[name]
    for sig in sigs:
        fn.compile(sig)
        asm = fn.inspect_asm(sig)
        out[f"{dt} {name}"] = [len(re.findall(r"\bv(p)?(gather|scatter)\w*", asm)),
                               len(re.findall(r"%zmm", asm))]
print(json.dumps(out))
"""


def _run(code, tmp_path, cache, *args, **env):
    child_env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / cache), **env)
    child_env.pop("NUMBA_ENABLE_CUDASIM", None)
    return subprocess.run([sys.executable, "-c", code, *args], env=child_env, check=True,
                          capture_output=True, text=True).stdout


def test_row_loops_have_no_gathers_on_avx512(tmp_path):
    sigs = tmp_path / "sigs.pkl"
    _run(_RECORD, tmp_path, "host", str(sigs))
    # a cache of its own: numba keys its index on the CPU, gpuce's variants too
    counts = json.loads(_run(_CROSS, tmp_path, "znver4", str(sigs), NUMBA_CPU_NAME="znver4",
                             NUMBA_CPU_FEATURES=""))
    names = {k.split()[1] for k in counts}
    assert {"softmax", "logsumexp", "ce_hard", "ce_soft", "short_rows_10"} <= names, counts
    assert all(zmm > 0 for _, zmm in counts.values()), counts  # AVX-512 code indeed
    gathers = {k: g for k, (g, _) in counts.items() if g}
    assert not gathers, f"gathers/scatters in the kernels' loops: {gathers}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
