"""The implementations ``gpuce bench`` times: gpuce itself and every peer, per device.

Each adapter is small:

- ``available(device)`` returns None when it can run here, else the reason (a missing
  library, a CPU build of torch, ...). A missing peer is skipped with that note, never faked.
- ``unsupported(op, dtype)`` returns the reason it cannot run one op or dtype natively, or
  None. Peers run in the dtype they are given or not at all: nothing is upcast behind the
  table's back.
- ``setup(op, case)`` returns a ``Prepared``: ``run(i)`` computes ``op`` on the i-th rotated
  copy of the inputs and returns its result (the output array; the loss; or ``(loss, grad)``
  for the fused forward+backward); ``pre(i)``, if any, runs untimed before each call.

Every implementation computes the same thing: softmax / log_softmax over the last axis;
the mean cross-entropy over rows of integer class indices; and for ``ce_fwd_bwd`` that loss
together with its gradient with respect to the logits.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .bench_core import OPS, _try_import


@dataclass
class Prepared:
    run: Callable
    pre: Optional[Callable] = None


class Impl:
    name = ""          # key in the JSON
    label = ""         # column header in the table
    ops = OPS
    is_gpuce = False   # gpuce's own: every row checked, a failure is an error, not a skip
    note = ""          # shown in the legend

    def available(self, device):
        return None

    def unsupported(self, op, dtype):
        if op not in self.ops:
            return f"{self.label} has no {op}"
        return None

    def setup(self, op, case):
        raise NotImplementedError


# ---- gpuce -----------------------------------------------------------------------------

class Gpuce(Impl):
    """gpuce's public functions. ``out=True`` passes a preallocated output buffer."""

    def __init__(self, out=False):
        self.out = out
        self.name = "gpuce_out" if out else "gpuce"
        self.label = "gpuce(out=)" if out else "gpuce"
        self.ops = ("softmax", "log_softmax", "ce_fwd_bwd") if out else OPS
        self.is_gpuce = True
        self.note = ("the output is written into a preallocated buffer (out=)" if out else
                     "default call: allocates its output, as the peers do")

    def unsupported(self, op, dtype):
        if self.out and op not in self.ops:
            return f"out= is for outputs of the logits' shape; {op} has none"
        return super().unsupported(op, dtype)

    def available(self, device):
        if device.kind == "cpu":
            return None
        try:  # the CUDA backend is whatever gpuce registers for device arrays
            import gpuce
            x = device.upload(np.zeros((2, 4), dtype=np.float32))
            gpuce.softmax(x)
            device.synchronize()
        except Exception as exc:
            return f"gpuce's CUDA backend did not run: {type(exc).__name__}: {exc}"
        return None

    def setup(self, op, case):
        import gpuce
        xs, ts = case.xs, case.ts
        if not self.out:
            if op == "softmax":
                return Prepared(lambda i: gpuce.softmax(xs[i]))
            if op == "log_softmax":
                return Prepared(lambda i: gpuce.log_softmax(xs[i]))
            if op == "ce_fwd":
                return Prepared(lambda i: gpuce.cross_entropy(xs[i], ts[i]))
            return Prepared(lambda i: gpuce.cross_entropy_with_grad(xs[i], ts[i]))
        outs = [case.device.empty_like(x) for x in xs]
        if op == "softmax":
            return Prepared(lambda i: gpuce.softmax(xs[i], out=outs[i]))
        if op == "log_softmax":
            return Prepared(lambda i: gpuce.log_softmax(xs[i], out=outs[i]))
        return Prepared(lambda i: gpuce.cross_entropy_with_grad(xs[i], ts[i], out=outs[i]))


# ---- PyTorch ---------------------------------------------------------------------------

class TorchEager(Impl):
    name, label = "torch", "torch"
    note = "torch.softmax / log_softmax; F.cross_entropy, then .backward() for the gradient"

    def available(self, device):
        torch = _try_import("torch")
        if torch is None:
            return "torch is not installed"
        if device.kind == "cuda" and device.lib != "torch" and not torch.cuda.is_available():
            return f"torch {torch.__version__} has no CUDA"
        return None

    def unsupported(self, op, dtype):
        return super().unsupported(op, dtype)

    def _inputs(self, case):
        xs = [case.device.to_torch(x) for x in case.xs]
        ts = [case.device.to_torch(t) for t in case.ts]
        return xs, ts

    def setup(self, op, case):
        import torch
        import torch.nn.functional as F
        xs, ts = self._inputs(case)
        return _torch_fns(op, xs, ts, torch.softmax, torch.log_softmax, F.cross_entropy)


