"""float32 tanh for the softcap, from the hardware's approximate ex2 and rcp (MUFU.EX2,
MUFU.RCP): no division and no branch, at most 2 ulps from the float64 tanh
(tests/test_cuda_tanh.py).

    |u| <  0.75: u + u^3 P(u^2), P of degree 4 (minimax on the relative error, 0.6 ulp)
    |u| >= 0.75: sign(u) (1 - 2 / (2^(2 log2(e) |u|) + 1))
                 (from 0.75 on, 2 / (e^2u + 1) < 0.37: the cancellation costs < 1.5 ulps)

Both sides are computed on |u| and one is selected, then given u's sign. inf gives +-1, NaN stays NaN. ``make_tanh``
builds it from any jit and any ex2/rcp: the GPU uses PTX ``ex2.approx.ftz.f32`` /
``rcp.approx.ftz.f32`` (inputs of both are >= 1 here: flushing subnormals changes nothing),
the simulator and the CPU test numpy's correctly rounded exp2 and 1/x.
"""
import math

import numpy as np
from numba import cuda, types

from .cuda_dtypes import SIMULATOR, device

F = np.float32
ONE, TWO = F(1.0), F(2.0)
SMALL = F(0.75)
TWO_LOG2E = F(2.0 / math.log(2.0))
# tanh(u) = u + u s (P0 + P1 s + ... + P4 s^4), s = u^2, on |u| < 0.75
P0, P1, P2, P3, P4 = (F(-0.333330899477005), F(0.13326787948608398), F(-0.05340050533413887),
                      F(0.01968025602400303), F(-0.004777031950652599))


def make_tanh(jit, ex2, rcp, fma):
    """tanh_f32(u) compiled by ``jit``, with ``ex2(v)`` = 2^v, ``rcp(v)`` = 1/v and
    ``fma(a, b, c)`` = a b + c (here always exact before the rounding: b = -2)."""
    @jit
    def tanh_f32(u):
        a = abs(u)
        s = a * a
        small = a * s * ((((P4 * s + P3) * s + P2) * s + P1) * s + P0) + a
        big = fma(rcp(ex2(a * TWO_LOG2E) + ONE), -TWO, ONE)  # (one FFMA, not two FADDs)
        return math.copysign(small if a < SMALL else big, u)  # (tanh(-0) = -0)
    return tanh_f32


if SIMULATOR:
    def ex2(v):
        return F(np.exp2(F(v)))

    def rcp(v):
        return F(ONE / F(v))

    def fma(a, b, c):
        return F(F(a) * F(b) + F(c))
else:
    from llvmlite import ir
    from numba.cuda.extending import intrinsic

    def _approx_intrinsic(inst):
        @intrinsic
        def op(typingctx, v):
            sig = types.float32(types.float32)

            def codegen(context, builder, sig, args):
                f32 = ir.FloatType()
                asm = ir.InlineAsm(ir.FunctionType(f32, [f32]), f"{inst} $0, $1;", "=f,f")
                return builder.call(asm, [args[0]])
            return sig, codegen
        return op

    ex2 = _approx_intrinsic("ex2.approx.ftz.f32")
    rcp = _approx_intrinsic("rcp.approx.ftz.f32")

    @device
    def fma(a, b, c):
        return cuda.fma(a, b, c)

tanh_f32 = make_tanh(device, ex2, rcp, fma)
