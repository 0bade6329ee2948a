"""The CUDA strategy and launch plan, as a table: pure Python, no numba.cuda, no GPU needed.

``plan_for(n_rows, n_cls, dtype_name, device)`` picks the kernel and its launch shape for
n_rows x n_cls logits; the backend (gpuce/_cuda.py) launches it, and benchmarks/roofline.py
reads the same plan to model a device it does not have.

Strategy by row length C (first rule that holds wins; see kernels/cuda_cross_entropy.py):

| strategy     | when                                   | threads/block       | shared memory  |
|--------------|----------------------------------------|---------------------|----------------|
| warp         | C <= 512 (float64: 256): the warp part below | 256          | 0              |
| split        | rows < SMs and C >= 16384              | pow2(C/32) in 32..512 | 0 |
| block_cached | the row (storage dtype) fits in the opt-in shared memory | as split | C x item bytes |
| block        | any C                                  | as split            | 0              |

A split row takes ``split_count`` blocks: the count whose chunks end soonest in whole waves of
resident blocks (an H100 holds 264 split blocks; N = 64 takes 4 a row, one wave).

The warp strategy's kernels (parts) hold the row in registers, 16 values a lane (float64 8):
the part with the fewest lanes that holds C, so padded work is at most 2x the row (C > 16).
Few lanes a row, many values a lane: the per-row work (reductions, the loss) is shared by
fewer lanes, and each lane has 2-4 128-bit loads in flight.

| part       | C (float64)         | lanes a row | rows a block (256 threads) |
|------------|---------------------|-------------|----------------------------|
| warp_2x16  | 1..32 (1..16)       | 2           | 128                        |
| warp_4x16  | 33..64 (17..32)     | 4           | 64                         |
| warp_8x16  | 65..128 (33..64)    | 8           | 32                         |
| warp_16x16 | 129..256 (65..128)  | 16          | 16                         |
| warp       | 257..512 (129..256) | 32          | 8                          |

The warp kernels' launch bound asks for WARP_MIN_BLOCKS of their 256-thread blocks per SM
(softmax 3: <= 80 registers, float64 2; ce none: 95-128 registers on sm_90, 2 blocks), with
no spills (tests/test_ptx.py).

Launch bounds of the other kernels (kernels/cuda_registry.py): block kernels (block_cached,
block, split; softmax and cross entropy) 512 threads, 2 blocks per SM (<= 64 registers, no
spills; float64 1; cross entropy's block and peeled block_cached 1, with two loads a thread
in flight).

Each kernel has a 128-bit variant (``<name>_vec``: 16-byte loads and stores of 4 fp32, 8
fp16/bf16 or 2 fp64 values), taken when every row of the logits, gradient/output and soft
targets starts on 16 bytes (row bytes a multiple of 16, aligned base pointers); otherwise
the scalar kernel runs (e.g. C = 50257, or an offset view) -- but for the softmax family's
block kernels (block_cached, block, split) and cross entropy's block_cached (``peels``),
which then take their peeled 128-bit variant (``<name>_peel``, ``LaunchPlan.peeled``: each
row's head and tail element by element, the rest in 16-byte steps; kernels/cuda_vec.py,
``peel``), as long as x and out (the gradient) sit at the same offset from 16 bytes, aligned
to the element size (cross entropy's soft targets are read by element: any offset).

``block_cached`` falls back to ``block`` when the kernel cannot opt in to that much shared
memory (the backend asks the driver). Every kernel loops over its rows with a grid stride,
so grids are capped at 64 blocks per SM.
"""
from dataclasses import dataclass, field, replace