def _torch_fns(op, xs, ts, softmax, log_softmax, cross_entropy):
    import torch
    if op == "softmax":
        return Prepared(lambda i: softmax(xs[i], -1))
    if op == "log_softmax":
        return Prepared(lambda i: log_softmax(xs[i], -1))
    if op == "ce_fwd":
        def fwd(i):
            with torch.no_grad():
                return cross_entropy(xs[i], ts[i])
        return Prepared(fwd)
    leaves = [x.detach().requires_grad_() for x in xs]

    def pre(i):
        leaves[i].grad = None  # as optimizer.zero_grad(set_to_none=True): a fresh gradient

    def fwd_bwd(i):
        loss = cross_entropy(leaves[i], ts[i])
        loss.backward()
        return loss.detach(), leaves[i].grad
    return Prepared(fwd_bwd, pre)


class TorchCompile(TorchEager):
    name, label = "torch_compile", "torch.compile"
    note = "torch.compile of the same torch functions (compiled during warm-up)"

    def available(self, device):
        reason = super().available(device)
        if reason:
            return reason
        import torch
        if not hasattr(torch, "compile"):
            return "torch.compile is not available in this torch"
        return None

    def setup(self, op, case):
        import torch
        import torch.nn.functional as F
        torch._dynamo.reset()  # a fresh cache per case: no recompile limits, no dynamic shapes
        xs, ts = self._inputs(case)
        softmax = torch.compile(lambda x, d: torch.softmax(x, d), dynamic=False)
        log_softmax = torch.compile(lambda x, d: torch.log_softmax(x, d), dynamic=False)
        cross_entropy = torch.compile(lambda x, t: F.cross_entropy(x, t), dynamic=False)
        return _torch_fns(op, xs, ts, softmax, log_softmax, cross_entropy)


# ---- numpy and scipy (CPU) -------------------------------------------------------------

_HOST_DTYPES = ("float16", "float32", "float64")


class Numpy(Impl):
    name, label = "numpy", "numpy"
    note = "vectorised numpy, in place where it can be (numpy's ufuncs are single-threaded)"

    def unsupported(self, op, dtype):
        if dtype not in _HOST_DTYPES:
            return f"numpy has no {dtype} arithmetic (ml_dtypes only converts)"
        return super().unsupported(op, dtype)

    def setup(self, op, case):
        xs, ts = case.xs, case.ts
        rows = np.arange(case.n)
        inv_n = 1.0 / case.n

        def stats(x):
            m = x.max(axis=1, keepdims=True)
            e = np.subtract(x, m)
            np.exp(e, out=e)
            s = e.sum(axis=1, keepdims=True)
            return m, e, s

        def softmax(i):
            _, e, s = stats(xs[i])
            e /= s
            return e

        def log_softmax(i):
            x = xs[i]
            m, e, s = stats(x)
            np.subtract(x, m + np.log(s), out=e)
            return e

        def loss_of(x, t, m, s):
            lse = (m + np.log(s))[:, 0]
            return np.mean(lse - x[rows, t])

        def fwd(i):
            x, t = xs[i], ts[i]
            m, e, s = stats(x)
            return loss_of(x, t, m, s)

        def fwd_bwd(i):
            x, t = xs[i], ts[i]
            m, g, s = stats(x)
            loss = loss_of(x, t, m, s)
            g *= (inv_n / s).astype(g.dtype)
            g[rows, t] -= g.dtype.type(inv_n)
            return loss, g
        return Prepared({"softmax": softmax, "log_softmax": log_softmax, "ce_fwd": fwd,
                         "ce_fwd_bwd": fwd_bwd}[op])


class Scipy(Impl):
    name, label = "scipy", "scipy"
    note = "scipy.special.softmax / log_softmax, composed with a gather for the loss"

    def available(self, device):
        if _try_import("scipy.special") is None:
            return "scipy is not installed"
        return None

    def unsupported(self, op, dtype):
        if dtype not in _HOST_DTYPES:
            return f"scipy has no {dtype} arithmetic"
        return super().unsupported(op, dtype)

    def setup(self, op, case):
        from scipy import special
        xs, ts = case.xs, case.ts
        rows = np.arange(case.n)
        inv_n = 1.0 / case.n

        def fwd(i):
            lp = special.log_softmax(xs[i], axis=-1)
            return -np.mean(lp[rows, ts[i]])

        def fwd_bwd(i):
            lp = special.log_softmax(xs[i], axis=-1)
            loss = -np.mean(lp[rows, ts[i]])
            g = np.exp(lp, out=lp)
            g[rows, ts[i]] -= 1
            g *= g.dtype.type(inv_n)
            return loss, g
        return Prepared({"softmax": lambda i: special.softmax(xs[i], axis=-1),
                         "log_softmax": lambda i: special.log_softmax(xs[i], axis=-1),
                         "ce_fwd": fwd, "ce_fwd_bwd": fwd_bwd}[op])


