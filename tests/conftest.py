"""Fixtures shared by the backend tests: ``kind`` (every array kind available here),
``rng`` (a generator seeded from the test's node id), ``poison_allocations``.

tests/ is on sys.path (pytest's rootdir-relative import of conftest), so test modules do
``from helpers import ...``, ``from kinds import ...`` and ``from reference import ...``.
"""
import types

import numpy as np
import pytest

from helpers import rng_for
from kinds import available_kinds

KINDS = available_kinds()


@pytest.fixture(params=KINDS, ids=repr)
def kind(request):
    """An array kind (numpy, torch CPU; simulator or GPU arrays where available)."""
    return request.param


@pytest.fixture
def rng(request):
    """Fresh random data for each test, reproducible from the test's id."""
    return rng_for(request.node.nodeid)


class _PoisoningNumpy(types.ModuleType):
    """numpy, except that ``empty``/``empty_like`` return buffers full of NaN (or all-ones
    bits for integer storage, which is NaN as float16 and bfloat16 words)."""

    def __init__(self):
        super().__init__("numpy")

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def _fill(a):
        if a.dtype.kind == "f":
            a.fill(np.nan)
        elif a.dtype.kind in "iu":
            a.fill(np.iinfo(a.dtype).max if a.dtype.kind == "u" else -1)
        elif a.dtype.kind == "V" or a.dtype.itemsize == 2:  # ml_dtypes bf16
            a.view(np.uint16).fill(0xFFFF)
        return a

    def empty(self, *args, **kwargs):
        return self._fill(np.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._fill(np.empty_like(*args, **kwargs))


@pytest.fixture
def poison_allocations(monkeypatch):
    """Make the CPU backend's fresh output buffers start as NaN, so that any element a
    kernel forgets to write fails the comparison with the reference."""
    try:
        from gpuce import _cpu
    except ImportError:  # pragma: no cover
        yield
        return
    monkeypatch.setattr(_cpu, "np", _PoisoningNumpy())
    yield
