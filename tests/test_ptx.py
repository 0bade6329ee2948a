"""Every CUDA kernel x dtype compiles to PTX for sm_80 and sm_90 and assembles (ptxas through
nvJitLink) with zero register spills. No GPU needed; not under the simulator.

The kernels are compiled once per session, in a process pool (one worker per CPU), and each
test reads its kernel's result.
"""
import os
import re
from concurrent.futures import ProcessPoolExecutor

import pytest

from kinds import SIMULATOR

pytestmark = pytest.mark.skipif(SIMULATOR, reason="PTX compilation needs the real numba-cuda")

if not SIMULATOR:
    pytest.importorskip("numba_cuda", reason="numba-cuda is not installed")
    pytest.importorskip("cuda.bindings.nvjitlink", reason="nvJitLink is not installed")
    from gpuce._cuda_plan import WARP_SHAPES, warp_min_blocks
    from gpuce.kernels import cuda_ptx, cuda_registry

    # The class-mask variants (cuda_registry.masked_specs) double the count: by default one
    # representative of each family (float32, 128-bit); GPUCE_SLOW_TESTS=1 compiles every
    # float32 128-bit one (about 140 more CPU seconds), and benchmarks/ptx_report.py them all.
    MASKED_DEFAULT = [("ce_block_cached_masked_vec", "float32"),
                      ("softmax_block_masked_vec", "float32"),
                      ("softmax_block_masked_peel", "float32"),
                      ("ce_block_cached_masked_peel", "float32"),
                      ("softmax_warp_masked_vec", "float32")]
    MASKED_ALL = [s for s in cuda_registry.masked_specs(("float32",))
                  if s[0].endswith(("_vec", "_peel")) and not isinstance(s[1], tuple)]
    # Cross entropy with half logits and float32 soft targets: float16 logits differ from the
    # bfloat16 ones only in the logit load, which the plain float16 keys compile; by default
    # the bfloat16 ones stand for both (GPUCE_SLOW_TESTS=1: both, about 120 CPU seconds more).
    SLOW = bool(os.environ.get("GPUCE_SLOW_TESTS"))
    SPECS = [s for s in cuda_registry.all_specs() if SLOW or s[1] != ("float16", "float32")]
    SPECS += MASKED_ALL if SLOW else MASKED_DEFAULT
else:
    SPECS = []


def _build(spec):
    """(name, key) -> {cc: resources} or the error text. Runs in a worker process."""
    name, key = spec
    try:
        out = {}
        for cc, ptx in cuda_ptx.compile_ptx(name, key).items():
            _, res = cuda_ptx.ptxas(ptx, cc)
            res["maxntid"] = ".maxntid" in ptx
            res["loops"] = cuda_ptx.streaming_loops(ptx)
            res["half_scalar"] = len(re.findall(r"(ld|st)\.global\.[bu]16", ptx))
            res["half_in_loops"] = sum(1 for body in cuda_ptx.ptx_loops(ptx) for ln in body
                                       if re.search(r"(ld|st)\.global\.[bu]16", ln))
            res["half_st"] = len(re.findall(r"st\.global\.[bu]16", ptx))
            res["half_st_in_loops"] = sum(1 for body in cuda_ptx.ptx_loops(ptx) for ln in body
                                          if re.search(r"st\.global\.[bu]16", ln))
            out[cc] = res
        return out
    except Exception as exc:  # reported by the test of that kernel
        return f"{type(exc).__name__}: {exc}"


@pytest.fixture(scope="module")
def resources(request):
    """Only the kernels of the tests selected (``-k warp`` compiles the warp kernels)."""
    wanted = {item.callspec.params["spec"] for item in request.session.items
              if "spec" in getattr(getattr(item, "callspec", None), "params", {})}
    specs = [s for s in SPECS if s in wanted]
    workers = max(1, min(len(os.sched_getaffinity(0)), 4))
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(_build, specs, chunksize=1))
    return dict(zip(specs, results))


def _label(spec):
    return f"{spec[0]}[{cuda_ptx.key_label(spec[1], spec[0])}]"


