"""Compile the common kernel variants ahead of time (``gpuce warmup``, ``gpuce.warmup()``).

Every variant is compiled by calling the public API on tiny arrays, so warm-up compiles
exactly what a real call would, and the compiled code lands in the on-disk cache (CPU:
see gpuce/kernels/cpu_cache.py; CUDA: numba's cache=True) for every later process. Use it
in a container build or a CI image, with NUMBA_CACHE_DIR pointing where the cache should live.
"""
import numpy as np

DEVICES = ("cpu", "cuda")
DTYPES = ("float16", "bfloat16", "float32", "float64")
OPS = ("softmax", "log_softmax", "logsumexp", "cross_entropy", "cross_entropy_inplace")
DEFAULT_DTYPES = ("float32", "bfloat16")
DEFAULT_OPS = ("softmax", "log_softmax", "cross_entropy")
# CUDA strategy -> a row length it holds (one compilation per strategy, dtype and kernel)
_CUDA_ROWS = {"block_cached": 150, "block": 203, "split": 257}  # C of each block strategy


def cuda_rows(dt):
    """{label: (strategy, C)} the CUDA warm-up runs in ``dt``: each warp part at the C it
    holds (its 128-bit variant), then one C for each block strategy."""
    from ._cuda_plan import WARP_SHAPES, warp_capacity
    rows = {part: ("warp", warp_capacity(part, dt)) for part in WARP_SHAPES}
    rows.update((s, (s, c)) for s, c in _CUDA_ROWS.items())
    return rows


def warmup(device="cpu", dtypes=DEFAULT_DTYPES, ops=DEFAULT_OPS, *, softcap=False,
           soft_targets=False, sizes=("small", "large"), classes=(), progress=False):
    """Compile ``ops`` for ``device`` in each of ``dtypes``; returns the jobs' labels.

    device : 'cpu' or 'cuda'.
    dtypes : any of 'float16', 'bfloat16', 'float32', 'float64'.
    ops : any of 'softmax', 'log_softmax', 'logsumexp', 'cross_entropy' (loss and
        gradient, which also serves the loss-only call), 'cross_entropy_inplace'.
    softcap, soft_targets : also compile the softcapped / probability-target variants.
    sizes : CPU only -- 'small' calls run a serial build, 'large' ones the parallel build.
    classes : CPU only -- also cross entropy at these class counts C <= 32 (fp32/fp64 hard
        targets have a build per C there, see kernels/cpu_small.py), in each of ``sizes``.
    progress : show a tqdm progress bar.
    """
    jobs = plan(device, dtypes, ops, softcap=softcap, soft_targets=soft_targets, sizes=sizes,
                classes=classes)
    if progress:
        from tqdm import tqdm
        bar = tqdm(jobs, desc=f"gpuce warmup ({device})", unit="variant")
        for label, run in bar:
            bar.set_postfix_str(label)
            run()
    else:
        for _, run in jobs:
            run()
    return [label for label, _ in jobs]


