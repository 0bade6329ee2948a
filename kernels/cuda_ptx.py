"""Compile the CUDA kernels to PTX and assemble them with ptxas (through nvJitLink), with no
GPU: the resource report (registers, spills, stack, shared memory) per kernel and target.

Used by tests/test_ptx.py and benchmarks/ptx_report.py. Needs numba-cuda with NVVM
(``numba-cuda[cu13]``) and ``cuda.bindings.nvjitlink``; must run without the simulator.
"""
import re
from contextlib import contextmanager
from types import SimpleNamespace

from numba import cuda

from . import cuda_registry

TARGETS = ((8, 0), (9, 0))


def compile_ptx(name, key, ccs=TARGETS):
    """{cc: ptx text} of one kernel. Types and lowers once, then runs NVVM per target."""
    fn, sig, bound = cuda_registry.spec(name, key)
    with _device_functions_for(min(ccs)):
        return _compile(fn, sig, bound, ccs)


@contextmanager
def _device_functions_for(cc):
    """Device functions (NVVM-inlined, not Numba-inlined) are compiled for the current
    device's compute capability, which needs a driver; with no GPU, name the target here. It
    only selects sm<60 atomics and the sm>=75 fast tanh, the same for every target above."""
    from numba.cuda import dispatcher
    current = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)
    try:
        yield
    finally:
        dispatcher.get_current_device = current


def _compile(fn, sig, bound, ccs):
    try:
        from numba.cuda import compiler
        lib, _ = compiler._compile_pyfunc_with_fixup(
            fn, sig, debug=None, lineinfo=False, device=False, fastmath=False, cc=min(ccs),
            opt=None, abi="numba", abi_info=None, forceinline=False, launch_bounds=bound,
            lto=False)
        out = {}
        for cc in ccs:
            (out[cc],) = lib.get_asm_strs(cc=cc)
        return out
    except (AttributeError, TypeError):  # that private helper moved: compile per target
        return {cc: cuda.compile_ptx(fn, sig, cc=cc, launch_bounds=bound)[0] for cc in ccs}


def ptxas(ptx, cc):
    """Assemble PTX for sm_XY with nvJitLink; returns (info log, resources dict)."""
    from cuda.bindings import nvjitlink
    arch = f"sm_{cc[0]}{cc[1]}"
    handle = nvjitlink.create(2, [f"-arch={arch}", "-verbose"])
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "gpuce")
        try:
            nvjitlink.complete(handle)
        except nvjitlink.nvJitLinkError as exc:
            size = nvjitlink.get_error_log_size(handle)
            buf = bytearray(size)
            nvjitlink.get_error_log(handle, buf)
            raise RuntimeError(f"ptxas ({arch}) failed: {bytes(buf).decode(errors='replace')}") from exc
        size = nvjitlink.get_info_log_size(handle)
        buf = bytearray(size)
        nvjitlink.get_info_log(handle, buf)
    finally:
        nvjitlink.destroy(handle)
    log = bytes(buf).rstrip(b"\0").decode(errors="replace")
    return log, parse_resources(log)


def parse_resources(log):
    """registers, spill stores/loads, stack frame and shared memory bytes from ptxas -v."""
    def grab(pattern):
        m = re.search(pattern, log)
        if m is None:
            raise ValueError(f"no match for {pattern!r} in the ptxas log:\n{log}")
        return int(m.group(1))
    res = {
        "registers": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "stack": grab(r"(\d+) bytes stack frame"),
    }
    m = re.search(r"(\d+) bytes smem", log)
    res["smem"] = int(m.group(1)) if m else 0
    return res


def key_label(key, name=""):
    if key is None:
        return "-"
    if isinstance(key, tuple):  # convert: source->destination; cross entropy: logits,q=dtype
        return "->".join(key) if name == "convert" else f"{key[0]},q={key[1]}"
    return key


_LABEL = re.compile(r"^\s*(\$L__\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")


def ptx_loops(ptx):
    """The innermost loops of PTX text (a label and a later branch back to it with no other
    loop inside) as lists of instructions: the static code of each loop body, every path
    included (a bound for the instructions a trip issues)."""
    lines = [ln.split("//")[0].strip() for ln in ptx.splitlines()]
    where = {}
    loops = []
    for i, ln in enumerate(lines):
        m = _LABEL.match(ln)
        if m:
            where[m.group(1)] = i
            continue
        b = _BRANCH.search(ln)
        if b and b.group(1) in where and where[b.group(1)] < i:
            loops.append((where[b.group(1)], i))
    inner = [(a, b) for a, b in loops
             if not any(a < c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return [[ln for ln in lines[a + 1:b + 1] if ln.endswith(";") and not ln.startswith(".")]
            for a, b in inner]


def streaming_loops(ptx):
    """[(instructions, 128-bit loads, 128-bit stores, scalar global loads, scalar global
    stores)] of each innermost loop that touches global memory."""
    out = []
    for body in ptx_loops(ptx):
        v4_ld = sum(1 for ln in body if re.match(r"ld\.global(\.nc)?\.v4\.", ln))
        v4_st = sum(1 for ln in body if re.match(r"st\.global\.v4\.", ln))
        ld = sum(1 for ln in body if re.match(r"ld\.global\.", ln)) - v4_ld
        st = sum(1 for ln in body if re.match(r"st\.global\.", ln)) - v4_st
        if v4_ld or v4_st or ld or st:
            out.append((len(body), v4_ld, v4_st, ld, st))
    return out
