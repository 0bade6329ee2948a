"""Warp shuffles for Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1), which lacks them.

The simulator runs every thread of a block as a Python thread. A shuffle here is an
exchange through a dict on the block's manager: each thread posts its value, waits at a
barrier and reads its partner lane (inside its own warp of 32; a lane that does not exist
returns the caller's own value).

The barrier is per warp (a threading.Barrier of the warp's lanes), not the simulator's block
barrier: it needs no polling by the block manager, so it is much faster, and it asks exactly
what a full-mask shuffle asks on a GPU -- every lane of the warp reaches it. A warp whose
lanes do not all arrive raises RuntimeError after a timeout instead of hanging.

Also a fix: the simulator's ``cuda.shared.array`` looks its array up by source line and,
on a miss, creates and stores it -- not atomically. A thread switch between the lookup and
the store (likelier with a short ``sys.setswitchinterval``) let two threads of a block create
their own arrays, so one thread wrote a reduction's partial or a flag nobody else saw: a
wrong total now and then (e.g. a mean loss a few % off), or a simulated warp that never meets.
``install()`` serialises it with a lock.

And a faster block: upstream's block manager polls every thread's "blocked in syncthreads"
flag in a busy loop that holds the GIL against the threads it waits for (most of the
simulator's time, and heavy system time with a short switch interval). ``install()`` gives
``syncthreads`` a counting barrier instead (a Condition: it opens when every thread still
running waits at it, upstream's rule, so threads that returned early do not block it) and the
manager just joins its threads. A thread's exception aborts the others and is raised, as
upstream does.

``install()`` is idempotent and is called by gpuce when the simulator is on, so users
debugging their own kernels get the shuffles (and the shared-array fix) too.
"""
import math
import sys
import threading

import numpy as np

WARP = 32
TIMEOUT_S = 120.0
_lock = threading.Lock()


def _warp_barrier(t):
    mgr = t._manager
    bars = mgr.__dict__.get("_gpuce_warp_barriers")
    warp = t.thread_id // WARP
    bar = None if bars is None else bars.get(warp)
    if bar is None:
        with _lock:
            bars = mgr.__dict__.setdefault("_gpuce_warp_barriers", {})
            bar = bars.get(warp)
            if bar is None:
                lanes = min(WARP, math.prod(mgr._block_dim) - warp * WARP)
                bar = bars[warp] = threading.Barrier(lanes)
    try:
        bar.wait(TIMEOUT_S)
    except threading.BrokenBarrierError:
        if mgr._gpuce_barrier.aborted:  # another thread of the block raised
            raise _Aborted("abort flag set on a warp shuffle") from None
        raise RuntimeError("simulated warp shuffle: not every lane of the warp reached it "
                           "(a full-mask shuffle needs all of them)") from None


def _exchange(value, src_lane):
    # Two mailboxes used alternately: a lane can only write the one it read before after the
    # whole warp passed the next shuffle's barrier, so one barrier per shuffle is enough.
    t = threading.current_thread()
    parity = t.__dict__.get("_gpuce_parity", 0)
    t._gpuce_parity = 1 - parity
    box = t._manager.__dict__.setdefault(f"_gpuce_shfl{parity}", {})
    box[t.thread_id] = value
    _warp_barrier(t)
    lane = t.thread_id % WARP
    src = src_lane(lane)
    if 0 <= src < WARP:
        return box.get(t.thread_id - lane + src, value)
    return value


def shfl_sync(self, mask, value, src_lane):
    return _exchange(value, lambda lane: src_lane)


def shfl_up_sync(self, mask, value, delta):
    return _exchange(value, lambda lane: lane - delta)


def shfl_down_sync(self, mask, value, delta):
    return _exchange(value, lambda lane: lane + delta)


def shfl_xor_sync(self, mask, value, lane_mask):
    return _exchange(value, lambda lane: lane ^ lane_mask)


