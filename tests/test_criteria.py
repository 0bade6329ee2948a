"""The gradient criterion of tests/helpers.py at the bottom of the float range: a row whose
scale is subnormal is held to GRAD_RTOL of the smallest normal, no looser, and every other
row keeps its own relative bound (so the floor hides no error in a normal row)."""
import numpy as np
import pytest

from helpers import GRAD_RTOL, SMALLEST_NORMAL, assert_grad_close


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_subnormal_row_floor(dtype):
    dt = np.dtype(dtype)
    step = float(np.finfo(dt).smallest_subnormal)
    floor = GRAD_RTOL[dtype] * SMALLEST_NORMAL[dtype]
    ref = np.array([[42 * step, -7 * step, 0.0]])  # a whole row of subnormal gradients
    near = (ref + np.array([[2, -1, 0]]) * step).astype(dt)  # a few rounding steps off
    assert_grad_close(near, ref, dtype)
    off = ref.copy()
    off[0, 0] += 2 * floor  # beyond the floor: must fail
    with pytest.raises(AssertionError):
        assert_grad_close(off.astype(dt), ref, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_floor_leaves_normal_and_zero_rows_alone(dtype):
    dt = np.dtype(dtype)
    ref = np.array([[0.5, -0.25, 1e-30], [0.0, 0.0, 0.0]])
    bad = ref.copy()
    bad[0, 1] += 2 * GRAD_RTOL[dtype] * 0.5  # twice the row's relative bound
    with pytest.raises(AssertionError):
        assert_grad_close(bad.astype(dt), ref, dtype)
    bad = ref.copy()
    bad[1, 2] = float(np.finfo(dt).smallest_subnormal)  # an all-zero row must stay exact
    with pytest.raises(AssertionError):
        assert_grad_close(bad.astype(dt), ref, dtype)
    assert_grad_close(ref.astype(dt), ref, dtype)
