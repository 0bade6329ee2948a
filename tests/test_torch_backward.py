"""gpuce.torch's backward reuses the forward's gradient buffer: no second N x C buffer, no
extra pass when grad_output is 1, one in-place pass otherwise, and still right when the
graph is kept (retain_graph=True, gradcheck) and the saved gradient is needed again."""
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import gpuce  # noqa: E402
import gpuce.torch as gt  # noqa: E402


def _data(n=6, c=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g, dtype=torch.float64) * 3).to(dtype), \
        torch.randint(0, c, (n,), generator=g)


@pytest.fixture
def forward_buffers(monkeypatch):
    """Data pointers of every gradient the fused forward returned."""
    ptrs = []
    real = gpuce.cross_entropy_with_grad

    def recording(*args, **kwargs):
        loss, grad = real(*args, **kwargs)
        ptrs.append(grad.data_ptr())
        return loss, grad

    monkeypatch.setattr(gpuce, "cross_entropy_with_grad", recording)
    return ptrs


def _reference_grad(x, y, scale_fn, **kw):
    b = x.clone().requires_grad_()
    scale_fn(F.cross_entropy(b, y, **kw)).backward()
    return b.grad


@pytest.mark.parametrize("reduction,scale_fn", [
    ("mean", lambda loss: loss),                     # grad_output 1: the saved grad as is
    ("sum", lambda loss: loss * 2.5),                # scalar grad_output: scaled in place
    ("none", lambda loss: (loss * torch.linspace(0.5, 2.0, loss.numel(),
                                                 dtype=loss.dtype)).sum()),
])
def test_leaf_gradient_is_the_forward_buffer(forward_buffers, reduction, scale_fn):
    x, y = _data(seed=1)
    a = x.clone().requires_grad_()
    scale_fn(gt.cross_entropy(a, y, reduction=reduction, label_smoothing=0.1)).backward()
    assert forward_buffers and a.grad.data_ptr() == forward_buffers[-1]
    torch.testing.assert_close(a.grad, _reference_grad(x, y, scale_fn, reduction=reduction,
                                                        label_smoothing=0.1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gradient_scaled_in_place_is_rounded_once(dtype):
    x, y = _data(8, 7, seed=2, dtype=dtype)
    a = x.clone().requires_grad_()
    (gt.cross_entropy(a, y, reduction="sum") * (1 / 3)).backward()
    b = x.double().requires_grad_()
    (F.cross_entropy(b, y, reduction="sum") * (1 / 3)).backward()
    # the product is formed in fp32 and rounded once: within half an ulp of the exact value
    # plus the rounding of the unscaled gradient, not two roundings of a rounded factor
    ulp = 2.0 ** (-10 if dtype == torch.float16 else -7)
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=ulp, atol=ulp * 1e-3)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("inplace", [False, True])
def test_retain_graph_backward_twice_with_real_grad_output(reduction, inplace):
    x, y = _data(seed=3)
    a = x.clone().requires_grad_()
    h = a * 1.0  # inplace needs a non-leaf
    loss = gt.cross_entropy(h, y, reduction=reduction, inplace=inplace)
    go1 = torch.full(loss.shape, 3.0, dtype=loss.dtype)
    go2 = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    loss.backward(go1, retain_graph=True)
    loss.backward(go2)
    b = x.clone().requires_grad_()
    ref = F.cross_entropy(b, y, reduction=reduction)
    ref.backward(go1 + go2)
    torch.testing.assert_close(a.grad, b.grad)


def test_inplace_gradient_lands_in_the_logits_buffer():
    x, y = _data(seed=4)
    a = x.clone().requires_grad_()
    logits = a * 2.0
    seen = []
    logits.register_hook(lambda g: seen.append(g.data_ptr()))
    ptr = logits.data_ptr()
    (gt.cross_entropy(logits, y, inplace=True) * 0.5).backward()
    assert seen == [ptr]
    torch.testing.assert_close(a.grad, _reference_grad(x * 2.0, y, lambda l: l * 0.5) * 2.0)


def test_autograd_grad_twice_on_one_graph():
    # torch.autograd.grad with retain_graph, as gradcheck does for each output row
    x, y = _data(seed=5)
    a = x.clone().requires_grad_()
    loss = gt.cross_entropy(a, y, reduction="none")
    rows = []
    for i in range(loss.numel()):
        go = torch.zeros_like(loss)
        go[i] = 2.0
        (g,) = torch.autograd.grad(loss, a, go, retain_graph=True)
        rows.append(g[i].clone())
        others = torch.cat([g[:i], g[i + 1:]])
        assert torch.count_nonzero(others) == 0
    b = x.clone().requires_grad_()
    (F.cross_entropy(b, y, reduction="none") * 2.0).sum().backward()
    torch.testing.assert_close(torch.stack(rows), b.grad)


@pytest.mark.parametrize("inplace", [False, True])
def test_three_backwards_with_grad_output_one_accumulate_exactly(inplace):
    # the saved gradient handed out as is must not become the .grad that later backwards
    # accumulate into (that would double it behind autograd's back)
    x, y = _data(seed=6)
    a = x.clone().requires_grad_()
    loss = gt.cross_entropy(a * 1.0 if inplace else a, y, inplace=inplace)
    for _ in range(3):
        loss.backward(retain_graph=True)
    torch.testing.assert_close(a.grad, 3 * _reference_grad(x, y, lambda l: l))
