"""Measurement core of ``gpuce bench``: byte accounting, devices and their buffers, timers,
the float64 check of every result, and the machine description.

Nothing here knows about particular peers; those are the adapters in ``bench_peers``.
"""
import gc
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata

import numpy as np

OPS = ("softmax", "log_softmax", "ce_fwd", "ce_fwd_bwd")
OP_TITLES = {
    "softmax": "softmax",
    "log_softmax": "log_softmax",
    "ce_fwd": "cross-entropy forward",
    "ce_fwd_bwd": "cross-entropy forward+backward (fused loss+grad)",
}
DTYPES = ("float32", "bfloat16", "float16", "float64")
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}
_ALIASES = {"fp32": "float32", "f32": "float32", "float": "float32", "bf16": "bfloat16",
            "fp16": "float16", "f16": "float16", "half": "float16", "fp64": "float64",
            "f64": "float64", "double": "float64"}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
TARGET_ITEMSIZE = 8  # class indices are int64, as PyTorch wants them

# Accepted error of a result against the float64 reference: max |out - ref| / max |ref| over
# the rows compared (outputs), and |loss - ref| / |ref| (losses). Outputs are rounded to their
# own dtype, so the bound follows the dtype; gpuce computes every loss in fp32 (fp64 for fp64).
OUT_TOL = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
LOSS_TOL_PEER = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
LOSS_TOL_GPUCE = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 1e-4, "float16": 1e-4}

MAX_ROTATION = 64
MiB = 1 << 20


def canonical_dtype(name):
    name = name.strip().lower()
    name = _ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of "
                         f"{', '.join(sorted(set(SHORT.values()) | set(DTYPES)))}")
    return name


def numpy_dtype(name):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


# ---- byte accounting -------------------------------------------------------------------

def op_bytes(op, n, c, itemsize, target_itemsize=TARGET_ITEMSIZE):
    """Bytes an ideal implementation moves: one read of the logits, one write of each output
    of the logits' size, and one read of the class indices. The 4-byte mean loss is left out.

    softmax, log_softmax: read + write N*C*size.
    ce_fwd:               read N*C*size + N*target_size.
    ce_fwd_bwd:           read N*C*size + write the gradient N*C*size + N*target_size.
    """
    logits = n * c * itemsize
    if op in ("softmax", "log_softmax"):
        return 2 * logits
    if op == "ce_fwd":
        return logits + n * target_itemsize
    if op == "ce_fwd_bwd":
        return 2 * logits + n * target_itemsize
    raise ValueError(f"unknown op {op!r}")


def copy_bytes(n, c, itemsize):
    """Bytes moved by the floor: a copy of the logits is one read plus one write."""
    return 2 * n * c * itemsize


def gbps(nbytes, ms):
    return nbytes / (ms * 1e-3) / 1e9


