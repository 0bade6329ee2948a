"""The GPU memory pools stay flat over 10,000 calls (marker ``gpu``; skipped without an
NVIDIA GPU): CuPy's default pool and torch's caching allocator, as tests/test_leaks.py
checks the CPU's resident set.

    python -m pytest -q -m gpu tests/test_gpu_leaks.py
"""
import numpy as np
import pytest

from cuda_kinds import gpu_available
from kinds import SIMULATOR

HAVE_GPU = not SIMULATOR and gpu_available()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not HAVE_GPU, reason="needs an NVIDIA GPU (and no simulator)")]

CALLS = 10_000

if HAVE_GPU:
    import gpuce


def _calls(x, t, q, out):
    gpuce.cross_entropy(x, t, label_smoothing=0.1)
    gpuce.cross_entropy_with_grad(x, t, reduction="none", softcap=10.0)
    gpuce.cross_entropy_with_grad(x, q, out=out)
    gpuce.softmax(x)


def test_cupy_pool_flat():
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal((64, 1000)).astype(np.float32))
    t = cp.asarray(rng.integers(0, 1000, 64))
    q = cp.asarray(rng.dirichlet(np.ones(1000), size=64).astype(np.float32))
    out = cp.empty_like(x)
    pool = cp.get_default_memory_pool()
    for _ in range(100):
        _calls(x, t, q, out)
    cp.cuda.Device().synchronize()
    used, total = pool.used_bytes(), pool.total_bytes()
    for _ in range(CALLS // 4):
        _calls(x, t, q, out)
    cp.cuda.Device().synchronize()
    assert pool.used_bytes() <= used + (1 << 20)
    assert pool.total_bytes() <= total + (4 << 20)


def test_torch_allocator_flat():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    import gpuce.torch as gt
    g = torch.Generator(device="cuda").manual_seed(0)
    x0 = torch.randn(64, 1000, device="cuda", generator=g)
    t = torch.randint(0, 1000, (64,), device="cuda", generator=g)

    def step():
        x = x0.clone().requires_grad_()
        gt.cross_entropy(x, t, label_smoothing=0.1).backward()
        gpuce.cross_entropy_with_grad(x0, t, reduction="none")

    for _ in range(100):
        step()
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    for _ in range(CALLS):
        step()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= allocated + (1 << 20)
    assert torch.cuda.memory_reserved() <= reserved + (4 << 20)