def plan(device, dtypes, ops, *, softcap=False, soft_targets=False, sizes=("small", "large"),
         classes=()):
    """[(label, zero-argument callable)] for the variants ``warmup`` compiles."""
    if device not in DEVICES:
        raise ValueError(f"device: {device!r} is not one of {DEVICES}")
    if isinstance(dtypes, str):
        dtypes = (dtypes,)
    if isinstance(ops, str):
        ops = (ops,)
    for dt in dtypes:
        if dt not in DTYPES:
            raise ValueError(f"dtypes: {dt!r} is not one of {DTYPES}")
    for op in ops:
        if op not in OPS:
            raise ValueError(f"ops: {op!r} is not one of {OPS}")
    bad = [s for s in sizes if s not in ("small", "large")]
    if bad:
        raise ValueError(f"sizes: {bad[0]!r} is not 'small' or 'large'")
    from ._cpu import SERIAL_BELOW, SMALL_MAX_C
    bad = [c for c in classes if not (isinstance(c, int) and 1 <= c <= SMALL_MAX_C)]
    if bad or (classes and device != "cpu"):
        raise ValueError(f"classes: {bad[0] if bad else classes!r} is not a CPU class count "
                         f"in 1..{SMALL_MAX_C}")
    caps = (None, 30.0) if softcap else (None,)
    targets = ("hard", "soft") if soft_targets else ("hard",)
    if device == "cpu":
        shapes = {"small": (4, 64), "large": (max(1, SERIAL_BELOW // 64), 64)}
        shapes = [(size, shapes[size]) for size in sizes]
        def to_device(a):
            return a

        def runs(dt):
            return [(size, None, shape) for size, shape in shapes]
    else:
        to_device = _cuda_array_maker()

        def runs(dt):
            return [(label, s, (3, c)) for label, (s, c) in cuda_rows(dt).items()]
    jobs = []
    for dt in dtypes:
        for where, strategy, shape in runs(dt):
            for op in ops:
                for cap in (caps if op.startswith("cross_entropy") else (None,)):
                    for tgt in (targets if op.startswith("cross_entropy") else ("hard",)):
                        label = f"{dt} {op} {where}" + (" softcap" if cap else "") + \
                            (" soft" if tgt == "soft" else "")
                        jobs.append((label, _job(device, op, dt, shape, cap, tgt, strategy,
                                                 to_device)))
    # the short-row builds (hard targets, fp32/fp64: see _cpu._small_ok), serial and parallel
    for where in (sizes if "cross_entropy" in ops else ()):
        for dt in dtypes:
            for c in classes if dt in ("float32", "float64") else ():
                rows = 4 if where == "small" else -(-SERIAL_BELOW // c)
                jobs.append((f"{dt} cross_entropy {where} C={c}",
                             _job(device, "cross_entropy", dt, (rows, c), None, "hard", None,
                                  to_device)))
    return jobs


def _job(device, op, dt, shape, cap, tgt, strategy, to_device):
    def run():
        import gpuce
        rng = np.random.default_rng(0)
        x = to_device(_as_dtype(rng.standard_normal(shape), dt))
        if tgt == "soft":
            q = rng.random(shape)
            y = to_device(_as_dtype(q / q.sum(-1, keepdims=True), dt))
        else:
            y = to_device(rng.integers(0, shape[-1], shape[:-1]))
        with _forced(device, strategy):
            if op in ("softmax", "log_softmax", "logsumexp"):
                getattr(gpuce, op)(x)
            elif op == "cross_entropy":
                gpuce.cross_entropy_with_grad(x, y, softcap=cap)
            else:
                gpuce.cross_entropy_with_grad(x, y, softcap=cap, inplace=True)
    return run


def _as_dtype(a, dt):
    if dt == "bfloat16":
        import ml_dtypes
        return a.astype(ml_dtypes.bfloat16)
    return a.astype(dt)


def _forced(device, strategy):
    import contextlib
    if device != "cuda" or strategy is None:
        return contextlib.nullcontext()
    from . import _cuda
    return _cuda.force_strategy(strategy)


def _cuda_array_maker():
    """numpy -> a CUDA array: numba's own device arrays (the simulator's under
    NUMBA_ENABLE_CUDASIM=1), which every numba-cuda install has."""
    from numba import cuda

    from ._checks import dtype_name

    def to_device(a):
        a = np.ascontiguousarray(a)
        if dtype_name(a) == "bfloat16":  # numba cannot type bf16: carry the raw words
            return cuda.to_device(a.view(np.int16)).view(a.dtype)
        return cuda.to_device(a)
    return to_device


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="gpuce warmup", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=DEVICES, default="cpu")
    p.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES),
                   help=f"comma-separated, from {','.join(DTYPES)} (default %(default)s)")
    p.add_argument("--ops", default=",".join(DEFAULT_OPS),
                   help=f"comma-separated, from {','.join(OPS)} (default %(default)s)")
    p.add_argument("--softcap", action="store_true", help="also the softcapped variants")
    p.add_argument("--soft-targets", action="store_true", help="also probability targets")
    p.add_argument("--sizes", default="small,large",
                   help="CPU: small (serial build), large (parallel build)")
    p.add_argument("--classes", default="",
                   help="CPU: also the short-row cross entropy (small calls) at these "
                        "class counts <= 32, e.g. 10,32")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    split = lambda s: tuple(v for v in s.split(",") if v)  # noqa: E731
    try:
        labels = warmup(args.device, split(args.dtypes), split(args.ops), softcap=args.softcap,
                        soft_targets=args.soft_targets, sizes=split(args.sizes),
                        classes=tuple(int(c) for c in split(args.classes)),
                        progress=not args.quiet)
    except ValueError as e:
        p.error(str(e))
    from .kernels.cpu_cache import cache_location
    print(f"compiled {len(labels)} variants for {args.device}; CPU cache: {cache_location()}")
    return 0