@pytest.mark.parametrize("spec", SPECS, ids=_label)
def test_compiles_without_spills(resources, spec):
    res = resources[spec]
    assert not isinstance(res, str), res
    assert set(res) == set(cuda_ptx.TARGETS)
    for cc, r in res.items():
        where = f"{spec} on sm_{cc[0]}{cc[1]}: {r}"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, where
        assert r["registers"] <= 255, where
        assert r["maxntid"], f"{where}: no launch bound in the PTX"
        if spec[0].startswith(("ce_warp", "softmax_warp")):
            assert r["stack"] == 0, f"{where}: the row is not held in registers"
            # the launch bound's resident blocks fit the SM's 64K registers (8 a unit)
            dt = spec[1][0] if isinstance(spec[1], tuple) else spec[1]
            blocks = warp_min_blocks(spec[0].split("_")[0], dt)
            assert -(-r["registers"] // 8) * 8 * 256 * blocks <= 65536, where


# Static PTX instructions per element of a 128-bit streaming loop, sm_90: every path of the
# loop body counted (the online-softmax rescale, -inf rows, each mode), divided by the values
# one trip moves -- an upper bound on what a trip issues, kept as a regression guard. The
# softmax family's loops, and cross entropy's first pass over the row (block_cached: its loop
# without other global accesses). For scale: at copy speed an H100 issues about 40
# instructions per bf16 element and 80 per fp32 element of a loss+gradient pass (GUIDE 5);
# benchmarks/roofline.py counts the SASS of the path a call takes.
BUDGET_SOFTMAX = {"float16": 64, "bfloat16": 64, "float32": 64, "float64": 160}
BUDGET_CE_FIRST_PASS = {"float16": 40, "bfloat16": 40, "float32": 40, "float64": 120}
VEC_SPECS = [s for s in SPECS if s[0].endswith(("_vec", "_peel"))]


def _elems(key):
    dt = key[0] if isinstance(key, tuple) else key
    return {"float16": 8, "bfloat16": 8, "float32": 4, "float64": 2}[dt]


@pytest.mark.parametrize("spec", VEC_SPECS, ids=_label)
def test_vectorized_kernels_stream_128_bits(resources, spec):
    """128-bit variants: the row streams with ld.global.v4 (and st.global.v4 where the kernel
    writes rows), instructions per element in budget, and no 16-bit global access anywhere --
    but in the peeled variants (``_peel``: rows that do not start on 16 bytes,
    cuda_vec.peel): their head and tail elements, one load and one store a thread outside
    the streaming loops."""
    res = resources[spec]
    assert not isinstance(res, str), res
    loops = res[(9, 0)]["loops"]
    name = spec[0]
    k = _elems(spec[1])
    assert any(v4_ld for _, v4_ld, _, _, _ in loops), f"{spec}: no 128-bit load loop: {loops}"
    if not name.startswith(("ce_split_partial", "softmax_split_partial")):
        assert any(v4_st for _, _, v4_st, _, _ in loops), f"{spec}: no 128-bit store: {loops}"
    if name.endswith("_peel"):
        # cross entropy reads soft targets by column: 16-bit loads with half ones (the same
        # kernel body with float32 targets shows that nothing else is); its body is inlined
        # twice (softcap on, off): an edge load and store each
        if name.startswith("ce_") and not isinstance(spec[1], tuple) and k == 8:
            assert res[(9, 0)]["half_st_in_loops"] == 0, f"{spec}: 16-bit stores in a loop"
            assert res[(9, 0)]["half_st"] <= 2, f"{spec}: 16-bit global stores left"
        elif name.startswith("ce_"):
            assert res[(9, 0)]["half_in_loops"] == 0, f"{spec}: 16-bit accesses in a loop"
            assert res[(9, 0)]["half_scalar"] <= 4, f"{spec}: 16-bit global accesses left"
        else:
            assert res[(9, 0)]["half_in_loops"] == 0, f"{spec}: 16-bit accesses in a loop"
            assert res[(9, 0)]["half_scalar"] <= 2, f"{spec}: 16-bit global accesses left"
    else:
        assert res[(9, 0)]["half_scalar"] == 0, f"{spec}: 16-bit global accesses left"
    dt = spec[1][0] if isinstance(spec[1], tuple) else spec[1]
    for n, v4_ld, v4_st, ld, st in loops:
        if not (v4_ld or v4_st):
            continue
        per_elem = n / (k * max(1, v4_ld if not v4_st else v4_st))
        if name.startswith("softmax"):
            assert per_elem <= BUDGET_SOFTMAX[dt], f"{spec}: {per_elem:.1f} instructions/element"
    if name.startswith("ce_block_cached"):
        mask_bytes = k if "_masked" in name else 0  # a class-mask variant reads a byte a value
        # (float32/float64 rows take two steps a trip: two 128-bit loads)
        first = [n / (k * v4_ld) for n, v4_ld, v4_st, ld, st in loops
                 if v4_ld and ld == mask_bytes * v4_ld and not (v4_st or st)]
        assert first and min(first) <= BUDGET_CE_FIRST_PASS[dt], f"{spec}: {loops}"


def test_every_kernel_is_listed():
    names = {name for name, _ in SPECS}
    for fam in ("softmax", "ce"):
        for part in (*WARP_SHAPES, "block_cached", "block", "split_partial", "split_finish"):
            assert f"{fam}_{part}" in names and f"{fam}_{part}_vec" in names
    for part in ("block_cached", "block", "split_partial", "split_finish"):
        assert f"softmax_{part}_peel" in names
    assert ("ce_block_cached_peel", "bfloat16") in SPECS
    assert ("ce_block_cached_peel", ("bfloat16", "float32")) in SPECS
    for dt in ("float16", "bfloat16", "float32", "float64"):
        assert ("ce_warp", dt) in SPECS and ("softmax_split_finish", dt) in SPECS
    assert ("ce_split_partial", ("bfloat16", "float32")) in SPECS
    masked = set(cuda_registry.masked_specs())
    for name, key in cuda_registry.all_specs(main_only=True):
        assert (cuda_registry.masked_name(name), key) in masked
    assert set(MASKED_DEFAULT) <= set(MASKED_ALL) <= masked


def test_resource_log_parsing():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90'\n"
           "ptxas         .     16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 1 barriers, 256 bytes smem\n")
    r = cuda_ptx.parse_resources(log)
    assert r == {"registers": 40, "spill_stores": 8, "spill_loads": 4, "stack": 16, "smem": 256}
