"""CPU cross entropy for short rows (C <= MAX_C), hard targets, no softcap / smoothing / z-loss.

The generic kernels pay per-row loops of unknown length; here C is a compile-time constant
(one build per C), so every per-row loop unrolls and the loops over rows vectorise: the max,
the exp (one flat loop over a block), the sums, and a vectorisable log (one per row).
Same semantics as ``cpu.make_kernels(...)["ce_hard"]`` restricted to those options. The
kernel is the whole call: it also checks the targets, forms the mean's divisor and sums the
row losses, so a tiny call is one dispatch (see ``gpuce._cpu.small_cross_entropy``).
"""
import math
from functools import lru_cache

import numpy as np
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import cpu_math as cm
from .cpu import BLOCK_ELEMS, launch_shape  # noqa: F401  (same blocking as the generic kernels)
from .cpu_cache import attach, cached
from .cpu_tasks import DriverCache, drivers

MAX_C = 32
_SQRT2_32 = np.float32(1.4142135623730951)
_LN2_32 = np.float32(0.6931471805599453)
# numpy's error model: x / 0 gives inf/NaN instead of a Python-style check, which would
# also stop the row loops from vectorising
_jit = njit(inline="never", fastmath=cm.FASTMATH, error_model="numpy")


@_jit
def log_pos_f32(s):
    """log(s) for finite normal float32 s > 0, ~1 ulp, as straight-line code (vectorises):
    s = 2^k f, f in [sqrt(1/2), sqrt(2)), log f = 2 atanh((f-1)/(f+1)) by its odd series.
    0 -> -inf, NaN -> NaN (a softmax sum is 0, NaN or in [1, C])."""
    s = np.float32(s)
    bits = cm._f32_to_bits(s)
    k = (bits >> 23) - 127
    f = cm._bits_to_f32((bits & 0x007FFFFF) | 0x3F800000)
    big = f > _SQRT2_32
    f = f * np.float32(0.5) if big else f
    k = k + 1 if big else k
    t = (f - np.float32(1.0)) / (f + np.float32(1.0))
    t2 = t * t
    p = np.float32(1.0 / 9.0)
    p = p * t2 + np.float32(1.0 / 7.0)
    p = p * t2 + np.float32(1.0 / 5.0)
    p = p * t2 + np.float32(1.0 / 3.0)
    p = p * t2 + np.float32(1.0)
    r = np.float32(k) * _LN2_32 + np.float32(2.0) * t * p
    # selects, not branches, so a loop of these vectorises; s here is 0, NaN or >= 1
    return r if s > np.float32(0.0) else (np.float32(-np.inf) if s == np.float32(0.0) else s)


@_jit
def log_f64(s):
    return math.log(s) if s > 0.0 else (-np.inf if s == 0.0 else s)


_TRAITS = {"float32": (cm.exp_nonpos_f32, log_pos_f32, np.float32),
           "float64": (cm.exp_nonpos_f64, log_f64, np.float64)}


