"""Map an array to the backend that runs it. Backends register themselves in order."""

_BACKENDS = []


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


def backend_for(x, name="logits"):
    for backend in _BACKENDS:
        if backend.owns(x):
            return backend
    if _looks_like_device_array(x):
        raise TypeError(
            f"{name}: {type(x).__module__}.{type(x).__qualname__} is a CUDA array, but the CUDA "
            "backend is not available (install gpuce[cuda13] or gpuce[cuda12] and use a machine "
            "with an NVIDIA GPU)")
    raise TypeError(
        f"{name}: unsupported array type {type(x).__module__}.{type(x).__qualname__}; expected a "
        "numpy array, a torch tensor, a CuPy array or a numba device array")
