"""PyTorch's own cross-entropy test inputs against gpuce.torch: every sample of the OpInfo
``nn.functional.cross_entropy`` (``sample_inputs_cross_entropy``) and of the
``torch.nn.CrossEntropyLoss`` ModuleInfo, with the ModuleInfo's error inputs, from the
installed ``torch.testing._internal``.

Oracle: ``torch.nn.functional.cross_entropy`` on the float64 upcast of the same inputs (loss
and gradient), compared at PyTorch's own tolerances for the sample's dtype
(``torch.testing.assert_close`` defaults, with the ModuleInfo's float16 override).

Each sample is adjusted only for a documented difference of gpuce.torch (its module
docstring), and every adjustment is counted by reason; the counts are printed and checked.
"""
import random
from collections import Counter

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest")  # torch.testing._internal needs it
import torch.nn.functional as F  # noqa: E402
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402

import gpuce.torch as gt  # noqa: E402
from helpers import seed_for  # noqa: E402

OP = next(o for o in op_db if o.name == "nn.functional.cross_entropy")
MODULE = next(m for m in module_db if m.module_cls is torch.nn.CrossEntropyLoss)
OP_DTYPES = sorted(OP.supported_dtypes("cpu"), key=str)
MODULE_DTYPES = sorted(MODULE.dtypes, key=str)
# the ModuleInfo's own toleranceOverride for test_forward on the CPU
MODULE_TOL = {torch.float16: dict(atol=3e-2, rtol=1e-3)}

# every reason an adjustment may be made, each a documented difference of gpuce.torch
REASONS = {
    "class_axis_last": "inputs (N, C, d...) moved to (N, d..., C) with movedim(1, -1)",
    "loss_float32_for_half": "the loss of half input is float32; compared after .to(dtype)",
    "all_ignored_mean_is_0": "a mean over rows all ignored is 0 with a zero gradient (PyTorch NaN)",
    "target_detached": "probability targets get no gradient; passed detached",
    "valueerror_not_runtimeerror": "bad input raises ValueError/TypeError (PyTorch RuntimeError)",
    "checked_at_construction": "a bad constructor option raises in __init__, not in forward",
}


def _seed(*key):
    torch.manual_seed(seed_for(*key) % 2**31)
    random.seed(seed_for(*key))


def _to_gpuce_layout(x, adjust):
    if x.ndim >= 3:
        adjust["class_axis_last"] += 1
        return x.movedim(1, -1)
    return x


def _check_one(inp, target, kwargs, dtype, tol, adjust):
    """Loss and gradient of gpuce.torch against F.cross_entropy in float64."""
    soft = target.is_floating_point()
    if soft and target.requires_grad:
        adjust["target_detached"] += 1
        target = target.detach()
    ref_in = inp.detach().double().requires_grad_()
    ref_target = target.double() if soft else target
    ref_kw = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    ref = F.cross_entropy(ref_in, ref_target, **ref_kw)

    x = inp.detach().clone().requires_grad_()
    g_target = _to_gpuce_layout(target, Counter()) if soft else target
    got = gt.cross_entropy(_to_gpuce_layout(x, adjust), g_target, **kwargs)
    if dtype in (torch.float16, torch.bfloat16):
        assert got.dtype == torch.float32
        adjust["loss_float32_for_half"] += 1
    expected = ref.to(dtype)
    all_ignored = (kwargs.get("reduction", "mean") == "mean" and not soft
                   and bool((target == kwargs.get("ignore_index", -100)).all()))
    if all_ignored:
        adjust["all_ignored_mean_is_0"] += 1
        assert torch.isnan(ref)
        expected = torch.zeros((), dtype=dtype)
    torch.testing.assert_close(got.to(dtype), expected, **tol)

    go = torch.randn(ref.shape, dtype=torch.float64)
    ref.backward(go)
    got.backward(go.to(got.dtype))
    want_grad = torch.zeros_like(x) if all_ignored else ref_in.grad.to(dtype)
    torch.testing.assert_close(x.grad, want_grad, **tol)