STRATEGIES = ("warp", "block_cached", "block", "split")
WARP_BLOCK = 256          # threads per block of the warp kernels (their launch bound)
MAX_BLOCK = 512           # most threads per block of the other kernels (launch bound)
SIM_BLOCK = 64            # threads per block under the simulator (each one a Python thread)
SPLIT_MIN_C = 16384       # split a row across blocks only when it is this long ...
STATIC_SMEM = 48 * 1024   # shared memory a block gets without opting in
SMEM_BUFFERS = 2048       # static shared memory of the kernels (ptxas: at most ~1.6 KiB)
GRID_PER_SM = 64          # grid cap: blocks per SM (grid-stride loops cover the rest)
VEC = "_vec"              # kernel name suffix of the 128-bit variant (kernels/cuda_vec.py)
PEEL = "_peel"            # ... of the peeled 128-bit variant (``peels``)
VEC_BYTES = 16

# warp kernels, smallest first: part -> (lanes per row, values per lane held in registers;
# float64 half as many). Capacities double, so the part chosen pads at most 2x the row.
WARP_SHAPES = {
    "warp_2x16": (2, 16),
    "warp_4x16": (4, 16),
    "warp_8x16": (8, 16),
    "warp_16x16": (16, 16),
    "warp": (32, 16),
}
# their launch bound's resident 256-thread blocks per SM, by family: ce's kernels take 95-128
# registers on sm_90 (2 blocks) but spill under a 128-register bound on sm_80, so none is
# asked; softmax's fit 80 (3 blocks; 4 spill on sm_80), 6+ KiB in flight per block, and
# 128 in float64 (2 blocks; 3 spill)
WARP_MIN_BLOCKS = {"ce": 1, "softmax": 3}
WARP_MIN_BLOCKS_F64 = {"ce": 1, "softmax": 2}


def warp_min_blocks(family, dt):
    """The warp kernels' launch bound: resident 256-thread blocks per SM asked of ptxas."""
    return (WARP_MIN_BLOCKS_F64 if dt == "float64" else WARP_MIN_BLOCKS)[family]

_ITEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


@dataclass(frozen=True)
class DeviceLimits:
    """What the plan needs to know about a GPU (cudaDeviceProp names in the comments)."""
    sm_count: int                      # multiProcessorCount
    max_shared_per_block_optin: int    # sharedMemPerBlockOptin
    shared_per_sm: int                 # sharedMemPerMultiprocessor
    regs_per_sm: int                   # regsPerMultiprocessor
    max_threads_per_sm: int            # maxThreadsPerMultiProcessor
    cc: tuple                          # (major, minor)
    simulated: bool = False            # numba's simulator: tiny blocks and grids

    @property
    def max_grid(self):
        return 3 if self.simulated else self.sm_count * GRID_PER_SM

    @classmethod
    def h100(cls):
        """H100 SXM (sm_90): 132 SMs, 227 KiB opt-in shared memory per block."""
        return cls(132, 227 * 1024, 228 * 1024, 65536, 2048, (9, 0))

    @classmethod
    def h200(cls):
        return cls.h100()  # the same SM and count; only HBM differs

    @classmethod
    def simulator(cls):
        return cls(2, STATIC_SMEM, STATIC_SMEM, 65536, 2048, (9, 0), simulated=True)


@dataclass(frozen=True)
class LaunchPlan:
    family: str            # "ce" or "softmax"
    strategy: str          # one of STRATEGIES
    part: str              # kernel variant: a WARP_SHAPES key, block_cached, block, split
    kernel: str            # cuda_registry name of the (first) kernel launched
    key: object            # cuda_registry key: the logits' dtype (or (dtype, soft dtype))
    grid: int
    block: int             # threads per block
    shared_bytes: int      # dynamic shared memory per block
    n_split: int = 0       # blocks per row (split)
    vectorized: bool = False   # the 128-bit variant (16-byte aligned rows, or peeled)
    peeled: bool = False   # ... that peels rows: takes (storage, int32) views and the phase
    kernels: tuple = field(default=())  # every kernel name launched, in order
    launch_bound: int = MAX_BLOCK       # max threads per block compiled into the kernel
    min_blocks: int = 1    # resident blocks per SM the launch bound asks of the compiler


def warp_part(n_cls, dt):
    """The warp part holding rows of n_cls ``dt`` values with the least padding (None: no
    warp part holds them)."""
    for part in WARP_SHAPES:
        if n_cls <= warp_capacity(part, dt):
            return part
    return None


