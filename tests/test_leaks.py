"""Memory stays flat: 10,000 CPU calls leave the process's resident set where it was after
a warm-up (numpy and torch inputs, every entry point, autograd through gpuce.torch)."""
import gc

import numpy as np
import pytest

import gpuce

CALLS = 10_000
SLACK = 8 << 20  # bytes: a leak of even 1 KiB per call would show as 10 MB


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _calls(x, t, q, w, out):
    gpuce.cross_entropy(x, t, weight=w, label_smoothing=0.1)
    gpuce.cross_entropy_with_grad(x, t, reduction="none", softcap=10.0)
    gpuce.cross_entropy_with_grad(x, q, out=out)
    gpuce.softmax(x)
    gpuce.logsumexp(x)


def _steady(step, warmup, calls):
    for _ in range(warmup):
        step()
    gc.collect()
    before = _rss()
    for _ in range(calls):
        step()
    gc.collect()
    return _rss() - before


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="Linux /proc")
def test_cpu_rss_flat_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 200)).astype(np.float32)
    t = rng.integers(0, 200, 32)
    q = rng.dirichlet(np.ones(200), size=32).astype(np.float32)
    w = rng.uniform(0.5, 2, 200).astype(np.float32)
    out = np.empty_like(x)
    growth = _steady(lambda: _calls(x, t, q, w, out), 500, CALLS // 5)  # 5 calls per step
    assert growth < SLACK, f"RSS grew {growth / 2**20:.1f} MiB over {CALLS} calls"


def test_cpu_rss_flat_torch_autograd():
    torch = pytest.importorskip("torch")
    import gpuce.torch as gt
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(32, 200, generator=g)
    t = torch.randint(0, 200, (32,), generator=g)

    def step():
        x = x0.clone().requires_grad_()
        gt.cross_entropy(x, t, label_smoothing=0.1).backward()

    growth = _steady(step, 500, CALLS)
    assert growth < SLACK, f"RSS grew {growth / 2**20:.1f} MiB over {CALLS} calls"
