"""CUDA array kinds for tests/kinds.py: the simulator's device arrays, or on a machine with a
GPU, CuPy arrays, CUDA torch tensors and numba device arrays (each only when importable)."""
import numpy as np

from kinds import BF16, Kind, torch_to_numpy


def _c_order(a):
    return np.array(a, order="C", copy=None)  # (np.ascontiguousarray would make 0-d into 1-d)


def _numba_to(a):
    from numba import cuda
    a = _c_order(a)
    if a.dtype == BF16:  # numba cannot type bfloat16: carry the raw words, then relabel
        return cuda.to_device(a.view(np.int16)).view(BF16)
    return cuda.to_device(a)


def _numba_back(r):
    if hasattr(r, "copy_to_host"):
        return r.copy_to_host()
    return np.asarray(r)


def simulator_kinds():
    """Numba simulator device arrays (NUMBA_ENABLE_CUDASIM=1)."""
    return [Kind("simulator", _numba_to, _numba_back, device=True)]


def gpu_available():
    try:
        from numba import cuda
        return cuda.is_available() and len(cuda.gpus) > 0
    except Exception:
        return False


def gpu_kinds():
    if not gpu_available():
        return []
    kinds = [Kind("numba-cuda", _numba_to, _numba_back, device=True)]
    try:
        import cupy as cp
        kinds.append(Kind("cupy", _cupy_to, _cupy_back, device=True))
        del cp
    except ImportError:
        pass
    try:
        import torch
        if torch.cuda.is_available():
            kinds.append(Kind("torch-cuda", _torch_cuda_to, torch_to_numpy, device=True))
    except ImportError:
        pass
    return kinds


def _cupy_to(a):
    import cupy as cp
    a = _c_order(a)
    if a.dtype == BF16:
        try:
            return cp.asarray(a.view(np.int16)).view(BF16)
        except Exception:  # a CuPy without bfloat16: this kind cannot carry it
            import pytest
            pytest.skip("this CuPy has no bfloat16 dtype")
    return cp.asarray(a)


def _cupy_back(r):
    import cupy as cp
    return cp.asnumpy(r)


def _torch_cuda_to(a):
    import torch
    a = _c_order(a)
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).to("cuda")
    return torch.from_numpy(a).to("cuda")
