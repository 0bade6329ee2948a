"""Warp shuffles for Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1), which lacks them.

The simulator runs every thread of a block as a Python thread. A shuffle here is an
exchange through a dict on the block's manager: each thread posts its value, waits at a
block barrier, reads its partner lane (inside its own warp of 32; a lane that does not
exist returns the caller's own value), and waits again so the dict can be reused. This is
only valid where every live thread of the block reaches the same shuffle, which holds in
gpuce's kernels: all shuffles sit in code that the whole block runs in step (a thread that
has already returned no longer counts at the simulator's barriers).

``install()`` is idempotent and is called by gpuce when the simulator is on, so users
debugging their own kernels get the shuffles too.
"""
import threading

WARP = 32


def _exchange(value, src_lane):
    t = threading.current_thread()
    box = t._manager.__dict__.setdefault("_gpuce_shfl", {})
    box[t.thread_id] = value
    t.syncthreads()
    lane = t.thread_id % WARP
    src = src_lane(lane)
    if 0 <= src < WARP:
        got = box.get(t.thread_id - lane + src, value)
    else:
        got = value
    t.syncthreads()
    return got


def shfl_sync(self, mask, value, src_lane):
    return _exchange(value, lambda lane: src_lane)


def shfl_up_sync(self, mask, value, delta):
    return _exchange(value, lambda lane: lane - delta)


def shfl_down_sync(self, mask, value, delta):
    return _exchange(value, lambda lane: lane + delta)


def shfl_xor_sync(self, mask, value, lane_mask):
    return _exchange(value, lambda lane: lane ^ lane_mask)


def syncwarp(self, mask=0xFFFFFFFF):
    threading.current_thread().syncthreads()


def install():
    """Add the shuffles to the simulator's fake ``cuda`` module (no-op if present)."""
    from numba.cuda.simulator.kernelapi import FakeCUDAModule
    for name, fn in (("shfl_sync", shfl_sync), ("shfl_up_sync", shfl_up_sync),
                     ("shfl_down_sync", shfl_down_sync), ("shfl_xor_sync", shfl_xor_sync),
                     ("syncwarp", syncwarp)):
        if not hasattr(FakeCUDAModule, name):
            setattr(FakeCUDAModule, name, fn)