def syncwarp(self, mask=0xFFFFFFFF):
    _warp_barrier(threading.current_thread())


def _shared_array(self, shape, dtype, alignment=None):
    """FakeCUDAShared.array with the lookup and the store under one lock. Static arrays are
    keyed, as upstream, by the caller's file and line; dynamic ones (shape 0) go upstream."""
    if shape == 0 or alignment is not None:
        return _upstream_shared_array(self, shape, dtype, alignment)
    from numba.cuda.simulator.kernelapi import numpy_support, types  # (what upstream uses)
    if isinstance(dtype, types.Type):
        dtype = numpy_support.as_dtype(dtype)
    caller = sys._getframe(1)
    key = (caller.f_code.co_filename, caller.f_lineno)
    with _lock:
        res = self._allocations.get(key)
        if res is None:
            res = self._allocations[key] = np.empty(shape, dtype)
    return res


_upstream_shared_array = None


class _Aborted(RuntimeError):
    """Raised in the threads of a block one of whose threads raised (not the cause)."""


class _BlockBarrier:
    """syncthreads for one block: opens when every thread still running waits at it."""

    def __init__(self, n_threads):
        self.cond = threading.Condition()
        self.live = n_threads
        self.waiting = 0
        self.generation = 0
        self.aborted = False

    def _open(self):
        self.waiting = 0
        self.generation += 1
        self.cond.notify_all()

    def wait(self):
        with self.cond:
            if self.aborted:
                raise _Aborted("abort flag set on syncthreads call")
            self.waiting += 1
            if self.waiting == self.live:
                self._open()
                return
            gen = self.generation
            while gen == self.generation and not self.aborted:
                self.cond.wait()
            if self.aborted:
                raise _Aborted("abort flag set on syncthreads clear")

    def leave(self):
        with self.cond:
            self.live -= 1
            if self.waiting and self.waiting == self.live:
                self._open()

    def abort(self):
        with self.cond:
            self.aborted = True
            self.cond.notify_all()


def _syncthreads(self):
    self._manager._gpuce_barrier.wait()


def _run_block(self, grid_point, *args):
    """BlockManager.run: start the block's threads, join them, raise the first exception."""
    from numba.cuda.simulator.kernel import BlockThread
    barrier = self._gpuce_barrier = _BlockBarrier(math.prod(self._block_dim))

    def target():
        try:
            self._f(*args)
        except BaseException:
            barrier.abort()
            for bar in list(self.__dict__.get("_gpuce_warp_barriers", {}).values()):
                bar.abort()  # lanes waiting at a shuffle
            raise
        finally:
            barrier.leave()

    threads = [BlockThread(target, self, grid_point, block_point, self._debug)
               for block_point in np.ndindex(*self._block_dim)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [t.exception for t in threads if t.exception]
    if failed:
        cause = next((e for e in failed if not isinstance(e[0], _Aborted)), failed[0])
        raise cause[0].with_traceback(cause[1])


def install():
    """Add the shuffles to the simulator's fake ``cuda`` module (no-op if present), make its
    shared-array allocation atomic and its block barrier a counting one."""
    global _upstream_shared_array
    from numba.cuda.simulator.kernel import BlockManager, BlockThread
    from numba.cuda.simulator.kernelapi import FakeCUDAModule, FakeCUDAShared
    BlockManager.run = _run_block
    BlockThread.syncthreads = _syncthreads
    with _lock:
        if FakeCUDAShared.array is not _shared_array:
            _upstream_shared_array = FakeCUDAShared.array
            FakeCUDAShared.array = _shared_array
    for name, fn in (("shfl_sync", shfl_sync), ("shfl_up_sync", shfl_up_sync),
                     ("shfl_down_sync", shfl_down_sync), ("shfl_xor_sync", shfl_xor_sync),
                     ("syncwarp", syncwarp)):
        if not hasattr(FakeCUDAModule, name):
            setattr(FakeCUDAModule, name, fn)
