"""Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) made fit for gpuce's kernels: warp
shuffles, which it lacks, and a block that runs its threads as greenlets.

Upstream runs every thread of a block as an OS thread, all at once: its block manager polls
every thread's "blocked in syncthreads" flag in a busy loop that holds the GIL against the
threads it waits for, and the runnable threads fight over the GIL (most of the simulator's
time went there, much of it system time), plus an OS thread started and joined per
simulated thread. ``install()`` runs a block in the launching thread instead: each simulated
thread is a greenlet, and exactly one runs at a time, until it waits (at ``syncthreads`` or
a warp shuffle) or returns; then the block's loop switches to the next ready one. A switch
costs about a microsecond and nothing polls.

- ``syncthreads`` opens when every thread still running waits at it (upstream's rule, so
  threads that returned early do not block it); ``syncthreads_count``/``_and``/``_or`` are
  upstream's, on top of it.
- A warp shuffle is an exchange through a mailbox of the block: each lane posts its value and
  waits until every lane of its warp (of 32; a lane that does not exist returns the caller's
  own value) has posted, as a full-mask shuffle asks on a GPU.
- Threads a barrier releases run in thread order after one barrier and in reverse order after
  the next (odd blocks start reversed), so a shared-memory read that lacks its barrier sees
  the unwritten value in one direction or the other, deterministically.
- A wait nobody can end (the lanes of a warp that never all reach a shuffle) raises
  RuntimeError at once instead of hanging. A thread's exception ends the block's other
  threads and is raised, naming the thread and the block, as upstream does.

The simulator's kernel API finds the running thread with ``threading.current_thread()``;
``install()`` points its ``threading`` at a stand-in whose ``current_thread()`` is the running
greenlet. Two more per-call costs go: ``cuda.shared.array`` found its array by extracting the
whole Python stack (now: the caller's frame, the same file-and-line key), and every device
function call swapped its module's ``cuda`` global in and out (now: once per module and
launch, held until the launch ends).

``install()`` is idempotent and is called by gpuce when the simulator is on, so users
debugging their own kernels get the shuffles and the faster block too.
"""
import sys
import threading
from collections import deque

import numpy as np

try:
    import greenlet
except ImportError:  # pragma: no cover
    greenlet = None

WARP = 32


class _Aborted(RuntimeError):
    """Raised in the threads of a block one of whose threads raised (not the cause)."""


def _thread_id(t):
    return t.thread_id


class _Block:
    """One block's threads and its barriers; ``run()`` switches among them until all end."""

    def __init__(self, manager, grid_point, args):
        self.manager, self.args = manager, args
        self.loop = greenlet.getcurrent()
        threads = [_SimThread(self, grid_point, p) for p in np.ndindex(*manager._block_dim)]
        odd = sum(grid_point) % 2
        self.threads = threads
        self.ready = deque(reversed(threads) if odd else threads)
        self.reverse = not odd    # the order the next barrier releases its threads in
        self.live = len(threads)
        self.at_syncthreads = []
        self.at_shuffle = {}      # warp -> its lanes waiting at a shuffle
        self.mailbox = ({}, {})   # thread id -> value, one box per shuffle parity
        self.error = None         # set on abort: what the waiting threads raise

    def run(self):
        while True:
            while self.ready:
                self.ready.popleft().switch()
            if not self.live:
                break
            # every live thread waits, and no barrier can open
            self._abort(RuntimeError(
                "simulated warp shuffle: not every lane of the warp reached it "
                "(a full-mask shuffle needs all of them)"))
        failed = [t.exception for t in self.threads if t.exception]
        if failed:
            cause = next((e for e in failed if not isinstance(e, _Aborted)), failed[0])
            raise cause

    def _release(self, waiters):
        self.ready.extend(sorted(waiters, key=_thread_id, reverse=self.reverse))
        self.reverse = not self.reverse

    def _wait(self, waiters, n_open):
        """Wait with ``waiters`` until they are ``n_open`` (the last one releases them)."""
        if self.error is not None:
            raise self.error
        waiters.append(greenlet.getcurrent())
        if len(waiters) == n_open:
            self._release(waiters)
            waiters.clear()
        self.loop.switch()
        if self.error is not None:
            raise self.error

    def syncthreads(self):
        self._wait(self.at_syncthreads, self.live)

    def shuffle(self, thread_id):
        warp = thread_id // WARP
        lanes = min(WARP, len(self.threads) - warp * WARP)
        self._wait(self.at_shuffle.setdefault(warp, []), lanes)

    def leave(self):
        self.live -= 1
        if self.error is None and self.at_syncthreads and len(self.at_syncthreads) == self.live:
            self._release(self.at_syncthreads)
            self.at_syncthreads = []

    def _abort(self, exc):
        if self.error is None:
            self.error = exc
            for waiters in (self.at_syncthreads, *self.at_shuffle.values()):
                self.ready.extend(waiters)
            self.at_syncthreads, self.at_shuffle = [], {}


