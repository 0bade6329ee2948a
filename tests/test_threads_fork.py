"""gpuce from 8 threads at once and in a forked child, under each threading layer of numba
that loads here, in a fresh process per layer (tests/threads_scenario.py). The scenario
compares every result bitwise with the serial call's."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIO = Path(__file__).with_name("threads_scenario.py")
ROOT = SCENARIO.parent.parent


def _env(layer):
    env = dict(os.environ, NUMBA_THREADING_LAYER=layer)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if layer == "tbb":  # pip's tbb wheel puts libtbb.so.12 in <prefix>/lib, off the loader path
        lib = str(Path(sys.prefix) / "lib")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (lib, env.get("LD_LIBRARY_PATH")) if p)
    return env


def _loads(layer):
    probe = "from numba.np.ufunc import parallel as p; p._launch_threads(); print(p.threading_layer())"
    res = subprocess.run([sys.executable, "-c", probe], env=_env(layer), capture_output=True,
                         text=True, timeout=120)
    return res.returncode == 0 and res.stdout.strip() == layer


@pytest.mark.parametrize("layer", ["omp", "workqueue", "tbb"])
def test_threads_and_fork(layer):
    if not _loads(layer):
        pytest.skip(f"numba's {layer} threading layer does not load here")
    res = subprocess.run([sys.executable, str(SCENARIO)], env=_env(layer), capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["layer"] == layer
    assert report["threads_ok"] and report["child"]["ok"]
    if layer == "omp":  # the child of an omp parent never enters the layer
        assert report["child"]["launches"]["parallel"] == 0
        assert report["child"]["launches"]["serial"] > 0
    if layer != "workqueue":  # thread-safe layers: concurrent calls stay parallel
        assert report["parent_launches"]["serial"] == 0
