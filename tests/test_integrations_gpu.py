"""CuPy and torch on a real GPU: arrays in and out, streams, CUDA graphs, torch.compile.

Marked ``gpu``; skipped where there is no NVIDIA GPU (with CuPy / a CUDA torch as each test
needs). What they establish:

- CuPy arrays in give CuPy arrays out, launched on ``cupy.cuda.get_current_stream()``;
  CUDA torch tensors run on ``torch.cuda.current_stream()``.
- Ordering on a non-default stream without a host sync: the stream is first held busy by a
  spin kernel, then the input is overwritten *on that stream*, then gpuce is called. A launch
  on any other stream would run at once and read the old input (the non-blocking streams
  used here do not synchronise with the legacy default stream); a host sync inside gpuce
  would leave the stream idle when the call returns. Both are checked.
- A CUDA-graph capture of a gpuce call on torch succeeds (a host sync, a pageable copy or a
  cudaMalloc during capture would make it fail) and replays correctly after new data are
  copied into the static inputs.
"""
import numpy as np
import pytest

import gpuce
from reference import ref_cross_entropy

pytestmark = pytest.mark.gpu

SPIN_CYCLES = 1_000_000_000  # about half a second of GPU clock: far longer than a call's host work


def _cupy():
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except cp.cuda.runtime.CUDARuntimeError:
        pytest.skip("no CUDA device")
    return cp


def _torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    return torch


def _data(n, c, seed, dtype=np.float32, ignore_every=5):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, c)) * 3).astype(dtype)
    y = rng.integers(0, c, n).astype(np.int64)
    y[::ignore_every] = -100
    return x, y


def _assert_matches_reference(loss, grad, x, y, loss_rtol=1e-5, grad_rtol=2e-5, **kw):
    ref_loss, ref_grad = ref_cross_entropy(x, y, **kw)
    np.testing.assert_allclose(np.asarray(loss, dtype=np.float64), ref_loss, rtol=loss_rtol,
                               atol=loss_rtol)
    g = np.asarray(grad, dtype=np.float64)
    np.testing.assert_allclose(g, ref_grad, rtol=grad_rtol,
                               atol=grad_rtol * np.abs(ref_grad).max())


# ---- CuPy ---------------------------------------------------------------------------------

_SPIN_SRC = r"""
extern "C" __global__ void gpuce_test_spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}
"""


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cupy_in_cupy_out_on_a_non_default_stream(dtype, reduction):
    cp = _cupy()
    x, y = _data(96, 1000, seed=1, dtype=dtype)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        xd, yd = cp.asarray(x), cp.asarray(y)
        loss, grad = gpuce.cross_entropy_with_grad(xd, yd, reduction=reduction,
                                                   label_smoothing=0.1)
        assert isinstance(loss, cp.ndarray) and isinstance(grad, cp.ndarray)
        assert loss.shape == (() if reduction == "mean" else (96,))
        assert loss.dtype == (np.float64 if dtype == np.float64 else np.float32)
        assert grad.dtype == dtype and grad.shape == x.shape
        loss_h, grad_h = cp.asnumpy(loss, stream=stream), cp.asnumpy(grad, stream=stream)
    stream.synchronize()
    tight = dtype != np.float16
    _assert_matches_reference(loss_h, grad_h, x, y, grad_rtol=2e-5 if tight else 2e-3,
                              reduction=reduction, label_smoothing=0.1)


def test_cupy_stream_ordering_without_host_sync():
    cp = _cupy()
    spin = cp.RawKernel(_SPIN_SRC, "gpuce_test_spin")
    old, y = _data(256, 4096, seed=2)
    new, _ = _data(256, 4096, seed=3)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        xd, yd, new_d = cp.asarray(old), cp.asarray(y), cp.asarray(new)
        gpuce.cross_entropy_with_grad(xd, yd)          # compile and warm up, same shapes
        stream.synchronize()
        spin((1,), (1,), (cp.int64(SPIN_CYCLES),))      # hold the stream busy ...
        xd[...] = new_d                                 # ... then overwrite the input on it
        loss, grad = gpuce.cross_entropy_with_grad(xd, yd)
        assert not stream.done, "gpuce waited for the stream: a host sync"
        loss_h, grad_h = cp.asnumpy(loss, stream=stream), cp.asnumpy(grad, stream=stream)
    stream.synchronize()
    _assert_matches_reference(loss_h, grad_h, new, y)  # the new data: ordered on the stream


# ---- torch --------------------------------------------------------------------------------

def test_torch_stream_ordering_without_host_sync():
    torch = _torch()
    import gpuce.torch as gt
    old, y = _data(256, 4096, seed=4)
    new, _ = _data(256, 4096, seed=5)
    dev = torch.device("cuda")
    side = torch.cuda.Stream()
    xd = torch.from_numpy(old).to(dev)
    yd = torch.from_numpy(y).to(dev)
    new_d = torch.from_numpy(new).to(dev)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        a = xd.clone().requires_grad_()
        gt.cross_entropy(a, yd).backward()              # compile and warm up
        side.synchronize()
        torch.cuda._sleep(SPIN_CYCLES)                  # hold the side stream busy ...
        a = new_d.clone().requires_grad_()              # ... then produce the input on it
        loss = gt.cross_entropy(a, yd)
        loss.backward()
        loss2, grad2 = gpuce.cross_entropy_with_grad(a.detach(), yd)
        assert not side.query(), "gpuce waited for the stream: a host sync"
        loss_h, grad_h = loss.detach().cpu(), a.grad.cpu()  # (.cpu() waits, on this stream)
        loss2_h, grad2_h = loss2.cpu(), grad2.cpu()
    _assert_matches_reference(loss_h.numpy(), grad_h.numpy(), new, y)
    _assert_matches_reference(loss2_h.numpy(), grad2_h.numpy(), new, y)