def rows_for(c, itemsize, size_bytes):
    """N such that the logits of an (N, C) case take about ``size_bytes``."""
    return max(1, int(size_bytes // (c * itemsize)))


def rotation_count(case_bytes, rotate_bytes, max_copies=MAX_ROTATION):
    """How many copies of the inputs to cycle through so they exceed ``rotate_bytes``."""
    if case_bytes <= 0:
        return 1
    return int(min(max(1, math.ceil(rotate_bytes / case_bytes)), max_copies))


# ---- devices ---------------------------------------------------------------------------

def _try_import(name):
    try:
        return __import__(name, fromlist=["_"])
    except Exception:  # ImportError, or a broken install raising something else
        return None


def last_level_cache_bytes():
    """Size of the largest CPU cache (sysfs; lscpu's numbers as a fallback), or None."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            if not entry.startswith("index"):
                continue
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            value = int(text.rstrip("KMG")) * mult
            best = max(best, value)
    except (OSError, ValueError):
        pass
    return best or None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def torch_from_numpy(a):
    import torch
    a = np.ascontiguousarray(a)
    if a.dtype == numpy_dtype("bfloat16"):
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


class CpuDevice:
    """Host memory; numpy arrays (bf16 as ml_dtypes.bfloat16)."""
    kind = "cpu"

    def __init__(self):
        self.cache_bytes = last_level_cache_bytes()

    def upload(self, a):
        return a

    def clone(self, a):
        return a.copy()

    def empty_like(self, a):
        out = np.empty_like(a)
        out.view(np.uint8).fill(0)  # touch every page now, not inside a timed call
        return out

    def copy(self, dst, src):
        np.copyto(dst, src)

    def to_torch(self, a):
        return torch_from_numpy(a)

    def synchronize(self):
        pass

    def flush(self):
        pass

    def timer(self, **kw):
        return CpuTimer(**kw)

    def describe(self):
        return {}

    floor_name = "np.copyto"


class CudaDevice:
    """The current CUDA device, driven through torch when it has CUDA, else through CuPy."""
    kind = "cuda"
    floor_name = "device-to-device copy"

    def __init__(self):
        torch = _try_import("torch")
        cupy = _try_import("cupy")
        if torch is not None and torch.cuda.is_available():
            self.lib, self._torch = "torch", torch
        elif cupy is not None and _cupy_has_device(cupy):
            self.lib, self._torch = "cupy", None
        else:
            raise RuntimeError("--device cuda needs an NVIDIA GPU and torch with CUDA or CuPy; "
                               "none was found")
        self._cupy = cupy
        self._where = "cuda"  # torch's device string (the tests use a CPU stand-in)
        self.cache_bytes = self._l2_bytes()
        self._scratch = None

    @staticmethod
    def available():
        torch = _try_import("torch")
        if torch is not None and torch.cuda.is_available():
            return True
        cupy = _try_import("cupy")
        return cupy is not None and _cupy_has_device(cupy)

    def _l2_bytes(self):
        try:
            if self.lib == "torch":
                return int(self._torch.cuda.get_device_properties(0).L2_cache_size)
            return int(self._cupy.cuda.runtime.getDeviceProperties(
                self._cupy.cuda.runtime.getDevice())["l2CacheSize"])
        except Exception:
            return 64 * MiB

    def upload(self, a):
        if self.lib == "torch":
            return torch_from_numpy(a).to(self._where)
        return self._cupy.asarray(a)

    def clone(self, a):
        return a.clone() if self.lib == "torch" else a.copy()

    def empty_like(self, a):
        if self.lib == "torch":
            return self._torch.zeros_like(a)
        return self._cupy.zeros_like(a)

    def copy(self, dst, src):
        if self.lib == "torch":
            dst.copy_(src)
        else:
            self._cupy.copyto(dst, src)

    def to_torch(self, a):
        if self.lib == "torch":
            return a
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError("torch has no CUDA here")
        return torch.from_dlpack(a)

    def to_cupy(self, a):
        if self.lib == "cupy":
            return a
        import cupy
        return cupy.from_dlpack(a)

    def synchronize(self):
        if self.lib == "torch":
            self._torch.cuda.synchronize()
        if self._cupy is not None:
            try:
                self._cupy.cuda.Device().synchronize()
            except Exception:
                pass

    def flush(self):
        """Evict the L2 cache by writing a buffer twice its size (untimed, before a run)."""
        if self._scratch is None:
            n = 2 * (self.cache_bytes or 64 * MiB)
            if self.lib == "torch":
                self._scratch = self._torch.empty(n, dtype=self._torch.uint8, device=self._where)
            else:
                self._scratch = self._cupy.empty(n, dtype=np.uint8)
        if self.lib == "torch":
            self._scratch.zero_()
        else:
            self._scratch.fill(0)

    def event(self):
        if self.lib == "torch":
            return self._torch.cuda.Event(enable_timing=True)
        return self._cupy.cuda.Event()

    def elapsed_ms(self, start, end):
        if self.lib == "torch":
            return start.elapsed_time(end)
        return self._cupy.cuda.get_elapsed_time(start, end)

    def timer(self, **kw):
        return GpuTimer(self, **kw)

    def describe(self):
        info = {"array_library": self.lib}
        try:
            if self.lib == "torch":
                p = self._torch.cuda.get_device_properties(0)
                info.update(name=p.name, memory_bytes=int(p.total_memory),
                            compute_capability=f"{p.major}.{p.minor}",
                            multiprocessors=p.multi_processor_count,
                            cuda_runtime=self._torch.version.cuda)
            else:
                rt = self._cupy.cuda.runtime
                p = rt.getDeviceProperties(rt.getDevice())
                name = p["name"]
                info.update(name=name.decode() if isinstance(name, bytes) else name,
                            memory_bytes=int(p["totalGlobalMem"]),
                            compute_capability=f"{p['major']}.{p['minor']}",
                            multiprocessors=int(p["multiProcessorCount"]),
                            cuda_runtime=rt.runtimeGetVersion())
            info["l2_bytes"] = self.cache_bytes
            if self._cupy is not None:
                info["driver"] = self._cupy.cuda.runtime.driverGetVersion()
        except Exception as exc:  # a description must never stop a benchmark
            info["error"] = f"{type(exc).__name__}: {exc}"
        return info


def _cupy_has_device(cupy):
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def make_device(kind):
    return CpuDevice() if kind == "cpu" else CudaDevice()


def default_device():
    return "cuda" if CudaDevice.available() else "cpu"


# ---- inputs ----------------------------------------------------------------------------

@dataclass
class Case:
    """Inputs of one (dtype, N, C): ``k`` copies of the logits and targets on the device
    (rotated through while timing), and the host copy of the first one for the check."""
    dtype: str
    n: int
    c: int
    k: int
    device: object
    xs: list
    ts: list
    x_host: np.ndarray
    t_host: np.ndarray
    _ref_loss: float = field(default=None, repr=False)

    @property
    def itemsize(self):
        return ITEMSIZE[self.dtype]

    def bytes(self, op):
        return op_bytes(op, self.n, self.c, self.itemsize)

    def ref_loss(self):
        if self._ref_loss is None:
            self._ref_loss = reference_mean_loss(self.x_host, self.t_host)
        return self._ref_loss


def make_case(device, dtype, n, c, rotate_bytes, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, c), dtype=np.float32) * np.float32(2.0)).astype(numpy_dtype(dtype))
    t = rng.integers(0, c, size=n, dtype=np.int64)
    k = rotation_count(x.nbytes + t.nbytes, rotate_bytes)
    x0 = device.upload(x)
    t0 = device.upload(t)
    xs = [x0] + [device.clone(x0) for _ in range(k - 1)]
    ts = [t0] + [device.clone(t0) for _ in range(k - 1)]
    return Case(dtype, n, c, k, device, xs, ts, x, t)


# ---- timers ----------------------------------------------------------------------------

@dataclass
class Timing:
    times_ms: list

    @property
    def median(self):
        return statistics.median(self.times_ms)

    def summary(self):
        t = sorted(self.times_ms)
        q = statistics.quantiles(t, n=4, method="inclusive") if len(t) >= 2 else [t[0]] * 3
        return {"ms": self.median, "ms_min": t[0], "ms_q1": q[0], "ms_q3": q[2], "runs": len(t)}


class CpuTimer:
    """perf_counter around each call; warm-up first; the median of the runs.

    At least ``min_repeats`` runs, then more up to ``repeats`` while ``budget_s`` lasts.
    ``pre(i)`` runs untimed before each call. A call's result is dropped after the clock
    stops, so freeing it is not counted (for any implementation).
    """

    def __init__(self, warmup=2, repeats=15, min_repeats=3, budget_s=3.0):
        self.warmup, self.repeats = warmup, max(1, repeats)
        self.min_repeats, self.budget_s = max(1, min(min_repeats, self.repeats)), budget_s

    def time(self, run, pre=None, k=1):
        for i in range(self.warmup):
            if pre:
                pre(i % k)
            r = run(i % k)
            del r
        times = []
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            start = time.perf_counter()
            i = 0
            while len(times) < self.repeats:
                if len(times) >= self.min_repeats and time.perf_counter() - start > self.budget_s:
                    break
                j = i % k
                if pre:
                    pre(j)
                t0 = time.perf_counter()
                r = run(j)
                t1 = time.perf_counter()
                del r
                times.append((t1 - t0) * 1e3)
                i += 1
        finally:
            if gc_was_enabled:
                gc.enable()
        return Timing(times)


class GpuTimer(CpuTimer):
    """CUDA events recorded around each call on the current stream; the median of the runs."""

    def __init__(self, device, **kw):
        kw.setdefault("repeats", 100)
        kw.setdefault("budget_s", 1.0)
        super().__init__(**kw)
        self.device = device

    def time(self, run, pre=None, k=1):
        dev = self.device
        for i in range(self.warmup):
            if pre:
                pre(i % k)
            r = run(i % k)
            del r
        dev.synchronize()
        t0 = time.perf_counter()
        if pre:
            pre(0)
        r = run(0)
        dev.synchronize()
        del r
        est = max(time.perf_counter() - t0, 1e-6)
        count = int(min(self.repeats, max(self.min_repeats, self.budget_s // est)))
        events = [(dev.event(), dev.event()) for _ in range(count)]
        for i, (s, e) in enumerate(events):
            j = i % k
            if pre:
                pre(j)
            s.record()
            r = run(j)
            e.record()
            del r
        dev.synchronize()
        return Timing([dev.elapsed_ms(s, e) for s, e in events])


# ---- the float64 check -----------------------------------------------------------------

def _module_of(a):
    return type(a).__module__.split(".")[0]


def to_host64(a):
    """Any result array (numpy, ml_dtypes, torch, CuPy, JAX) or scalar as float64 numpy."""
    mod = _module_of(a)
    if mod == "torch":
        import torch
        a = a.detach().to("cpu")
        if a.dtype in (torch.bfloat16, torch.float16):
            a = a.float()
        return a.double().numpy()
    if mod == "cupy":
        a = a.get()
    return np.asarray(a).astype(np.float64)


def dtype_of(a):
    return str(getattr(a, "dtype", type(a).__name__)).replace("torch.", "")


def _lse64(x):
    m = np.max(x, axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return (m + np.log(np.sum(np.exp(x - m), axis=1, keepdims=True)))[:, 0]


def reference_rows(op, x_rows, t_rows, n_total):
    """The float64 reference of ``op`` on some rows (storage dtype in, float64 out)."""
    x = x_rows.astype(np.float64)
    lse = _lse64(x)
    if op == "softmax":
        return np.exp(x - lse[:, None])
    if op == "log_softmax":
        return x - lse[:, None]
    if op == "ce_fwd_bwd":  # d mean-loss / dx = (softmax - onehot) / N
        g = np.exp(x - lse[:, None])
        g[np.arange(x.shape[0]), t_rows] -= 1.0
        return g / n_total
    raise ValueError(op)


def _chunk_rows(c):
    return max(1, (1 << 21) // max(c, 1))


def reference_mean_loss(x_host, t_host):
    n = x_host.shape[0]
    total = 0.0
    step = _chunk_rows(x_host.shape[1])
    for r0 in range(0, n, step):
        x = x_host[r0:r0 + step].astype(np.float64)
        t = t_host[r0:r0 + step]
        total += float(np.sum(_lse64(x) - x[np.arange(x.shape[0]), t]))
    return total / n


def row_blocks(n, c, full, blocks=5):
    """(r0, r1) row ranges to compare: all rows in chunks, or ``blocks`` blocks spread over
    the array (first and last rows included)."""
    step = _chunk_rows(c)
    if full:
        return [(r0, min(n, r0 + step)) for r0 in range(0, n, step)]
    size = max(1, min(math.ceil(n / blocks), max(1, step // 8)))
    starts = sorted({int(s) for s in np.linspace(0, n - size, blocks)})
    out, last = [], 0
    for s in starts:
        s = max(s, last)
        if s < n:
            out.append((s, min(n, s + size)))
            last = min(n, s + size)
    return out


@dataclass
class Check:
    ok: bool
    err: float = None        # normalised max error of the array output
    loss_err: float = None   # relative error of the loss
    rows: int = 0            # rows compared
    reason: str = ""


def check_result(op, case, result, full, strict_loss):
    """Compare one result with the float64 reference; never raises for a wrong result."""
    dt = case.dtype
    try:
        loss, arr = None, None
        if op == "ce_fwd":
            loss = result
        elif op == "ce_fwd_bwd":
            loss, arr = result
        else:
            arr = result
        chk = Check(ok=True)
        if arr is not None:
            shape = tuple(getattr(arr, "shape", ()))
            if shape != (case.n, case.c):
                return Check(False, reason=f"output shape {shape}, expected {(case.n, case.c)}")
            if strict_loss and dtype_of(arr) != dt:
                return Check(False, reason=f"output dtype {dtype_of(arr)}, expected {dt}")
            num = den = 0.0
            rows = 0
            for r0, r1 in row_blocks(case.n, case.c, full):
                ref = reference_rows(op, case.x_host[r0:r1], case.t_host[r0:r1], case.n)
                got = to_host64(arr[r0:r1])
                if not np.all(np.isfinite(got)):
                    return Check(False, rows=rows, reason=f"non-finite output in rows {r0}:{r1}")
                num = max(num, float(np.max(np.abs(got - ref))))
                den = max(den, float(np.max(np.abs(ref))))
                rows += r1 - r0
            chk.err, chk.rows = num / max(den, 1e-300), rows
            if not chk.err <= OUT_TOL[dt]:
                chk.ok = False
                chk.reason = f"output error {chk.err:.3g} > {OUT_TOL[dt]:.0e}"
        if loss is not None:
            values = to_host64(loss).reshape(-1)
            if values.size != 1:
                return Check(False, reason=f"loss has {values.size} values, expected one (mean)")
            got = float(values[0])
            ref = case.ref_loss()
            chk.loss_err = abs(got - ref) / max(abs(ref), 1e-300)
            tol = (LOSS_TOL_GPUCE if strict_loss else LOSS_TOL_PEER)[dt]
            if not chk.loss_err <= tol:
                chk.ok = False
                chk.reason = (chk.reason + "; " if chk.reason else "") + \
                    f"loss {got:.7g} vs reference {ref:.7g} (error {chk.loss_err:.3g} > {tol:.0e})"
        return chk
    except Exception as exc:
        return Check(False, reason=f"could not check the result: {type(exc).__name__}: {exc}")


# ---- the machine -----------------------------------------------------------------------

_VERSION_PACKAGES = ("gpuce", "numpy", "numba", "llvmlite", "ml_dtypes", "torch", "scipy",
                     "jax", "jaxlib", "cupy", "cupy-cuda12x", "cupy-cuda13x", "liger-kernel",
                     "triton", "numba-cuda", "matplotlib")


def library_versions():
    out = {}
    for name in _VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def thread_counts():
    out = {}
    numba = _try_import("numba")
    if numba is not None:
        out["numba"] = numba.get_num_threads()
    if "torch" in sys.modules:
        out["torch"] = sys.modules["torch"].get_num_threads()
    for var in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var):
            out[var] = os.environ[var]
    out["numpy_scipy"] = 1  # numpy's elementwise ufuncs and reductions are single-threaded
    if "jax" in sys.modules:
        out["jax"] = "XLA's own pool (not set by --threads)"
    return out


def set_threads(n):
    """Use ``n`` threads in numba and torch."""
    import numba
    if n > numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"--threads {n}: numba was started with at most "
                         f"{numba.config.NUMBA_NUM_THREADS} (set NUMBA_NUM_THREADS to raise it)")
    numba.set_num_threads(n)
    torch = _try_import("torch")
    if torch is not None:
        torch.set_num_threads(n)


def machine_info(device):
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "cpu": cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_usable": usable,
        "memory_bytes": _memory_bytes(),
        "llc_bytes": last_level_cache_bytes(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": library_versions(),
        "gpu": device.describe() if device.kind == "cuda" else None,
    }
    info["load_average"] = load_average()
    return info


def load_average():
    """The 1, 5 and 15 minute load averages (a busy machine makes noisy numbers), or None."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None
