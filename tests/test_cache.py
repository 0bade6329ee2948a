"""Start-up: the CPU kernels' on-disk cache (hit by a second process, keyed on variant,
sources and numba version, safe when processes fill it at once), the lazy CUDA import,
and ``gpuce.warmup``."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gpuce.kernels import cpu_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the given small calls and reports each kernel's cache hits/misses and the results.
_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import gpuce
    from gpuce.kernels import cpu
    rng = np.random.default_rng(5)
    x = rng.standard_normal((7, 33))
    out = {"softmax": gpuce.softmax(x).tolist(), "log_softmax": gpuce.log_softmax(x).tolist()}
    ks = cpu.make_kernels("float64", False, None, False)  # the serial build small calls use
    for name in ("softmax", "log_softmax"):
        st = ks[name].stats
        out[name + "_hits"] = sum(st.cache_hits.values())
        out[name + "_misses"] = sum(st.cache_misses.values())
    print(json.dumps(out))
""")


def _child_env(cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), PYTHONPATH=ROOT)
    env.pop("NUMBA_DISABLE_JIT", None)
    env.pop("GPUCE_DISK_CACHE", None)
    return env


def test_processes_filling_the_cache_at_once_then_a_third_hits_it(tmp_path):
    env = _child_env(tmp_path)
    fillers = [subprocess.Popen([sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE,
                                text=True) for _ in range(2)]
    filled = [json.loads(p.communicate()[0]) for p in fillers]
    assert all(p.returncode == 0 for p in fillers)
    assert any(r["softmax_misses"] for r in filled)  # someone compiled
    third = json.loads(subprocess.run([sys.executable, "-c", _CHILD], env=env, check=True,
                                      capture_output=True, text=True).stdout)
    for name in ("softmax", "log_softmax"):
        assert third[name + "_hits"] >= 1 and third[name + "_misses"] == 0, third
    x = np.random.default_rng(5).standard_normal((7, 33))
    e = np.exp(x - x.max(-1, keepdims=True))
    want = e / e.sum(-1, keepdims=True)
    np.testing.assert_allclose(third["softmax"], want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(third["log_softmax"], np.log(want), rtol=1e-12, atol=1e-12)
    assert third["softmax"] == filled[0]["softmax"] == filled[1]["softmax"]
    # one index per variant, and data named by key: the cache holds only our files
    names = [n for d, _, fs in os.walk(tmp_path) for n in fs]
    assert any(n.endswith(".nbi") for n in names) and not any(".tmp." in n for n in names)


def _probe(x):
    return x + 1


def _key(variant, sig=("int64",)):
    from numba import njit
    d = njit(_probe)
    cache = cpu_cache.VariantCache(d.py_func, variant)
    return cache._index_key(sig, d.targetctx.codegen()), cache


def test_key_changes_with_variant_sources_and_numba_version(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    from numba.core import config
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path))
    base, cache = _key("dtype=float32 a")
    assert base == _key("dtype=float32 a")[0]  # stable within a process (and carries no uuid)
    assert base != _key("dtype=float64 a")[0]
    assert cache.cache_path.startswith(str(tmp_path))  # NUMBA_CACHE_DIR is honoured
    real_read = cpu_cache.sources_hash
    try:
        cpu_cache.sources_hash.cache_clear()
        import numba
        monkeypatch.setattr(numba, "__version__", numba.__version__ + ".changed")
        assert _key("dtype=float32 a")[0] != base
        monkeypatch.undo()
        monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path))
        cpu_cache.sources_hash.cache_clear()
        monkeypatch.setattr(cpu_cache, "_SOURCES", cpu_cache._SOURCES[:-1])  # other sources
        assert _key("dtype=float32 a")[0] != base
    finally:
        real_read.cache_clear()