# ---- JAX (CPU) -------------------------------------------------------------------------

class Jax(Impl):
    name, label = "jax", "jax"
    note = "jax.jit of jax.nn.softmax / log_softmax; jit(value_and_grad) of the mean loss"

    def available(self, device):
        if _try_import("jax") is None:
            return "jax is not installed"
        return None

    def setup(self, op, case):
        import jax
        import jax.numpy as jnp
        cpu = jax.devices("cpu")[0]
        xs = [jax.device_put(x, cpu) for x in case.xs]
        ts = [jax.device_put(t.astype(np.int32), cpu) for t in case.ts]

        def loss(x, t):
            z = jax.nn.logsumexp(x, axis=-1) - jnp.take_along_axis(x, t[:, None], axis=-1)[:, 0]
            return jnp.mean(z)
        if op == "softmax":
            f = jax.jit(lambda x: jax.nn.softmax(x, axis=-1))
            return Prepared(lambda i: f(xs[i]).block_until_ready())
        if op == "log_softmax":
            f = jax.jit(lambda x: jax.nn.log_softmax(x, axis=-1))
            return Prepared(lambda i: f(xs[i]).block_until_ready())
        f = jax.jit(loss if op == "ce_fwd" else jax.value_and_grad(loss))
        return Prepared(lambda i: jax.block_until_ready(f(xs[i], ts[i])))


# ---- GPU peers -------------------------------------------------------------------------

class Cupy(Impl):
    name, label = "cupy", "cupy"
    note = "cupyx.scipy.special.softmax / log_softmax, composed with a gather for the loss"

    def available(self, device):
        cupy = _try_import("cupy")
        if cupy is None:
            return "cupy is not installed"
        if _try_import("cupyx.scipy.special") is None:
            return "cupyx.scipy.special is not available"
        return None

    def setup(self, op, case):
        import cupy as cp
        from cupyx.scipy import special
        xs = [case.device.to_cupy(x) for x in case.xs]
        ts = [case.device.to_cupy(t) for t in case.ts]
        rows = cp.arange(case.n)
        inv_n = 1.0 / case.n

        def fwd(i):
            lp = special.log_softmax(xs[i], axis=-1)
            return -lp[rows, ts[i]].mean()

        def fwd_bwd(i):
            lp = special.log_softmax(xs[i], axis=-1)
            loss = -lp[rows, ts[i]].mean()
            g = cp.exp(lp, out=lp)
            g[rows, ts[i]] -= 1
            g *= inv_n
            return loss, g
        return Prepared({"softmax": lambda i: special.softmax(xs[i], axis=-1),
                         "log_softmax": lambda i: special.log_softmax(xs[i], axis=-1),
                         "ce_fwd": fwd, "ce_fwd_bwd": fwd_bwd}[op])


class Liger(Impl):
    name, label = "liger", "liger"
    ops = ("ce_fwd", "ce_fwd_bwd")
    note = ("Liger-Kernel's LigerCrossEntropyLoss; it writes the gradient into the logits "
            "during the forward, so its inputs are restored (untimed) before each call")

    def available(self, device):
        if device.kind != "cuda":
            return "liger-kernel runs on CUDA only"
        if _try_import("torch") is None:
            return "torch is not installed"
        try:
            _liger_loss_class()
        except Exception as exc:
            return f"liger-kernel is not installed ({type(exc).__name__}: {exc})"
        return None

    def setup(self, op, case):
        import torch
        dev = case.device
        loss_fn = _liger_loss_class()()
        pristine = [dev.to_torch(x) for x in case.xs]
        ts = [dev.to_torch(t) for t in case.ts]
        work = [x.clone() for x in pristine]
        if op == "ce_fwd_bwd":
            work = [w.requires_grad_() for w in work]

        def pre(i):
            with torch.no_grad():
                work[i].copy_(pristine[i])
            work[i].grad = None
            dev.flush()  # the copy must not leave the logits in L2

        def first(loss):
            return loss[0] if isinstance(loss, tuple) else loss

        def fwd(i):
            with torch.no_grad():
                return first(loss_fn(work[i], ts[i]))

        def fwd_bwd(i):
            loss = first(loss_fn(work[i], ts[i]))
            loss.backward()
            return loss.detach(), work[i].grad
        return Prepared(fwd if op == "ce_fwd" else fwd_bwd, pre)


def _liger_loss_class():
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    return LigerCrossEntropyLoss


def registry(kind):
    """Every implementation for one device kind, gpuce first."""
    if kind == "cpu":
        return [Gpuce(), Gpuce(out=True), TorchEager(), Numpy(), Scipy(), Jax()]
    return [Gpuce(), Gpuce(out=True), TorchEager(), TorchCompile(), Cupy(), Liger()]
