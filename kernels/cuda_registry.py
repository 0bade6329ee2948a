"""Every CUDA kernel gpuce launches, with its explicit signature and launch bound.

``spec(name, key)`` -> (python function, signature, max threads per block), where ``key`` is
the logits' storage dtype for the main kernels (for cross entropy also a (logits, soft
targets) pair: half logits with float32 probabilities), the accumulator dtype for the
helpers, and a (source, destination) pair for ``convert``. ``all_specs()`` lists every combination gpuce can
launch, for the PTX compile test and benchmarks/ptx_report.py. A main kernel's name ending in
``_vec`` is its 128-bit variant (int32 views of the rows, every row start 16-byte aligned);
``_peel`` the 128-bit variant for rows anywhere (cuda_vec.peel) of the softmax block kernels
and of cross entropy's block_cached.
"""
from .cuda_cross_entropy import (MAX_BLOCK, WARP_BLOCK, WARP_SHAPES, _INT_TYPES,
                                 ce_kernel, ce_signature, check_masked_targets_kernel,
                                 check_masked_targets_signature, check_targets_kernel,
                                 check_targets_signature, convert_kernel, convert_signature,
                                 mask_live_kernel, mask_live_signature, stats_signature,
                                 target_stats_kernel)
from .cuda_dtypes import DTYPES
from .._cuda_plan import warp_min_blocks
from .cuda_softmax import softmax_kernel, softmax_signature

STRATEGIES = ("warp", "block_cached", "block", "split")
HALF_SOFT = ("float16", "bfloat16")  # half logits also run with float32 soft targets
VEC = "_vec"  # name suffix of the 128-bit variant (rows 16-byte aligned; see cuda_vec)
PEEL = "_peel"  # ... of the softmax block kernels' 128-bit variant for rows anywhere
PEELED_PARTS = ("block_cached", "block", "split_partial", "split_finish")
CE_PEELED_PARTS = ("block_cached",)  # (its sums read the cached row by column: batch invariant)
MASKED = "_masked"  # name part of the class-mask variant: <family>_<part>_masked[_vec]
_PARTS = (*WARP_SHAPES, "block_cached", "block", "split_partial", "split_finish")


def _bound(part, family="ce", dt=None):
    """Launch bound: max threads per block and resident blocks per SM: for the warp kernels
    warp_min_blocks (gpuce/_cuda_plan.py); for the block kernels (block_cached, block, split)
    of both families 2 resident blocks per SM (2 x 512 threads: 64 registers, which they fit
    without spilling, except in float64 and cross entropy's ``block``, which keeps two
    16-byte loads a thread in flight instead)."""
    if part in WARP_SHAPES:
        return WARP_BLOCK, warp_min_blocks(family, dt)
    if family == "ce" and part == "block":  # two steps a trip in flight instead (spills at 64)
        return MAX_BLOCK
    return (MAX_BLOCK, 2) if dt != "float64" else MAX_BLOCK


def masked_name(name):
    """The class-mask variant's name of kernel ``name`` (``ce_block_vec`` -> ``ce_block_masked_vec``)."""
    for suffix in (VEC, PEEL):
        if name.endswith(suffix):
            return name[:-len(suffix)] + MASKED + suffix
    return name + MASKED


def spec(name, key):
    vec = name.endswith(VEC)
    if vec:
        name = name[:-len(VEC)]
    peeled = name.endswith(PEEL)
    if peeled:
        name = name[:-len(PEEL)]
    masked = name.endswith(MASKED)
    if masked:
        name = name[:-len(MASKED)]
    if name.startswith("softmax_"):
        part = name[len("softmax_"):]
        if peeled and part not in PEELED_PARTS:
            raise KeyError(name + PEEL)
        return (softmax_kernel(part, key, vec, masked, peeled),
                softmax_signature(key, part, vec, masked, peeled), _bound(part, "softmax", key))
    if name == "ce_target_stats":
        return target_stats_kernel(key), stats_signature(key), MAX_BLOCK
    if name == "ce_mask_live":
        return mask_live_kernel(key), mask_live_signature(key), MAX_BLOCK
    if name.startswith("ce_"):
        part = name[len("ce_"):]
        dt, qdt = key if isinstance(key, tuple) else (key, None)
        if peeled and part not in CE_PEELED_PARTS:
            raise KeyError(name + PEEL)
        # (the peeled kernel: one block an SM, see _cuda_plan.plan_for)
        return (ce_kernel(part, dt, qdt, vec, masked, peeled),
                ce_signature(dt, part, qdt, vec, masked, peeled),
                MAX_BLOCK if peeled else _bound(part, "ce", dt))
    if name == "check_targets":
        return check_targets_kernel(), check_targets_signature(), MAX_BLOCK
    if name == "check_masked_targets":
        return check_masked_targets_kernel(), check_masked_targets_signature(), MAX_BLOCK
    if name == "convert":
        return convert_kernel(*key), convert_signature(*key), MAX_BLOCK
    raise KeyError(name)


def all_specs(main_only=False):
    """[(name, key)] for every kernel gpuce can launch, but the class-mask variants of the
    main kernels (masked_specs)."""
    out = [(f"{fam}_{part}{v}", dt) for fam in ("softmax", "ce") for part in _PARTS
           for dt in DTYPES for v in ("", VEC)]
    out += [(f"softmax_{part}{PEEL}", dt) for part in PEELED_PARTS for dt in DTYPES]
    out += [(f"ce_{part}{v}", (dt, "float32")) for part in _PARTS for dt in HALF_SOFT
            for v in ("", VEC)]
    out += [(f"ce_{part}{PEEL}", dt) for part in CE_PEELED_PARTS for dt in DTYPES]
    out += [(f"ce_{part}{PEEL}", (dt, "float32")) for part in CE_PEELED_PARTS
            for dt in HALF_SOFT]
    if main_only:
        return out
    out += [("ce_target_stats", acc) for acc in ("float32", "float64")]
    out += [("ce_mask_live", acc) for acc in ("float32", "float64")]
    out.append(("check_targets", None))
    out.append(("check_masked_targets", None))
    out += [("convert", (a, b)) for a in DTYPES for b in DTYPES if a != b]
    out += [("convert", (i, "int64")) for i in _INT_TYPES if i != "int64"]
    return out


def masked_specs(dtypes=DTYPES):
    """[(name, key)] of the class-mask variants of the main kernels for ``dtypes`` (all of
    them can be launched; all_specs leaves them out, as they double its count)."""
    return [(masked_name(n), k) for n, k in all_specs(main_only=True)
            if (k[0] if isinstance(k, tuple) else k) in dtypes]
