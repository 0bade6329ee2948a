"""On-disk cache for the factory-built CPU kernels.

numba's own ``cache=True`` keys an entry on the pickled closure cells, and for kernels
built by a factory those hold per-process uuids (dispatchers, intrinsics) and sets pickled
in hash-seed order, so a new process never hits (numba issue #6264). Here the key is
instead (signature, target, a hash of every kernel source file plus the numba and llvmlite
versions, the variant's own description), and each variant gets its own index and data
files, named by a hash of that description.

Where it lives: numba's locators, in order -- ``NUMBA_CACHE_DIR`` when set, else
``__pycache__`` beside the kernels when writable, else the per-user cache directory.

Symbol names: numba names a compiled function by its qualified name and a per-process
counter, so two factory-built closures of one name (``store`` for bf16 and for fp32, the
short-row kernel for C = 10 and C = 20) compiled by two different processes can carry the
same symbol. Loaded side by side from the cache, the JIT bound calls of the one to the
other's code: wrong rows and heap corruption (a C = 20 row loop run on C = 10 rows). The
counter therefore starts at a random 40-bit offset in each process (``_distinct_uids``).

Two processes filling the cache at once: an index update takes a file lock, and a data
file's name is derived from its key, so an entry can never point at another entry's code
(the worst a race can do without locks is lose an index entry, i.e. a later recompile).
"""
import contextlib
import hashlib
import itertools
import os
import secrets
from functools import lru_cache

import llvmlite
import numba
from numba.core import bytecode, caching

_SOURCES = ("cpu.py", "cpu_math.py", "cpu_cache.py", "cpu_tasks.py", "cpu_small.py")
ENABLED = os.environ.get("GPUCE_DISK_CACHE", "1") != "0"


def _distinct_uids():
    """Start numba's function counter (part of every symbol name) at a random offset in
    this process, once, so code loaded from the cache never shares a symbol with code of
    another process (see the module docstring)."""
    ids = bytecode.FunctionIdentity
    if not getattr(ids, "_gpuce_distinct", False):
        ids._unique_ids = itertools.count(secrets.randbits(40) << 16)
        ids._gpuce_distinct = True


_distinct_uids()


@lru_cache(maxsize=None)
def sources_hash():
    """sha256 over the kernel sources and the compiler versions: any change recompiles."""
    h = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in _SOURCES:
        with open(os.path.join(here, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    h.update(f"numba={numba.__version__} llvmlite={llvmlite.__version__}".encode())
    return h.hexdigest()


class _LockedIndexFile(caching.IndexDataCacheFile):
    """numba's index/data files, with data names derived from the key and a lock around
    the read-modify-write of the index."""

    def save(self, key, data):
        with self._locked():
            overloads = self._load_index()
            data_name = self._data_name_pattern.format(
                number=int(hashlib.sha256(repr(key).encode()).hexdigest()[:12], 16))
            self._save_data(data_name, data)  # written (atomically) before the index names it
            overloads[key] = data_name
            self._save_index(overloads)

    @contextlib.contextmanager
    def _locked(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover  (Windows: numba's unlocked protocol)
            yield
            return
        os.makedirs(self._cache_path, exist_ok=True)
        with open(self._index_path + ".lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


class VariantCache(caching.FunctionCache):
    """A FunctionCache whose key is the variant and the kernel sources, not the closure."""

    def __init__(self, py_func, variant):
        self._variant = variant
        self._variant_hash = hashlib.sha256(variant.encode()).hexdigest()[:16]
        super().__init__(py_func)
        # one index (and set of data files) per variant; see the module docstring
        self._cache_file = _LockedIndexFile(
            cache_path=self._cache_path,
            filename_base=f"{self._impl.filename_base}-{self._variant_hash}",
            source_stamp=self._cache_file._source_stamp)

    def _index_key(self, sig, codegen):
        return (sig, codegen.magic_tuple(), (sources_hash(), self._variant))


def attach(dispatcher, variant, cache_class=VariantCache):
    """Give ``dispatcher`` the on-disk cache for ``variant`` (a string naming everything
    the factory built it from); without a usable cache location it stays uncached."""
    if not ENABLED:
        return dispatcher
    try:
        dispatcher._cache = cache_class(dispatcher.py_func, variant)
    except RuntimeError:  # numba found no writable location
        pass
    return dispatcher


def cached(decorator, variant):
    """``decorator`` (e.g. ``njit``), with the disk cache for ``variant`` plus the kernel's
    name attached to each function it builds."""
    def build(fn):
        return attach(decorator(fn), f"{variant}|{fn.__qualname__}")
    return build



def cache_location():
    """The directory the CPU kernels are cached in (None: no usable location)."""
    from . import cpu
    return getattr(cpu.hard_target_stats._cache, "cache_path", None)
