"""gpuce: fused softmax and cross-entropy kernels for NVIDIA GPUs (Numba CUDA) and CPUs (Numba).

The backend is chosen from the array type: numpy arrays and CPU torch tensors run on the CPU;
CuPy arrays, CUDA torch tensors and numba device arrays run on the GPU.
"""
from . import _cpu  # noqa: F401  (registers the CPU backend)
# The CUDA backend (gpuce._cuda) registers itself when the first CUDA array arrives: see
# _dispatch.backend_for. Importing gpuce._cuda directly registers it too.
from ._api import cross_entropy, cross_entropy_with_grad, log_softmax, logsumexp, softmax
from ._warmup import warmup

__version__ = "0.1.0"
__all__ = ["softmax", "log_softmax", "logsumexp", "cross_entropy", "cross_entropy_with_grad",
           "warmup"]

# Chunked linear + cross-entropy (numpy/CuPy): gpuce/linear.py.
from .linear import linear_cross_entropy, linear_cross_entropy_with_grad  # noqa: E402
__all__ += ["linear_cross_entropy", "linear_cross_entropy_with_grad"]
