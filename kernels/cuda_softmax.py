"""softmax / log_softmax / logsumexp on the GPU, with the same four strategies as the
cross-entropy kernels (see cuda_cross_entropy). ``mode``: 0 softmax, 1 log_softmax (both
write ``out`` in the storage dtype), 2 logsumexp (writes ``lse`` in the accumulator dtype).

An all -inf row has softmax 0 and logsumexp -inf (log_softmax is then -inf - -inf = NaN,
as in the CPU kernels and the reference). log_softmax is (z - max) - log s, exact for large
logits.
"""
import math
from functools import lru_cache

from numba import cuda, types

from .cuda_cross_entropy import U, WARP_SHAPES, warp_shape
from .cuda_dtypes import array, traits
from .cuda_reduce import reductions
from .cuda_rowmath import rowmath

SOFTMAX, LOG_SOFTMAX, LOGSUMEXP = 0, 1, 2


def softmax_signature(dt, kind):
    T = traits(dt)
    st, acc = array(T.storage), array(T.acc)
    i64 = types.int64
    if kind == "split_partial":
        return types.void(st, acc, i64, i64, i64)
    if kind == "split_finish":
        return types.void(st, st, acc, acc, i64, i64, i64, i64)
    return types.void(st, st, acc, i64, i64, i64, i64)


@lru_cache(maxsize=None)
def softmax_kernel(strategy, dt):
    R = rowmath(dt)
    RD = reductions(R.T.acc_np)
    acc = R.T.acc
    NEG_INF, ZERO, ONE = R.NEG_INF, R.ZERO, R.ONE
    i64 = types.int64
    load, store = R.load, R.store

    @cuda.jit(device=True, inline="always")
    def row_end(s, m):
        """(1/s or 0, log s) from a finite_max'd m and s = sum exp(x - m)."""
        if s > ZERO:
            return ONE / s, math.log(s)
        return ZERO, NEG_INF

    if strategy in WARP_SHAPES:
        TPR, VPT = warp_shape(strategy, dt)
        LOG2 = TPR.bit_length() - 1

        def softmax_warp(x, out, lse, n_rows, n_cls, mode, unused):
            vals = cuda.local.array(VPT, acc)
            tid = i64(cuda.threadIdx.x)
            lane = tid & (TPR - 1)
            per_block = i64(cuda.blockDim.x) >> LOG2
            for first in range(i64(cuda.blockIdx.x) * per_block, n_rows,
                               i64(cuda.gridDim.x) * per_block):
                row = first + (tid >> LOG2)
                live = row < n_rows
                off = row * n_cls
                m = NEG_INF
                for j in range(VPT):
                    c = j * TPR + lane
                    z = NEG_INF
                    if live and c < n_cls:
                        z = load(x[U(off + c)])
                    vals[j] = z
                    if z > m:
                        m = z
                m = R.finite_max(RD.warp_max(m, TPR))
                s = ZERO
                for j in range(VPT):
                    e = math.exp(vals[j] - m)
                    s += e
                    if mode == SOFTMAX:
                        vals[j] = e
                s = RD.warp_sum(s, TPR)
                inv, log_s = row_end(s, m)
                if not live:
                    continue
                if mode == LOGSUMEXP:
                    if lane == 0:
                        lse[U(row)] = m + log_s
                    continue
                for j in range(VPT):
                    c = j * TPR + lane
                    if c < n_cls:
                        out[U(off + c)] = store(vals[j] * inv if mode == SOFTMAX
                                                else (vals[j] - m) - log_s)
        return softmax_warp

    if strategy in ("block_cached", "block"):
        cached = strategy == "block_cached"

        def softmax_block(x, out, lse, n_rows, n_cls, mode, unused):
            cache = cuda.shared.array(0, acc)
            buf_m = cuda.shared.array(32, acc)
            buf_s = cuda.shared.array(32, acc)
            tid = i64(cuda.threadIdx.x)
            bd = i64(cuda.blockDim.x)
            for row in range(i64(cuda.blockIdx.x), n_rows, i64(cuda.gridDim.x)):
                off = row * n_cls
                m = NEG_INF
                s = ZERO
                if cached:
                    for c in range(tid, n_cls, bd):
                        z = load(x[U(off + c)])
                        cache[U(c)] = z
                        if z > m:
                            m = z
                    m = R.finite_max(RD.block_max(m, buf_m))
                    for c in range(tid, n_cls, bd):
                        e = math.exp(cache[U(c)] - m)
                        s += e
                        if mode == SOFTMAX:
                            cache[U(c)] = e  # each thread only touches its own columns
                    s = RD.block_sum(s, buf_s)
                else:
                    for c in range(tid, n_cls, bd):
                        m, s = R.online(m, s, load(x[U(off + c)]))
                    m, s = RD.block_merge(m, s, buf_m, buf_s)
                    m = R.finite_max(m)
                inv, log_s = row_end(s, m)
                if mode == LOGSUMEXP:
                    if tid == 0:
                        lse[U(row)] = m + log_s
                    continue
                for c in range(tid, n_cls, bd):
                    if cached:
                        v = cache[U(c)] * inv if mode == SOFTMAX else (cache[U(c)] - m) - log_s
                    else:
                        z = load(x[U(off + c)])
                        v = math.exp(z - m) * inv if mode == SOFTMAX else (z - m) - log_s
                    out[U(off + c)] = store(v)
        return softmax_block

    if strategy == "split_partial":
        def softmax_split_partial(x, ws, n_rows, n_cls, n_split):
            buf_m = cuda.shared.array(32, acc)
            buf_s = cuda.shared.array(32, acc)
            tid = i64(cuda.threadIdx.x)
            bd = i64(cuda.blockDim.x)
            length = (n_cls + n_split - 1) // n_split
            for b in range(i64(cuda.blockIdx.x), n_rows * n_split, i64(cuda.gridDim.x)):
                row = b // n_split
                lo = (b - row * n_split) * length
                off = row * n_cls
                m = NEG_INF
                s = ZERO
                for c in range(lo + tid, min(n_cls, lo + length), bd):
                    m, s = R.online(m, s, load(x[U(off + c)]))
                m, s = RD.block_merge(m, s, buf_m, buf_s)
                if tid == 0:
                    ws[U(2 * b)] = m
                    ws[U(2 * b + 1)] = s
        return softmax_split_partial

    if strategy == "split_finish":
        def softmax_split_finish(x, out, lse, ws, n_rows, n_cls, mode, n_split):
            tid = i64(cuda.threadIdx.x)
            bd = i64(cuda.blockDim.x)
            length = (n_cls + n_split - 1) // n_split
            for b in range(i64(cuda.blockIdx.x), n_rows * n_split, i64(cuda.gridDim.x)):
                row = b // n_split
                chunk = b - row * n_split
                if mode == LOGSUMEXP and chunk != 0:
                    continue
                m = NEG_INF
                s = ZERO
                for k in range(n_split):  # a fixed order: every block gets the same bits
                    m, s = RD.merge(m, s, ws[U(2 * (row * n_split + k))],
                                    ws[U(2 * (row * n_split + k) + 1)])
                m = R.finite_max(m)
                inv, log_s = row_end(s, m)
                if mode == LOGSUMEXP:
                    if tid == 0:
                        lse[U(row)] = m + log_s
                    continue
                off = row * n_cls
                lo = chunk * length
                for c in range(lo + tid, min(n_cls, lo + length), bd):
                    z = load(x[U(off + c)])
                    out[U(off + c)] = store(math.exp(z - m) * inv if mode == SOFTMAX
                                            else (z - m) - log_s)
        return softmax_split_finish

    raise KeyError(strategy)
