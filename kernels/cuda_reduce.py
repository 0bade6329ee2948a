"""The one reduction module of the CUDA kernels: warp shuffles and a block reduction.

Warp reductions are xor butterflies over ``width`` lanes (a power of two <= 32): every lane
of each aligned group of ``width`` lanes ends with the group's result, so a warp can serve
several short rows at once. The block reductions reduce each warp, pass the warp results
through shared memory, and let *every* warp reduce those again, so all threads hold the
result without a broadcast barrier (and all threads of the block reach every shuffle, which
the simulator's shuffles need).

``(m, s)`` pairs are the online softmax state: m the running max, s = sum exp(z - m). Merging
two pairs never computes -inf - (-inf): an all -inf pair is (-inf, 0) and stays neutral.

Blocks must be whole warps (a full-mask shuffle needs every lane of the warp).
Everything is typed by the accumulator (float32 or float64): ``reductions(acc_np)``.
"""
import math
from functools import lru_cache

import numpy as np
from numba import cuda, types

from .cuda_dtypes import SIMULATOR, device, namespace

if SIMULATOR:
    from . import cuda_simulator
    cuda_simulator.install()

FULL_MASK = 0xFFFFFFFF
WARP = 32
LOG2_WARP = 5
U32 = types.uint32


@lru_cache(maxsize=None)
def reductions(acc_np):
    """Reduction device functions for accumulator type ``acc_np`` (np.float32 / np.float64)."""
    NEG_INF = acc_np(-math.inf)
    ZERO = acc_np(0.0)

    @device
    def merge(m1, s1, m2, s2):
        """Combine two online-softmax states."""
        m = m1 if m1 > m2 else m2
        if m == NEG_INF:
            return NEG_INF, ZERO
        return m, s1 * math.exp(m1 - m) + s2 * math.exp(m2 - m)

    @device
    def warp_max(v, width):
        off = width >> 1
        while off > 0:
            o = cuda.shfl_xor_sync(FULL_MASK, v, off)
            v = max(v, o)  # (max.f32; no value here is NaN)
            off >>= 1
        return v

    @device
    def warp_sum(v, width):
        off = width >> 1
        while off > 0:
            v += cuda.shfl_xor_sync(FULL_MASK, v, off)
            off >>= 1
        return v

    @device
    def warp_merge(m, s, width):
        off = width >> 1
        while off > 0:
            m2 = cuda.shfl_xor_sync(FULL_MASK, m, off)
            s2 = cuda.shfl_xor_sync(FULL_MASK, s, off)
            m, s = merge(m, s, m2, s2)
            off >>= 1
        return m, s

    # a thread's lane and warp, and the warp count, in unsigned 32 bits (masks and shifts: no
    # 64-bit signed division, nor 64-bit values kept live across a kernel's row loop)
    @device
    def _nwarps():
        return U32(U32(cuda.blockDim.x) + U32(WARP - 1)) >> U32(LOG2_WARP)

    @device
    def _lane():
        return U32(cuda.threadIdx.x) & U32(WARP - 1)

    @device
    def _warp():
        return U32(cuda.threadIdx.x) >> U32(LOG2_WARP)

    @device
    def block_max(v, buf):
        """Max over the block; buf is a shared array of >= 32 accumulators."""
        v = warp_max(v, WARP)
        lane = _lane()
        cuda.syncthreads()  # the previous reduction may still be reading buf
        if lane == 0:
            buf[_warp()] = v
        cuda.syncthreads()
        return warp_max(buf[lane] if lane < _nwarps() else NEG_INF, WARP)

    @device
    def block_sum(v, buf):
        v = warp_sum(v, WARP)
        lane = _lane()
        cuda.syncthreads()
        if lane == 0:
            buf[_warp()] = v
        cuda.syncthreads()
        return warp_sum(buf[lane] if lane < _nwarps() else ZERO, WARP)

    @device
    def block_merge(m, s, buf_m, buf_s):
        m, s = warp_merge(m, s, WARP)
        lane = _lane()
        cuda.syncthreads()
        if lane == 0:
            buf_m[_warp()] = m
            buf_s[_warp()] = s
        cuda.syncthreads()
        m, s = NEG_INF, ZERO
        if lane < _nwarps():
            m, s = buf_m[lane], buf_s[lane]
        return warp_merge(m, s, WARP)

    return namespace(merge=merge, warp_max=warp_max, warp_sum=warp_sum,
                           warp_merge=warp_merge, block_max=block_max, block_sum=block_sum,
                           block_merge=block_merge)


@lru_cache(maxsize=None)
def grid_sums():
    """A deterministic sum over a whole grid in one launch: each block adds its threads'
    float64 values in a fixed tree and writes one partial; the last block to finish (an
    atomic ticket on ``ctr[slot]``, an int32 the caller zeroed once) adds the partials in
    block order and resets the ticket for the next launch. No float atomics, so the same
    call gives the same bits; the grid must be a fixed function of the problem size."""
    RD = reductions(np.float64)
    ZERO = np.float64(0.0)

    @device
    def last_block_done(ctr, slot, flag):
        """Call after thread 0 wrote this block's partials: True (in every thread) in the
        last block of the grid, which may then read every block's partials."""
        cuda.syncthreads()
        if cuda.threadIdx.x == 0:
            cuda.threadfence()  # this block's partials are visible before its ticket
            n_blocks = cuda.gridDim.x
            flag[0] = 1 if cuda.atomic.add(ctr, slot, 1) == n_blocks - 1 else 0
        cuda.syncthreads()
        if flag[0] != 0:
            cuda.threadfence()
            if cuda.threadIdx.x == 0:
                ctr[slot] = 0  # every block has taken its ticket: ready for the next launch
            return True
        return False

    @device
    def grid_total(v, part, ctr, slot, out, buf, flag):
        """out[0] = the sum of every thread's v over the grid (float64 inside)."""
        t = RD.block_sum(v, buf)
        if cuda.threadIdx.x == 0:
            part[cuda.blockIdx.x] = t
        if last_block_done(ctr, slot, flag):
            t = ZERO
            for b in range(cuda.threadIdx.x, cuda.gridDim.x, cuda.blockDim.x):
                t += part[b]
            t = RD.block_sum(t, buf)
            if cuda.threadIdx.x == 0:
                out[0] = t

    return namespace(last_block_done=last_block_done, grid_total=grid_total)