def warp_capacity(part, dt):
    lanes, per_lane = warp_shape(part, dt)
    return lanes * per_lane


def warp_shape(part, dt):
    """(lanes per row, values per lane) of a warp kernel; float64 holds half as many."""
    lanes, per_lane = WARP_SHAPES[part]
    return lanes, (per_lane // 2 if dt == "float64" else per_lane)


def _pow2ceil(n):
    return 1 << max(0, int(n - 1).bit_length())


def auto_strategy(n_rows, n_cls, dt, device, softcap=False):
    """The strategy table above, as code."""
    if n_cls <= warp_capacity("warp", dt):
        return "warp"
    if n_rows < device.sm_count and n_cls >= SPLIT_MIN_C:
        return "split"
    if cached_bytes(n_cls, dt, softcap) + SMEM_BUFFERS <= device.max_shared_per_block_optin:
        return "block_cached"
    return "block"


def cached_bytes(n_cls, dt, softcap=False):
    """Dynamic shared memory of block_cached: the row as stored (half rows stay 2 bytes a
    value, so rows up to ~110k fit in an H100's 227 KiB). Cross entropy with a softcap
    caches tanh(x / cap) in float32 instead (one tanh a value, not one a pass)."""
    if softcap and dt in ("float16", "bfloat16"):
        return n_cls * 4
    return n_cls * _ITEM_BYTES[dt]


def block_threads(n_cls, device):
    """Threads per block of the block and split kernels (both families): the per-row work
    (block reductions, the row's end) is spread over >= 32 values a thread where the row
    allows, so short rows get small blocks (one warp up to C = 1024), many per SM."""
    if device.simulated:
        return SIM_BLOCK
    return int(min(MAX_BLOCK, max(32, _pow2ceil(n_cls // 32))))


def plan_for(n_rows, n_cls, dtype_name, device, family="ce", key=None, strategy=None,
             aligned=None, peelable=True, softcap=False):
    """The LaunchPlan for n_rows x n_cls logits of ``dtype_name`` on ``device``.
    ``strategy`` forces one (ValueError if it cannot hold the row); ``key`` defaults to the
    dtype (cross entropy with half logits and float32 soft targets passes (dt, "float32")).
    ``aligned``: every row (and output row) starts on 16 bytes, so the 128-bit variant
    (kernel names ending in ``_vec``) runs; None assumes freshly allocated arrays (aligned
    when C x element size is a multiple of 16). ``peelable``: the row arrays' addresses
    are aligned to the element size and equal modulo 16 (true of fresh arrays and in-place
    calls), so a peeling kernel takes unaligned rows too. ``softcap``: cross entropy with
    a softcap (block_cached's shared memory, see cached_bytes)."""
    dt = dtype_name
    if aligned is None:
        aligned = row_aligned(n_cls, dt)
    plan = _plan(n_rows, n_cls, dt, device, family, key, strategy, softcap)
    peeled = not aligned and peelable and peels(family, plan.strategy)
    if not (aligned or peeled):
        return plan
    names = tuple(n + (PEEL if peeled else VEC) for n in plan.kernels)
    plan = replace(plan, kernel=names[0], kernels=names, vectorized=True, peeled=peeled)
    if peeled and family == "ce":  # its launch bound: one block an SM, two loads in flight
        plan = replace(plan, min_blocks=1)
    return plan


def peels(family, strategy):
    """Has the strategy a peeled 128-bit variant (rows anywhere)? softmax: the block kernels;
    cross entropy: block_cached, whose sums read the cached row by column, so a row's bits
    do not depend on its offset (its block and split kernels would sum in memory order)."""
    if family == "ce":
        return strategy == "block_cached"
    return strategy != "warp"


def row_aligned(n_cls, dt, *pointers):
    """Do rows of n_cls ``dt`` values starting at these addresses all start on 16 bytes?"""
    return (n_cls * _ITEM_BYTES[dt]) % VEC_BYTES == 0 and all(p % VEC_BYTES == 0
                                                             for p in pointers)


def _plan(n_rows, n_cls, dt, device, family, key, strategy, softcap=False):
    key = dt if key is None else key
    forced = strategy
    softcap = softcap and family == "ce"
    strategy = forced or auto_strategy(n_rows, n_cls, dt, device, softcap)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: {strategy!r} is not one of {STRATEGIES}")
    if strategy == "warp":
        cap = warp_capacity("warp", dt)
        if n_cls > cap:
            raise ValueError(f"strategy: warp holds rows of at most {cap} {dt} values, "
                             f"got {n_cls}")
        part = warp_part(n_cls, dt)
        lanes, _ = warp_shape(part, dt)
        block = SIM_BLOCK if device.simulated else WARP_BLOCK
        grid = max(1, min(-(-n_rows // (block // lanes)), device.max_grid))
        name = f"{family}_{part}"
        return LaunchPlan(family, "warp", part, name, key, grid, block, 0, kernels=(name,),
                          launch_bound=WARP_BLOCK, min_blocks=warp_min_blocks(family, dt))
    block = block_threads(n_cls, device)
    if strategy == "block_cached":
        shared = cached_bytes(n_cls, dt, softcap)
        if shared + SMEM_BUFFERS > (STATIC_SMEM if device.simulated
                                    else device.max_shared_per_block_optin):
            if forced:
                raise ValueError(f"strategy: block_cached cannot hold {n_cls} {dt} values "
                                 f"per row in shared memory on this device")
            strategy = "block"
        else:
            name = f"{family}_block_cached"
            return LaunchPlan(family, strategy, strategy, name, key,
                              max(1, min(n_rows, device.max_grid)), block, shared,
                              kernels=(name,), min_blocks=_min_blocks(family, dt))
    if strategy == "split":
        if device.simulated:
            n_split = int(min(4, max(2, -(-n_cls // 64))))
        else:
            n_split = split_count(n_rows, n_cls, block, device.sm_count * _min_blocks(family, dt))
        names = (f"{family}_split_partial", f"{family}_split_finish")
        return LaunchPlan(family, "split", "split", names[0], key,
                          max(1, min(n_rows * n_split, device.max_grid)), block, 0,
                          n_split=n_split, kernels=names, min_blocks=_min_blocks(family, dt))
    name = f"{family}_block"
    return LaunchPlan(family, "block", "block", name, key, max(1, min(n_rows, device.max_grid)),
                      block, 0, kernels=(name,),
                      min_blocks=1 if family == "ce" else _min_blocks(family, dt))


def split_count(n_rows, n_cls, block, slots):
    """Blocks a row is split into: the count whose chunks finish soonest in whole waves of
    ``slots`` resident blocks (time ~ ceil(n_rows n / slots) / n), the fewest on a tie (less
    per-chunk work), from 2 up to two waves' worth and chunks of >= 8 values a thread. N = 64
    on an H100 (264 slots): 4 (256 blocks, one wave), not 5 (320: a second wave 21% full)."""
    most = max(2, min(1024, n_cls // (block * 8), -(-2 * slots // max(n_rows, 1))))
    return min(range(2, most + 1), key=lambda n: (-(-n_rows * n // slots) / n, n))


def _min_blocks(family, dt):
    """kernels/cuda_registry.py's launch bound: the block kernels of both families fit 2 x 512
    threads (not in float64)."""
    return 2 if dt != "float64" else 1


def resident_blocks(plan, device, registers_per_thread=None):
    """Blocks of ``plan`` resident on one SM, limited by threads, shared memory and (when
    known, e.g. from ptxas) registers."""
    by_threads = device.max_threads_per_sm // plan.block
    by_smem = (device.shared_per_sm // (plan.shared_bytes + SMEM_BUFFERS)
               if plan.shared_bytes else by_threads)
    n = min(by_threads, by_smem, 32)
    if registers_per_thread:
        regs = -(-registers_per_thread // 8) * 8  # allocated per warp in units of 256
        n = min(n, device.regs_per_sm // (regs * plan.block))
    return n