def test_torch_sync_debug_mode_sees_no_sync():
    # torch's own detector: any synchronising torch call inside gpuce.torch raises
    torch = _torch()
    import gpuce.torch as gt
    x, y = _data(64, 512, seed=6)
    a = torch.from_numpy(x).cuda().requires_grad_()
    yd = torch.from_numpy(y).cuda()
    gt.cross_entropy(a, yd).backward()  # warm up outside the check
    a.grad = None
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = gt.cross_entropy(a, yd, label_smoothing=0.1, z_loss=1e-4)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    _assert_matches_reference(loss.detach().cpu().numpy(), a.grad.cpu().numpy(), x, y,
                              label_smoothing=0.1, z_loss=1e-4)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_graph_capture_of_cross_entropy_with_grad(reduction):
    torch = _torch()
    dev = torch.device("cuda")
    x, y = _data(128, 2048, seed=7)
    static_x = torch.from_numpy(x).to(dev)
    static_y = torch.from_numpy(y).to(dev)
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-4)

    side = torch.cuda.Stream()                        # warm up on a side stream, as torch asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            gpuce.cross_entropy_with_grad(static_x, static_y, **kw)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):                     # captures on torch's capture stream
        static_loss, static_grad = gpuce.cross_entropy_with_grad(static_x, static_y, **kw)

    for seed in (8, 9, 10):
        nx, ny = _data(128, 2048, seed=seed, ignore_every=3 + seed % 4)
        static_x.copy_(torch.from_numpy(nx))
        static_y.copy_(torch.from_numpy(ny))
        graph.replay()
        torch.cuda.synchronize()
        _assert_matches_reference(static_loss.cpu().numpy(), static_grad.cpu().numpy(), nx, ny,
                                  **kw)


def test_cuda_graph_capture_of_a_torch_training_step():
    torch = _torch()
    import gpuce.torch as gt
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 1000).to(dev)
    ref = torch.nn.Linear(64, 1000).to(dev)
    ref.load_state_dict(model.state_dict())
    static_h = torch.randn(32, 64, device=dev)
    static_y = torch.randint(0, 1000, (32,), device=dev)
    crit = gt.CrossEntropyLoss(label_smoothing=0.1)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            crit(model(static_h), static_y).backward()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = crit(model(static_h), static_y)
        static_loss.backward()

    for _ in range(3):
        h = torch.randn(32, 64, device=dev)
        y = torch.randint(0, 1000, (32,), device=dev)
        static_h.copy_(h)
        static_y.copy_(y)
        graph.replay()
        ref.zero_grad(set_to_none=True)
        ref_loss = torch.nn.functional.cross_entropy(ref(h), y, label_smoothing=0.1)
        ref_loss.backward()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_loss, ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(model.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_torch_cuda_parity_with_f_cross_entropy(dtype):
    torch = _torch()
    import torch.nn.functional as F

    import gpuce.torch as gt
    dt = getattr(torch, dtype)
    x, y = _data(64, 3000, seed=11)
    xd = torch.from_numpy(x).cuda().to(dt)
    yd = torch.from_numpy(y).cuda()
    w = torch.rand(3000, device="cuda", dtype=torch.float64).to(dt) + 0.5
    a = xd.clone().requires_grad_()
    b = xd.double().requires_grad_()
    la = gt.cross_entropy(a, yd, weight=w, label_smoothing=0.1)
    lb = F.cross_entropy(b, yd, weight=w.double(), label_smoothing=0.1)
    la.backward()
    lb.backward()
    assert la.dtype == (torch.float64 if dt == torch.float64 else torch.float32)
    assert a.grad.dtype == dt and a.grad.is_cuda
    torch.testing.assert_close(la.double(), lb, rtol=2e-5, atol=2e-5)
    rtol = {"float16": 2 ** -10, "bfloat16": 2 ** -7, "float32": 2e-5, "float64": 1e-12}[dtype]
    scale = b.grad.abs().max().item()
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=rtol, atol=rtol * scale)


def test_torch_compile_fullgraph_on_cuda():
    torch = _torch()
    import torch.nn.functional as F

    import gpuce.torch as gt
    torch.manual_seed(1)
    x = torch.randn(64, 1000, device="cuda")
    y = torch.randint(0, 1000, (64,), device="cuda")

    def fn(x, y):
        return gt.cross_entropy(x * 0.5, y, label_smoothing=0.1)

    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    la = torch.compile(fn, fullgraph=True)(a, y)
    la.backward()
    lb = F.cross_entropy(b * 0.5, y, label_smoothing=0.1)
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)
