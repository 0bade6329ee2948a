"""Serial and parallel CPU builds that run one compiled copy of the kernel code.

Why: numba links a parallel kernel's loop body into the caller as a ``linkonce_odr`` copy
and optimises that copy again with the caller. In the compiling process the JIT binds the
body to the first copy (optimised once); the object saved to the disk cache holds the
re-optimised copy. Under fast-math ``reassoc`` the re-optimisation restructures the
vectorised row sums, so a cache-loaded parallel build gave rows differing in the last bit
from the same build compiled in-process and from the serial build.

So the kernel code lives in one serial ``tasks`` function (its own library, cached like
any serial build) that runs tasks ``t0..t1``. Both builds are thin drivers that call it
through an external symbol, which LLVM can neither inline nor re-optimise: the serial
driver runs every task in one call, the parallel one one task per prange step. The symbol
is named from the variant and the argument types (the same in every process) and bound,
in each process, to the ``tasks`` overload for those types, before a driver is compiled
or loaded from disk. Rows are therefore computed by the same machine code whatever the
build, the thread count or the cache state.
"""
import hashlib
import inspect

import llvmlite.binding as ll
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .cpu_cache import VariantCache, attach

_PREFIX = "gpuce_task_"
_TASK_INDEX = (types.int64, types.int64)  # the (t0, t1) the drivers append
_bound = {}  # symbol -> address of the tasks overload it names, in this process


def bind(tasks, name, argtys):
    """The symbol for ``tasks`` over ``argtys``, bound to its compiled code (compiled or
    loaded from the disk cache on first use)."""
    argtys = tuple(types.unliteral(t) for t in argtys)
    symbol = _PREFIX + hashlib.sha256(f"{name}|{argtys}".encode()).hexdigest()[:32]
    if symbol not in _bound:
        tasks.compile(argtys)
        cres = tasks.overloads[argtys]
        address = cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name)
        ll.add_symbol(symbol, address)
        _bound[symbol] = address
    return symbol


def _caller(tasks, name, propagate=True):
    """``call(args)``: ``tasks(*args)`` through its symbol. It raises what the task raised;
    with ``propagate=False`` it returns whether the task succeeded instead (numba drops
    exceptions raised inside a prange body)."""
    @intrinsic
    def call(typingctx, args):
        argtys = tuple(types.unliteral(t) for t in args.types)
        symbol = bind(tasks, name, argtys)

        def codegen(context, builder, signature, llargs):
            values = cgutils.unpack_tuple(builder, llargs[0], len(argtys))
            fnty = context.call_conv.get_function_type(types.none, argtys)
            fn = cgutils.get_or_insert_function(builder.module, fnty, symbol)
            status, _ = context.call_conv.call_function(builder, fn, types.none, argtys, values)
            if not propagate:
                return status.is_ok
            with cgutils.if_unlikely(builder, status.is_error):
                context.call_conv.return_status_propagate(builder, status)
            return context.get_dummy_value()
        return (types.none if propagate else types.boolean)(args), codegen
    return call


class DriverCache(VariantCache):
    """A driver's disk cache: binds the symbol its code calls before loading it, and
    loads nothing whose symbols are unbound (an unresolved symbol would abort the JIT).
    ``task_argtys(sig)`` gives the tasks' argument types from the cached function's (default:
    a driver's, ``sig`` plus the task index); for callers of a driver whose own arguments
    differ from the tasks'."""

    def __init__(self, py_func, variant, tasks, name, task_argtys=None):
        self._task_fn, self._task_name = tasks, name  # (numba uses self._name)
        self._task_argtys = task_argtys or (lambda sig: tuple(sig) + _TASK_INDEX)
        super().__init__(py_func, variant)

    def _load_overload(self, sig, target_context):
        if not self._enabled:
            return None
        data = self._cache_file.load(self._index_key(sig, target_context.codegen()))
        if data is None:
            return None
        bind(self._task_fn, self._task_name, self._task_argtys(sig))
        if any(ll.address_of_symbol(s) is None for s in _called_symbols(data)):
            return None  # compile instead
        return self._impl.rebuild(target_context, data)


def _called_symbols(data):
    """The task symbols a cached driver's code declares."""
    _, kind, payload = data[0]  # the library: (name, 'object', (object code, bitcode))
    if kind != "object":
        return ["?"]  # not numba's usual form: never trust it
    module = ll.parse_bitcode(payload[1])
    return [f.name for f in module.functions if f.is_declaration and f.name.startswith(_PREFIX)]


# The drivers, for n arguments a0..a(n-1) (the last is the task count). Written out per
# arity rather than as *args, which costs numba's dispatcher a tuple per call. A task that
# failed in a worker is run again here, so that its exception reaches the caller.
_DRIVERS = """
def serial({args}):
    call(({args}, np.int64(0), np.int64({last})))

def parallel({args}):
    ok = np.ones({last}, np.bool_)
    for t in prange({last}):
        ok[t] = succeeded(({args}, np.int64(t), np.int64(t) + np.int64(1)))
    for t in range({last}):
        if not ok[t]:
            call(({args}, np.int64(t), np.int64(t) + np.int64(1)))
            raise RuntimeError("a kernel task failed in a worker thread")
"""


def drivers(tasks, variant):
    """(serial driver, parallel driver) of ``tasks(*args, t0, t1)``: each takes ``args``,
    whose last element is the task count. ``variant`` names everything ``tasks`` was built
    from (it names the symbol). Both drivers are cached on disk."""
    n_args = len(inspect.signature(tasks.py_func).parameters) - len(_TASK_INDEX)
    names = [f"a{i}" for i in range(n_args)]
    scope = {"call": _caller(tasks, variant), "succeeded": _caller(tasks, variant, False),
             "np": np, "prange": prange, "__name__": __name__}
    source = _DRIVERS.format(args=", ".join(names), last=names[-1])
    exec(compile(source, __file__, "exec"), scope)  # (this file: numba's cache locates by it)
    built = []
    for name, par in (("serial", False), ("parallel", True)):
        d = njit(parallel=par)(scope[name])
        built.append(attach(d, f"{variant}|driver parallel={par}",
                            lambda py_func, v: DriverCache(py_func, v, tasks, variant)))
    return tuple(built)
