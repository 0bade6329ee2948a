"""cpu_tasks: serial and parallel drivers over one compiled tasks function (a toy kernel
here; tests/test_cache.py checks the real kernels across processes)."""
import numpy as np
import pytest
from numba import njit

from gpuce.kernels import cpu_cache, cpu_tasks


def _row_sums(x, out, scale, fail_row, n_tasks, t0, t1):
    """out[r] = scale * sum(x[r]) over the rows of tasks t0..t1; raises at row fail_row."""
    n = x.shape[0]
    for t in range(t0, t1):
        for r in range(t * n // n_tasks, (t + 1) * n // n_tasks):
            if r == fail_row:
                raise ValueError("row failed")
            s = np.float32(0)
            for c in range(x.shape[1]):
                s += x[r, c]
            out[r] = s * scale


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from numba.core import config
    old = config.CACHE_DIR
    config.CACHE_DIR = str(tmp_path_factory.mktemp("numba-cache"))
    try:
        tasks = cpu_cache.attach(njit(_row_sums), "toy tasks")
        yield tasks, cpu_tasks.drivers(tasks, "toy tasks")
    finally:
        config.CACHE_DIR = old


def test_serial_and_parallel_drivers_agree_and_propagate_errors(toy):
    tasks, (serial, parallel) = toy
    x = np.random.default_rng(3).standard_normal((97, 301)).astype(np.float32)
    outs = []
    for driver, n_tasks in ((serial, 1), (serial, 5), (parallel, 5), (parallel, 8)):
        out = np.full(97, np.nan, np.float32)
        driver(x, out, np.float32(2), -1, n_tasks)
        outs.append(out)
    np.testing.assert_allclose(outs[0], 2 * x.astype(np.float64).sum(1), rtol=1e-5, atol=1e-4)
    for out in outs[1:]:
        assert np.array_equal(out, outs[0])  # one compiled copy: same bits
    for driver in (serial, parallel):
        with pytest.raises(ValueError, match="row failed"):
            driver(x, np.zeros(97, np.float32), np.float32(2), 50, 4)


def test_a_cached_driver_is_loaded_only_when_its_task_symbol_is_bound(toy, monkeypatch):
    tasks, (serial, _) = toy
    x = np.ones((4, 3), np.float32)
    serial(x, np.zeros(4, np.float32), np.float32(1), -1, 1)  # compiled and saved
    (sig,) = serial.signatures
    cache = serial._cache
    data = cache._cache_file.load(cache._index_key(sig, serial.targetctx.codegen()))
    symbols = cpu_tasks._called_symbols(data)
    assert symbols == [cpu_tasks.bind(tasks, "toy tasks", tuple(sig) + cpu_tasks._TASK_INDEX)]
    assert cache._load_overload(sig, serial.targetctx) is not None
    monkeypatch.setattr(cpu_tasks.ll, "address_of_symbol", lambda name: None)
    assert cache._load_overload(sig, serial.targetctx) is None  # recompiles, never aborts