def test_read_only_install_falls_back_to_the_user_cache(tmp_path, monkeypatch):
    from numba.core import caching, config
    monkeypatch.setattr(config, "CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))

    def read_only(self):
        raise OSError("read-only file system")
    monkeypatch.setattr(caching.InTreeCacheLocator, "ensure_cache_path", read_only)
    _, cache = _key("x")
    assert cache.cache_path.startswith(str(tmp_path / "user"))


def test_import_gpuce_leaves_numba_cuda_alone_until_a_cuda_array_arrives(tmp_path):
    code = ("import sys, numpy as np, gpuce\n"
            "gpuce.softmax(np.ones((2, 3)))\n"
            "assert 'numba.cuda' not in sys.modules and 'gpuce._cuda' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=_child_env(tmp_path))


@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", reason="CPU dispatch test")
def test_a_cuda_looking_array_loads_the_cuda_backend_or_says_why():
    from gpuce import _dispatch

    class CudaLike:  # __cuda_array_interface__ alone marks a CUDA array
        __cuda_array_interface__ = {"shape": (2, 3), "typestr": "<f4", "data": (0, False),
                                    "version": 3}
        shape, dtype = (2, 3), np.dtype(np.float32)

    assert _dispatch._looks_like_cuda(CudaLike())
    assert not _dispatch._looks_like_cuda(np.ones(3))
    try:
        backend = _dispatch.backend_for(CudaLike())
    except TypeError as e:  # numba-cuda not installed
        assert "CUDA backend is not available" in str(e)
    else:
        assert backend.name == "cuda" and "gpuce._cuda" in sys.modules


def test_warmup_plans_and_rejects_bad_arguments():
    from gpuce import _warmup
    labels = [label for label, _ in _warmup.plan("cpu", ("float32", "bfloat16"),
                                                  ("softmax", "cross_entropy"), softcap=True)]
    assert "float32 softmax small" in labels and "bfloat16 cross_entropy large softcap" in labels
    assert len(labels) == 2 * 2 * (1 + 2)  # dtypes x sizes x (softmax + 2 ce variants)
    labels = [label for label, _ in _warmup.plan("cpu", ("float32", "bfloat16"),
                                                  ("cross_entropy",), classes=(10, 32))]
    # the short-row builds: per C and size, fp32/fp64 only
    assert [x for x in labels if "C=" in x] == [f"float32 cross_entropy {size} C={c}"
                                                for size in ("small", "large") for c in (10, 32)]
    for bad in (0, 33):
        with pytest.raises(ValueError, match="classes"):
            _warmup.plan("cpu", ("float32",), ("cross_entropy",), classes=(bad,))
    with pytest.raises(ValueError, match="device"):
        _warmup.plan("tpu", ("float32",), ("softmax",))
    with pytest.raises(ValueError, match="dtypes"):
        _warmup.plan("cpu", ("int8",), ("softmax",))
    with pytest.raises(ValueError, match="ops"):
        _warmup.plan("cpu", ("float32",), ("matmul",))


def test_warmup_cli_fills_the_cache_a_later_process_hits(tmp_path):
    env = _child_env(tmp_path)
    subprocess.run([sys.executable, "-m", "gpuce.cli", "warmup", "--dtypes", "float64",
                    "--ops", "softmax,log_softmax", "--sizes", "small", "--quiet"],
                   env=env, check=True, capture_output=True)
    later = json.loads(subprocess.run([sys.executable, "-c", _CHILD], env=env, check=True,
                                      capture_output=True, text=True).stdout)
    assert later["softmax_hits"] >= 1 and later["softmax_misses"] == 0
    assert later["log_softmax_hits"] >= 1 and later["log_softmax_misses"] == 0


@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1",
                    reason="the CUDA warm-up runs here under the simulator "
                           "(NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_cache.py -k cuda)")
def test_cuda_warmup_calls_every_strategy_through_the_public_api(monkeypatch):
    import gpuce
    from gpuce import _cuda, _warmup
    seen = []
    real = _cuda.CudaBackend.softmax

    def recording(self, x, axis, dt, out, log):
        seen.append((_cuda._forced_strategy(), tuple(x.shape), dt))
        return real(self, x, axis, dt, out, log)

    monkeypatch.setattr(_cuda.CudaBackend, "softmax", recording)
    labels = gpuce.warmup("cuda", ("float32",), ("softmax",))
    rows = _warmup.cuda_rows("float32")
    assert labels == [f"float32 softmax {label}" for label in rows]
    assert [(s, shape[1]) for s, shape, _ in seen] == list(rows.values())
    assert [s for s, _ in rows.values()] == ["warp"] * 5 + ["block_cached", "block", "split"]
    assert all(dt == "float32" for _, _, dt in seen)


# Large calls (parallel build) and small ones (serial build) as raw bytes, and how often the
# parallel builds were found on disk (hits) or compiled (misses).
_BITS_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import gpuce
    from gpuce.kernels import cpu
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((160, 1000)) * 3).astype(np.float32)
    y = rng.integers(0, 1000, 160)
    loss, grad = gpuce.cross_entropy_with_grad(x, y, reduction="none")
    loss8, grad8 = gpuce.cross_entropy_with_grad(x[:8], y[:8], reduction="none")
    out = {"large": [a.tobytes().hex() for a in (gpuce.softmax(x), loss, grad)],
           "small": [a.tobytes().hex() for a in (gpuce.softmax(x[:8]), loss8, grad8)]}
    ks = cpu.make_kernels("float32", False, None, True)
    for name in ("softmax", "ce_hard"):
        st = ks[name].stats
        out[name] = [sum(st.cache_hits.values()), sum(st.cache_misses.values())]
    # the short-row kernel (C = 10: its own build per C), parallel and serial
    from gpuce._cpu import SERIAL_BELOW
    from gpuce.kernels import cpu_small
    n = 2 * SERIAL_BELOW // 10
    x10, y10 = (rng.standard_normal((n, 10)) * 3).astype(np.float32), rng.integers(0, 10, n)
    l10, g10 = gpuce.cross_entropy_with_grad(x10, y10, reduction="none")
    l8, g8 = gpuce.cross_entropy_with_grad(x10[:8], y10[:8], reduction="none")
    out["large"] += [a.tobytes().hex() for a in (l10, g10[:8])]
    out["small"] += [a.tobytes().hex() for a in (l8, g8)]
    st = cpu_small.make_ce_hard_small("float32", 10, True).stats
    out["ce_small"] = [sum(st.cache_hits.values()), sum(st.cache_misses.values())]
    print(json.dumps(out))
