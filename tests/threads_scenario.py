"""Run by tests/test_threads_fork.py in a fresh process per threading layer
(NUMBA_THREADING_LAYER set by the caller): gpuce from 8 threads at once, then in a forked
child of a process that already used it. Prints one JSON line; exit status 0 means every
result was bitwise the serial call's."""
import json
import os
import sys
import threading
from contextlib import contextmanager

import numba
import numpy as np

import gpuce
from gpuce import _threading

N_THREADS = 8
SEEDS = range(8)
launches = {"parallel": 0, "serial": 0}
_allowed = _threading.parallel_allowed


@contextmanager
def _counting():
    with _allowed() as parallel:
        launches["parallel" if parallel else "serial"] += 1
        yield parallel


_threading.parallel_allowed = _counting


def work(seed):
    """Results of a few calls, large enough for the parallel kernels, plus a small one."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((160, 1000)) * 3).astype(np.float32)
    t = rng.integers(0, 1000, 160)
    loss, grad = gpuce.cross_entropy_with_grad(x, t, label_smoothing=0.1, reduction="none")
    probs = gpuce.softmax(x)
    small = gpuce.cross_entropy(x[:4], t[:4])
    return [loss.tobytes(), grad.tobytes(), probs.tobytes(), np.asarray(small).tobytes()]


def in_threads(reference, reps):
    bad = []

    def run(i):
        for r in range(reps):
            seed = SEEDS[(i + r) % len(SEEDS)]
            if work(seed) != reference[seed]:
                bad.append(seed)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(N_THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return not bad


def in_forked_child(reference):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: serial calls, then threads, then report through the pipe
        ok = all(work(s) == reference[s] for s in SEEDS) and in_threads(reference, 2)
        os.write(write_end, json.dumps({"ok": ok, "launches": launches}).encode())
        os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    data = os.read(read_end, 4096)
    os.close(read_end)
    child = json.loads(data) if data else {"ok": False, "launches": None}
    child["exit_status"] = status
    return child


def main():
    reference = {s: work(s) for s in SEEDS}  # serial calls from the main thread
    report = {"layer": numba.threading_layer(), "threads_ok": in_threads(reference, 4),
              "parent_launches": dict(launches)}
    for key in launches:
        launches[key] = 0
    report["child"] = in_forked_child(reference)
    print(json.dumps(report))
    ok = report["threads_ok"] and report["child"]["ok"] and report["child"]["exit_status"] == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
