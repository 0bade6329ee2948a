"""Whether a CPU call may launch numba's parallel kernels, or must run their serial twins.

numba's parallel kernels go through its threading layer even with one thread, and two of
the layers have a hole:
- omp (GNU OpenMP): a forked child of a process that used it is killed at its first
  parallel launch ("fork() called from a process already using GNU OpenMP").
- workqueue: two threads inside a parallel launch at once abort the whole process
  ("Concurrent access has been detected").
tbb has neither. So: in a forked child of an omp parent every call runs serially; under
workqueue (and before the layer is known) one call at a time holds a lock and runs in
parallel, and any call that finds it taken runs serially instead of waiting. The serial
kernels are the same source compiled without ``parallel=True``; every row is computed the
same way, so the results are bitwise those of the parallel kernels.
"""
import os
import threading
from contextlib import contextmanager

import numba
from numba.np.ufunc import parallel as _numba_parallel

_SAFE_LAYERS = ("omp", "tbb")  # thread-safe layers: no lock needed
_layer = None                  # numba's layer once it is chosen (it never changes after)
_serial_after_fork = False     # set in a forked child whose parent had started omp
_launch_lock = threading.Lock()


def _current_layer():
    global _layer
    if _layer is None and _numba_parallel._is_initialized:
        _layer = numba.threading_layer()
    return _layer


def _after_fork_in_child():
    global _serial_after_fork, _launch_lock
    if _current_layer() == "omp":
        _serial_after_fork = True
    # a lock held by another thread of the parent would stay held forever in the child
    _launch_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextmanager
def parallel_allowed():
    """Yields True when this call may launch a parallel kernel now, False for serial."""
    if _serial_after_fork:
        yield False
        return
    if _current_layer() in _SAFE_LAYERS:
        yield True
        return
    lock = _launch_lock
    if not lock.acquire(blocking=False):
        yield False  # another thread is inside the layer: running serially cannot abort
        return
    try:
        yield True
    finally:
        lock.release()