if greenlet is not None:
    class _SimThread(greenlet.greenlet):
        """A simulated CUDA thread: what the simulator's kernel API reads from the current
        thread (threadIdx, blockIdx, thread_id, syncthreads and its _count/_and/_or, the
        last three taken from upstream's BlockThread at install())."""

        def __init__(self, block, grid_point, block_point):
            from numba.cuda.simulator.kernelapi import Dim3
            super().__init__(parent=block.loop)
            self.block, self._manager, self.exception = block, block.manager, None
            self.blockIdx, self.threadIdx = Dim3(*grid_point), Dim3(*block_point)
            bx, by, _ = block.manager._block_dim
            x, y, z = block_point
            self.thread_id = x + bx * (y + by * z)
            self.parity = 0  # which mailbox the next shuffle uses

        def syncthreads(self):
            self.block.syncthreads()

        def run(self):
            block = self.block
            try:
                if block.error is not None:
                    raise block.error
                if self._manager._debug:
                    with np.errstate(divide="raise"):
                        self._manager._f(*block.args)
                else:
                    self._manager._f(*block.args)
            except Exception as exc:
                block._abort(_Aborted(f"another thread of the block raised: {exc!r}"))
                # as upstream's BlockThread: the message names the thread and the block
                where = f"tid={list(self.threadIdx)} ctaid={list(self.blockIdx)}"
                self.exception = type(exc)(f"{where}: {exc}" if str(exc) else where)
                self.exception.__traceback__ = exc.__traceback__
            finally:
                block.leave()


class _Threading:
    """The ``threading`` module as the simulator's kernel API sees it: ``current_thread()``
    is the simulated thread running (a greenlet), else the OS thread."""

    def __getattr__(self, name):
        return getattr(threading, name)

    @staticmethod
    def current_thread():
        g = greenlet.getcurrent()
        return g if isinstance(g, _SimThread) else threading.current_thread()


def _exchange(value, src_lane):
    # Two mailboxes used alternately: a lane can only write the one it read before after the
    # whole warp passed the next shuffle, so one wait per shuffle is enough.
    t = greenlet.getcurrent()
    box = t.block.mailbox[t.parity]
    t.parity = 1 - t.parity
    box[t.thread_id] = value
    t.block.shuffle(t.thread_id)
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
    t = greenlet.getcurrent()
    t.block.shuffle(t.thread_id)


def _shared_array(self, shape, dtype, alignment=None):
    """FakeCUDAShared.array keyed, as upstream, by the caller's file and line, read from the
    caller's frame; dynamic (shape 0) and aligned ones go upstream."""
    if shape == 0 or alignment is not None:
        return _upstream["shared_array"](self, shape, dtype, alignment)
    from numba.cuda.simulator.kernelapi import numpy_support, types  # (what upstream uses)
    if isinstance(dtype, types.Type):
        dtype = numpy_support.as_dtype(dtype)
    caller = sys._getframe(1)
    key = (caller.f_code.co_filename, caller.f_lineno)
    res = self._allocations.get(key)
    if res is None:
        res = self._allocations[key] = np.empty(shape, dtype)
    return res


_held_swaps = {}  # id(module globals) -> the swap of its ``cuda`` global held for the launch


def _call_kernel(self, *args):
    """FakeCUDAKernel.__call__: a device function called during a launch swaps its module's
    ``cuda`` global once, held until the launch ends, not once per call."""
    from numba.cuda.simulator import kernel, kernelapi
    ctx = kernel._kernel_context
    if ctx is not None:
        gid = id(self.fn.__globals__)
        if gid not in _held_swaps:
            swap = kernelapi.swapped_cuda_module(self.fn, ctx)
            swap.__enter__()
            _held_swaps[gid] = swap
        return self.fn(*args)
    if self._device:
        return _upstream["call"](self, *args)
    try:
        return _upstream["call"](self, *args)
    finally:
        while _held_swaps:
            _held_swaps.popitem()[1].__exit__(None, None, None)


_upstream = {}


def _run_block(self, grid_point, *args):
    """BlockManager.run: the block's threads as greenlets of this thread (see _Block)."""
    _Block(self, grid_point, args).run()


def install():
    """Add the shuffles to the simulator's fake ``cuda`` module (no-op if present), run its
    blocks as greenlets and take the per-call costs out (see the module docstring)."""
    if greenlet is None:
        raise ImportError("gpuce under the CUDA simulator needs greenlet: pip install greenlet")
    from numba.cuda.simulator import kernelapi
    from numba.cuda.simulator.kernel import BlockManager, BlockThread, FakeCUDAKernel
    BlockManager.run = _run_block
    for name, cls, attr, fn in (("shared_array", kernelapi.FakeCUDAShared, "array", _shared_array),
                                ("call", FakeCUDAKernel, "__call__", _call_kernel)):
        if getattr(cls, attr) is not fn:
            _upstream[name] = getattr(cls, attr)
            setattr(cls, attr, fn)
    kernelapi.threading = _Threading()
    for name in ("syncthreads_count", "syncthreads_and", "syncthreads_or"):
        setattr(_SimThread, name, getattr(BlockThread, name))
    for name, fn in (("shfl_sync", shfl_sync), ("shfl_up_sync", shfl_up_sync),
                     ("shfl_down_sync", shfl_down_sync), ("shfl_xor_sync", shfl_xor_sync),
                     ("syncwarp", syncwarp)):
        if not hasattr(kernelapi.FakeCUDAModule, name):
            setattr(kernelapi.FakeCUDAModule, name, fn)
