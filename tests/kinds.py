"""Array kinds every backend test is parametrised over: numpy in, result out, both as numpy.

Under NUMBA_ENABLE_CUDASIM=1 the kinds are the simulator's device arrays; on a machine with a
GPU they include CuPy, CUDA torch tensors and numba device arrays (tests/cuda_kinds.py).
"""
import os

import ml_dtypes
import numpy as np

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"float16": np.dtype(np.float16), "bfloat16": BF16,
          "float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}


class Kind:
    """How to hand a numpy array to one array library and read a result back."""

    def __init__(self, name, to, back, device=False):
        self.name, self._to, self._back, self.device = name, to, back, device

    def to(self, a):
        return self._to(np.asarray(a))

    def back(self, r):
        """A result as a numpy array with its own dtype (bf16 via ml_dtypes)."""
        return self._back(r)

    def __repr__(self):
        return self.name


def _torch_from_numpy(a):
    import torch
    if a.dtype == BF16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def torch_to_numpy(t):
    import torch
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def cpu_kinds():
    kinds = [Kind("numpy", lambda a: a, np.asarray)]
    try:
        import torch  # noqa: F401
        kinds.append(Kind("torch", _torch_from_numpy, torch_to_numpy))
    except ImportError:
        pass
    return kinds


def available_kinds():
    if SIMULATOR:
        from cuda_kinds import simulator_kinds
        return simulator_kinds()
    kinds = cpu_kinds()
    try:
        from cuda_kinds import gpu_kinds
    except ImportError:
        return kinds
    return kinds + gpu_kinds()
