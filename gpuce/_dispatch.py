"""Map an array to the backend that runs it. Backends register themselves in order.

The CUDA backend (gpuce._cuda, which imports numba.cuda: about a second) is imported only
when the first CUDA array arrives, so ``import gpuce`` stays cheap on machines without a GPU.
"""
import importlib.util
import sys

_BACKENDS = []
_CUDA = {"tried": False}


def register(backend):
    """Add a backend; earlier registrations are asked first."""
    _BACKENDS.append(backend)
    return backend


def _looks_like_device_array(x):
    if hasattr(x, "__cuda_array_interface__"):
        return True
    dl = getattr(x, "__dlpack_device__", None)
    if dl is not None:
        try:
            return int(dl()[0]) in (2, 3, 13)  # kDLCUDA, kDLCUDAHost, kDLCUDAManaged
        except Exception:
            return False
    return False


def _looks_like_cuda(x):
    """CuPy arrays, CUDA torch tensors, numba device arrays (simulated ones too) and any
    object with __cuda_array_interface__ or a CUDA __dlpack__: cheap checks, no imports."""
    module = type(x).__module__ or ""
    if module.startswith(("cupy", "numba.cuda", "numba_cuda")):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.is_cuda
    return _looks_like_device_array(x)


def load_cuda_backend():
    """Import gpuce._cuda (it registers itself) when numba-cuda is installed; once."""
    if not _CUDA["tried"]:
        _CUDA["tried"] = True
        if importlib.util.find_spec("numba_cuda") is not None:
            from . import _cuda  # noqa: F401  (import errors inside it are real bugs: surface)
    return "gpuce._cuda" in sys.modules


def backend_for(x, name="logits"):
    for backend in _BACKENDS:
        if backend.owns(x):
            return backend
    if _looks_like_cuda(x):
        if not _CUDA["tried"] and load_cuda_backend():
            return backend_for(x, name)
        raise TypeError(
            f"{name}: {type(x).__module__}.{type(x).__qualname__} is a CUDA array, but the CUDA "
            "backend is not available (install gpuce[cuda13] or gpuce[cuda12] and use a machine "
            "with an NVIDIA GPU)")
    raise TypeError(
        f"{name}: unsupported array type {type(x).__module__}.{type(x).__qualname__}; expected a "
        "numpy array, a torch tensor, a CuPy array or a numba device array")
