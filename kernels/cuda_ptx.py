"""Compile the CUDA kernels to PTX and assemble them with ptxas (through nvJitLink), with no
GPU: the resource report (registers, spills, stack, shared memory) per kernel and target.

Used by tests/test_ptx.py and benchmarks/ptx_report.py. Needs numba-cuda with NVVM
(``numba-cuda[cu13]``) and ``cuda.bindings.nvjitlink``; must run without the simulator.
"""
import re

from numba import cuda

from . import cuda_registry

TARGETS = ((8, 0), (9, 0))


def compile_ptx(name, key, ccs=TARGETS):
    """{cc: ptx text} of one kernel. Types and lowers once, then runs NVVM per target."""
    fn, sig, bound = cuda_registry.spec(name, key)
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