""")


def test_results_are_bitwise_the_same_whatever_the_cache_state(tmp_path):
    """A process that compiled the kernels and one that loaded them from disk give the same
    bits, and the parallel (large) and serial (small) builds agree row for row."""
    env = _child_env(tmp_path)
    runs = [json.loads(subprocess.run([sys.executable, "-c", _BITS_CHILD], env=env, check=True,
                                      capture_output=True, text=True).stdout) for _ in range(2)]
    assert runs[0]["softmax"] == runs[0]["ce_hard"] == runs[0]["ce_small"] == [0, 1]  # compiled
    assert runs[1]["softmax"] == runs[1]["ce_hard"] == runs[1]["ce_small"] == [1, 0]  # from disk
    assert runs[0]["large"] == runs[1]["large"] and runs[0]["small"] == runs[1]["small"]
    large = [np.frombuffer(bytes.fromhex(h), np.float32) for h in runs[1]["large"]]
    small = [np.frombuffer(bytes.fromhex(h), np.float32) for h in runs[1]["small"]]
    for a, b in zip(large, small):
        assert np.array_equal(a[: b.size], b)  # the first 8 rows
    assert np.isfinite(large[1]).all() and (large[1] > 0).all()


def test_task_code_calls_no_other_compiled_function():
    """Why cache-loaded and in-process builds agree: the kernels' task code (cpu_tasks) is
    one function with every numba helper inlined. A call left to a linked helper would run,
    in-process, the helper's first compiled copy and, loaded from disk, the copy in the
    cached object, which numba optimised again (different bits under fast-math)."""
    import re

    import gpuce
    from gpuce.kernels import cpu
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 300)).astype(np.float32)
    y = rng.integers(0, 300, 6)
    gpuce.softmax(x)
    gpuce.cross_entropy_with_grad(x, y, label_smoothing=0.1, z_loss=1e-3)
    gpuce.cross_entropy_with_grad(x[:, :10], y % 10)  # the short-row kernel's tasks too
    from gpuce.kernels import cpu_small
    checked = 0
    for dispatcher in [*cpu.tasks("float32", False, None).values(),
                       cpu_small._small_tasks("float32", 10)[0]]:
        for cres in dispatcher.overloads.values():
            ir = str(cres.library._get_module_for_linking())  # compiled or loaded from disk
            defined = set(re.findall(r'^define [^@]*@"?([^"(]+)"?\(', ir, re.M))
            called = set(re.findall(r'call [^@]*@"?([^"(]+)"?\(', ir))
            linked = called & defined - {cres.fndesc.llvm_func_name, "NRT_incref", "NRT_decref"}
            assert not linked, (dispatcher.py_func.__qualname__, sorted(linked))
            assert "NRT_decref" in called  # (the scratch buffers: the scan sees calls)
            checked += 1
    assert checked >= 3  # softmax, ce_hard and the short-row tasks at least


# Short-row cross entropy for each C given, then the largest error against float64.
_VARIANTS_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import gpuce
    errs = []
    for c in map(int, sys.argv[1:]):
        rng = np.random.default_rng(c)
        x = rng.standard_normal((6, c)).astype(np.float32)
        t = rng.integers(0, c, 6)
        loss, _ = gpuce.cross_entropy_with_grad(x, t, reduction="none")
        x64 = x.astype(np.float64)
        lse = np.log(np.exp(x64 - x64.max(1, keepdims=True)).sum(1)) + x64.max(1)
        errs.append(float(np.max(np.abs(loss - (lse - x64[np.arange(6), t])))))
    print(json.dumps(errs))
""")


def test_variants_cached_by_different_processes_load_side_by_side(tmp_path):
    """Two processes each cache one short-row variant (C = 10, C = 20: same closures, other
    constants); a third loads both. Their symbols must not collide: before numba's function
    counter was offset per process, the C = 10 call ran C = 20 code (losses off by 1e14,
    then heap corruption)."""
    env = _child_env(tmp_path)

    def run(*cs):
        done = subprocess.run([sys.executable, "-c", _VARIANTS_CHILD, *map(str, cs)], env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    run(10)
    run(20)
    for order in ((20, 10), (10, 20)):
        errs = run(*order)
        assert max(errs) < 1e-5, (order, errs)