@lru_cache(maxsize=None)
def _small_tasks(dtype_name, n_cls):
    """(tasks, variant): the kernel's row work as a serial function of (x, g, tgt, w, go,
    go_step, ignore_index, inv_ce, loss_out, write_grad, per_block, n_tasks, t0, t1) running
    tasks t0..t1, each a contiguous share of the row blocks. Both builds run it through
    cpu_tasks' symbol, so their rows agree to the bit and both are cached on disk."""
    exp, log, acc = _TRAITS[dtype_name]
    C = n_cls
    variant = f"small dtype={dtype_name} C={C} fastmath={sorted(cm.FASTMATH)}"
    ZERO = acc(0.0)
    ONE = acc(1.0)
    NEG_INF = acc(-np.inf)
    INF = acc(np.inf)

    @cached(_jit, variant)
    def ce_hard_small_tasks(x, g, tgt, w, go, go_step, ignore_index, inv_ce, loss_out,
                            write_grad, per_block, n_tasks, t0, t1):
        n_rows = x.shape[0]
        for t in range(t0, t1):
            scratch = np.empty((per_block, C), dtype=acc)
            k = np.empty(per_block, dtype=acc)
            gap = np.empty(per_block, dtype=acc)  # max - target logit
            w_y = np.empty(per_block, dtype=acc)
            kept_f = np.empty(per_block, dtype=acc)
            a_y = np.empty(per_block, dtype=acc)  # grad_output * w_y / den
            n_blocks = (n_rows + per_block - 1) // per_block
            for b in range(t * n_blocks // n_tasks, (t + 1) * n_blocks // n_tasks):
                r0 = b * per_block
                n = min(per_block, n_rows - r0)
                xb = x[r0:r0 + n]
                e = g[r0:r0 + n] if write_grad else scratch[:n]
                tb = tgt[r0:r0 + n]  # (rows from 0 in slices: contiguous vectors, not gathers)
                lb = loss_out[r0:r0 + n]
                for i in range(n):  # row max, the shifted row, the target's logit and
                    xi = xb[i]          # weight: C is a constant, so this unrolls and the
                    mi = xi[0]          # row stays in registers
                    for c in range(1, C):
                        v = xi[c]
                        mi = v if v > mi else mi
                    mi = ZERO if mi == NEG_INF else mi
                    ei = e[i]
                    for c in range(C):
                        ei[c] = xi[c] - mi
                    y = tb[i]
                    kept = y != ignore_index
                    yc = y if kept else 0
                    gap[i] = mi - xi[yc]
                    w_y[i] = w[yc] * inv_ce if kept else ZERO
                    kept_f[i] = ONE if kept else ZERO
                ef = e.reshape(-1)
                for j in range(n * C):  # one flat vector loop
                    ef[j] = exp(ef[j])
                for i in range(n):  # the sums
                    ei = e[i]
                    s = ZERO
                    for c in range(C):
                        s += ei[c]
                    k[i] = s
                if go_step:  # one grad_output per row (reduction='none')
                    gb = go[r0:r0 + n]
                    for i in range(n):
                        a_y[i] = gb[i] * w_y[i]
                else:
                    a = go[0]
                    for i in range(n):
                        a_y[i] = a * w_y[i]
                for i in range(n):  # no gathers, no branches: this loop vectorises
                    s = k[i]
                    # -log p_y = (m - z_y) + log s in this order (cm.gap_plus): the gap comes
                    # from memory, formed in another loop, so fast-math cannot reassociate it
                    # with log s, and no fence stops this loop from vectorising
                    loss = w_y[i] * (gap[i] + log(s)) if w_y[i] != ZERO else ZERO
                    loss = loss if s != ZERO else INF * inv_ce  # all -inf: +inf, gradient 0
                    lb[i] = loss if kept_f[i] != ZERO else ZERO
                    k[i] = a_y[i] / s if s != ZERO else ZERO  # NaN s: NaN row
                if write_grad:
                    for i in range(n):
                        ki = k[i]
                        ei = e[i]
                        for c in range(C):
                            ei[c] = ki * ei[c]
                    for i in range(n):  # the target element, p - 1 from unrounded terms
                        y = tb[i]
                        if y == ignore_index:  # zeros even where the row holds NaN
                            for c in range(C):
                                e[i, c] = ZERO
                        elif k[i] != ZERO:
                            e[i, y] -= a_y[i]

    return ce_hard_small_tasks, variant


def _task_argtys(sig):
    """The tasks' argument types from the whole call's: ``mean`` (bool) becomes ``inv_ce``
    (the accumulator dtype, that of ``w``), and the task index follows."""
    args = list(sig)
    args[7] = args[3].dtype
    return tuple(args) + (types.int64, types.int64)


@lru_cache(maxsize=None)
def make_ce_hard_small(dtype_name, n_cls, parallel=True):
    """ce_hard for rows of exactly ``n_cls`` classes, logits and gradient in ``dtype_name``
    (float32/float64: the gradient buffer holds e, as in the generic kernel). Cached on disk
    in both builds."""
    tasks, task_variant = _small_tasks(dtype_name, n_cls)
    run_tasks = drivers(tasks, task_variant)[bool(parallel)]
    acc = _TRAITS[dtype_name][2]
    C = n_cls
    variant = f"{task_variant} whole call parallel={bool(parallel)}"

    def ce_hard_small(x, g, tgt, w, go, go_step, ignore_index, mean, loss_out, write_grad,
                      per_block, n_tasks):
        """-> (sum of the row losses in float64, -1), or (0, first row whose target is
        outside [0, C) and not ignore_index) having written nothing."""
        n_rows = x.shape[0]
        w_kept = 0.0  # the mean's divisor, accumulated in float64
        for i in range(n_rows):
            y = tgt[i]
            if y != ignore_index:
                if y < 0 or y >= C:
                    return 0.0, i
                w_kept += w[y]
        inv_ce = acc((0.0 if w_kept == 0.0 else 1.0 / w_kept) if mean else 1.0)
        run_tasks(x, g, tgt, w, go, go_step, ignore_index, inv_ce, loss_out, write_grad,
                  per_block, n_tasks)
        total = 0.0
        for i in range(n_rows):
            total += loss_out[i]
        return total, -1
    return attach(njit(error_model="numpy")(ce_hard_small), variant,
                  lambda py_func, v: DriverCache(py_func, v, tasks, task_variant, _task_argtys))


@intrinsic
def _address(typingctx, addr):
    """An integer address (``tensor.data_ptr()``) as a void pointer, for numba.carray."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(types.int64), codegen


@lru_cache(maxsize=None)
def make_ce_hard_small_at(dtype_name, n_cls):
    """The serial ``make_ce_hard_small(dtype_name, n_cls, False)`` on buffers given by address
    (C-contiguous logits and gradient (n_rows, n_cls), int64 targets, the row losses or 0 for
    only their sum), weights and grad_output 1: for a caller holding torch tensors, whose
    numpy views cost more than a tiny call's kernel. Returns what the kernel returns."""
    kernel = make_ce_hard_small(dtype_name, n_cls, False)
    acc = _TRAITS[dtype_name][2]
    C = n_cls
    per_block = max(1, BLOCK_ELEMS // C)
    tasks, task_variant = _small_tasks(dtype_name, n_cls)
    variant = f"small-at dtype={dtype_name} C={C} fastmath={sorted(cm.FASTMATH)}"
    nb_acc = types.float32 if acc is np.float32 else types.float64
    rows, vec = types.Array(nb_acc, 2, "C"), types.Array(nb_acc, 1, "C")
    i64 = types.int64
    argtys = (rows, rows, types.Array(i64, 1, "C"), vec, vec, i64, i64, nb_acc, vec,
              types.boolean, i64, i64, i64, i64)  # the tasks' arguments in this call

    def ce_hard_small_at(x_at, g_at, tgt_at, loss_at, n_rows, ignore_index, mean):
        x = carray(_address(x_at), (n_rows, C), acc)
        g = carray(_address(g_at), (n_rows, C), acc)
        tgt = carray(_address(tgt_at), (n_rows,), np.int64)
        loss = carray(_address(loss_at), (n_rows,), acc) if loss_at else np.empty(n_rows, acc)
        return kernel(x, g, tgt, np.ones(C, acc), np.ones(1, acc), 0, ignore_index, mean, loss,
                      True, per_block, 1)
    return attach(njit(error_model="numpy")(ce_hard_small_at), variant,
                  lambda py_func, v: DriverCache(py_func, v, tasks, task_variant,
                                                 lambda sig: argtys))