def _report(name, n_samples, adjust):
    print(f"\n{name}: {n_samples} samples; adjustments by reason: {dict(sorted(adjust.items()))}")
    assert set(adjust) <= set(REASONS), set(adjust) - set(REASONS)


@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
def test_opinfo_samples(dtype):
    _seed("opinfo", str(dtype))
    adjust = Counter()
    samples = list(OP.sample_inputs("cpu", dtype, requires_grad=True))
    assert len(samples) >= 20
    for s in samples:
        _check_one(s.input, s.args[0], dict(s.kwargs), dtype, {}, adjust)
    _report(f"OpInfo nn.functional.cross_entropy {dtype}", len(samples), adjust)
    n_soft = sum(s.args[0].is_floating_point() for s in samples)
    assert adjust["target_detached"] == n_soft  # the sampler makes them require grad
    assert adjust["class_axis_last"] == sum(s.input.ndim >= 3 for s in samples)
    assert OP.error_inputs_func is None  # none to run; the ModuleInfo has the error inputs


@pytest.mark.parametrize("dtype", MODULE_DTYPES, ids=str)
def test_moduleinfo_samples(dtype):
    _seed("moduleinfo", str(dtype))
    adjust = Counter()
    inputs = MODULE.module_inputs_func(MODULE, device="cpu", dtype=dtype, requires_grad=True,
                                       training=True)
    assert len(inputs) >= 50
    tol = MODULE_TOL.get(dtype, {})
    for mi in inputs:
        ctor = mi.constructor_input
        assert not ctor.args
        inp, target = mi.forward_input.args
        _check_one(inp, target, dict(ctor.kwargs), dtype, tol, adjust)
        # the module form, on the same inputs: the same loss as the functional form
        module = gt.CrossEntropyLoss(**ctor.kwargs)
        moved_target = target.detach().movedim(1, -1) if (
            target.is_floating_point() and target.ndim >= 3) else target.detach()
        with torch.no_grad():
            a = module(_to_gpuce_layout(inp.detach(), Counter()), moved_target)
            b = gt.cross_entropy(_to_gpuce_layout(inp.detach(), Counter()), moved_target,
                                 **ctor.kwargs)
        assert torch.equal(a, b)
    _report(f"ModuleInfo CrossEntropyLoss {dtype}", len(inputs), adjust)


def _module_error_inputs(dtype):
    return MODULE.module_error_inputs_func(MODULE, device="cpu", dtype=dtype,
                                           requires_grad=False, training=True)


@pytest.mark.parametrize("dtype", MODULE_DTYPES, ids=str)
def test_moduleinfo_error_inputs(dtype):
    """Every input PyTorch rejects, gpuce rejects too (ValueError/TypeError where PyTorch
    raises RuntimeError; bad constructor options already in __init__)."""
    _seed("errors", str(dtype))
    adjust = Counter()
    errors = _module_error_inputs(dtype)
    assert len(errors) >= 7
    for err in errors:
        mi = err.module_error_input
        inp, target = mi.forward_input.args
        # PyTorch rejects it (so the sample still means what it says)
        with pytest.raises(err.error_type):
            torch.nn.CrossEntropyLoss(**mi.constructor_input.kwargs)(inp, target)
        if err.error_type is RuntimeError:
            adjust["valueerror_not_runtimeerror"] += 1
        with pytest.raises((ValueError, TypeError)) as info:
            module = gt.CrossEntropyLoss(**mi.constructor_input.kwargs)
            moved = (target.movedim(1, -1) if target.is_floating_point() and target.ndim >= 3
                     else target)
            module(_to_gpuce_layout(inp, adjust), moved)
        if any(e.name == "_check_options" for e in info.traceback):
            adjust["checked_at_construction"] += 1
    _report(f"ModuleInfo CrossEntropyLoss error inputs {dtype}", len(errors), adjust)
    assert adjust["checked_at_construction"] == 1  # label_smoothing=1.5
