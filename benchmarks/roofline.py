"""Static roofline: a MODEL of gpuce's CUDA kernels on an H100 (or H200), read from the
compiled code. Nothing here runs on a GPU and nothing here is a measurement.

For each op x dtype x bench shape it takes gpuce's own launch plan (gpuce/_cuda_plan.py),
compiles the planned kernels (gpuce.kernels.cuda_ptx.compile_ptx, sm_90), assembles them with
nvJitLink (-arch=sm_90 -verbose: registers, spills, shared memory), disassembles the cubin with
nvdisasm (pip wheel nvidia-cuda-nvdisasm) and reads the SASS:

- control flow: basic blocks, branches resolved where they test only kernel arguments whose
  value the case fixes (softcap off, hard targets, ...: a small constant propagation over
  c[0x0][...] parameter loads), loops from back edges, innermost loops = streaming loops;
- per streaming loop: the longest path through one trip (instructions), the elements it
  covers per thread (global/shared bytes over the element size), the global load/store
  widths, and the bytes of global loads one trip issues (all assumed independent);
- per kernel: the longest path over the row loop with each streaming loop weighted per
  element and the rest of the row body spread over the row's elements (the costliest path
  consistent with the case's arguments, so the model errs low);

then the three ceilings, as a share of copy bandwidth (GUIDE section 5):

  passes          useful bytes / DRAM bytes  (2 / passes for loss + gradient)
  bytes in flight min(1, bytes in flight per SM / (BW / SMs x latency))   (Little's law)
  issue rate      useful bytes / (instructions per element x N x C / issue rate) / copy BW

and their minimum, the model ceiling. Predicted time = useful bytes / (ceiling x copy BW).

    python benchmarks/roofline.py                          # fp32 + bf16, every op and shape
    python benchmarks/roofline.py --device h200 --dtypes float32 bfloat16 float16
    python benchmarks/roofline.py --json out.json --markdown benchmarks/results/roofline_h100.md
    python benchmarks/roofline.py --quick                  # a small subset (tests, smoke)
"""
import argparse
import collections
import dataclasses
import datetime
import functools
import inspect
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time

# ---- assumptions (also in benchmarks/README.md, "Static roofline") ---------------------------

LOADED_LATENCY_S = 700e-9     # DRAM latency under load (Little's law)
LANES_PER_SM = 128            # FP32/INT lanes per SM: thread-instructions issued per clock
SM_CLOCK_HZ = 1.98e9          # H100 SXM boost clock
PARAM_BASE = 0x210            # sm_90: kernel parameters start at c[0x0][0x210]
SMEM_RESERVED_PER_BLOCK = 1024   # sm_80+: the driver reserves 1 KiB of shared memory per block
REG_ALLOC_UNIT = 256          # registers are allocated per warp in units of 256
MAX_BLOCKS_PER_SM = 32
MAX_WARPS_PER_SM = 64
REGS_PER_SM = 65536
THREADS_PER_WARP = 32


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    bandwidth: float          # bytes/s: the copy bandwidth the ceilings are shares of
    sms: int
    shared_per_sm: int = 228 * 1024
    latency_s: float = LOADED_LATENCY_S
    clock_hz: float = SM_CLOCK_HZ
    lanes_per_sm: int = LANES_PER_SM

    @property
    def issue_rate(self):
        """thread-instructions per second over the whole device"""
        return self.sms * self.lanes_per_sm * self.clock_hz

    @property
    def bytes_needed_per_sm(self):
        """bytes one SM must keep in flight to sustain the bandwidth (Little's law)"""
        return self.bandwidth / self.sms * self.latency_s


DEVICES = {
    "h100": Device("H100 SXM (3.35 TB/s, 132 SMs)", 3.35e12, 132),
    "h200": Device("H200 SXM (4.8 TB/s, 132 SMs)", 4.8e12, 132),
}

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
ACC_BYTES = {"float16": 4, "bfloat16": 4, "float32": 4, "float64": 8}
SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}
TARGET_BYTES = 8              # int64 class indices, one per row
SOFTCAP = 30.0

N_ROWS = 16384
CLASSES = (32, 128, 512, 1000, 8192, 32000, 50257, 128256)
SHAPES = tuple((N_ROWS, c) for c in CLASSES) + ((64, 128256),)

# op -> (kernel family, kernel arguments fixed by the case, row outputs written)
OPS = {
    "ce": ("ce", dict(ignore_index=-100, soft=0, weighted=0, write_grad=1, go_mode=0, use_st=1,
                      eps=0.0, zl=0.0, cap=0.0, go_scalar=1.0, inv_ce=1.0, inv_z=1.0), 1),
    "ce_softcap": ("ce", dict(ignore_index=-100, soft=0, weighted=0, write_grad=1, go_mode=0,
                              use_st=1, eps=0.0, zl=0.0, cap=SOFTCAP, go_scalar=1.0, inv_ce=1.0,
                              inv_z=1.0), 1),
    "softmax": ("softmax", dict(mode=0), 1),
    "log_softmax": ("softmax", dict(mode=1), 1),
    "logsumexp": ("softmax", dict(mode=2), 0),
}
OP_TITLES = {"ce": "cross entropy, loss + gradient (hard targets, mean)",
             "ce_softcap": f"cross entropy with softcap={SOFTCAP:g}, loss + gradient",
             "softmax": "softmax", "log_softmax": "log_softmax", "logsumexp": "logsumexp"}


def threshold(op, n_cls):
    """The issue's acceptance threshold for the model ceiling (None: no target stated)."""
    if n_cls >= 128256:
        base = 0.60
    elif 1000 <= n_cls <= 50257:
        base = 0.85
    elif n_cls in (32, 128):
        base = 0.75
    else:
        base = None
    if op == "ce_softcap":
        return 0.60 if n_cls >= 128256 else 0.70
    return base


# ---- SASS parsing ------------------------------------------------------------------------------

_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:(@!?U?P[0-6T])\s+)?"
                    r"([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_FUNC = re.compile(r"^\s*\.text\.([^:\s]+):\s*$")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


@dataclasses.dataclass
class Instr:
    addr: int
    guard: object     # None, or (negated, predicate name)
    op: str
    args: list
    text: str

    @property
    def base(self):
        return self.op.split(".")[0]


def _split_args(s):
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "[(" :
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def parse_sass(text):
    """{function name: (instructions, {label: address})} from nvdisasm output."""
    funcs, cur = {}, None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            cur = funcs.setdefault(m.group(1), ([], {}))
            continue
        if cur is None:
            continue
        m = _LABEL.match(line.strip())
        if m:
            cur[1][m.group(1)] = None  # bound to the next instruction's address
            continue
        m = _INSTR.match(line)
        if m:
            addr = int(m.group(1), 16)
            for lab, a in cur[1].items():
                if a is None:
                    cur[1][lab] = addr
            guard = None
            if m.group(2):
                g = m.group(2)[1:]
                guard = (g.startswith("!"), g.lstrip("!"))
            cur[0].append(Instr(addr, guard, m.group(3), _split_args(m.group(4)), line.strip()))
    return funcs


def mem_width(ins):
    """Bytes per thread of a global/shared load or store (0 if ins is none)."""
    if ins.base not in ("LDG", "STG", "LDS", "STS", "LD", "ST"):
        return 0
    parts = ins.op.split(".")
    for tag, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if tag in parts:
            return size
    return 4


def mem_kind(ins):
    """'ld.global' / 'st.global' / 'ld.shared' / 'st.shared' or None."""
    return {"LDG": "ld.global", "STG": "st.global", "LDS": "ld.shared",
            "STS": "st.shared"}.get(ins.base)


def sass_width_label(ins):
    """e.g. LDG.E.128, LDG.E.U16.CONSTANT, STG.E (without the cache hints)."""
    keep = [p for p in ins.op.split(".") if p in ("E", "128", "64", "U16", "S16", "U8", "S8",
                                                  "CONSTANT")]
    return ".".join([ins.base] + keep)


_PTX_MEM = re.compile(r"\b(ld|st)\.global((?:\.[a-z0-9]+)*)")


def ptx_widths(ptx):
    """Counter of global access forms in PTX, e.g. {'ld.global.nc.v4.u32': 2}."""
    c = collections.Counter()
    for m in _PTX_MEM.finditer(ptx):
        mods = [p for p in m.group(2).split(".") if p and not p.startswith(("L1", "L2", "cs",
                                                                           "ca", "cg", "lu",
                                                                           "cv", "wb", "wt"))]
        c[".".join([m.group(1), "global"] + mods)] += 1
    return c


# ---- control flow ----------------------------------------------------------------------------

class Block:
    def __init__(self, idx, instrs):
        self.idx = idx
        self.instrs = instrs
        self.addr = instrs[0].addr
        self.end = instrs[-1].addr
        self.succ = []    # [(block index, condition)] condition: None or (negated, pred) pairs

    def __repr__(self):
        return f"Block({self.idx}, {self.addr:#x}..{self.end:#x})"


def _is_branch(ins):
    return ins.base in ("BRA", "EXIT", "RET", "JMP", "BRX", "JMX", "KILL") and ins.op != "BRA.DIV"


def build_blocks(instrs, labels):
    """Basic blocks (in address order) with successor edges; BRA.DIV (the slow path taken only
    when a warp has diverged before a shuffle) is treated as never taken."""
    by_addr = {ins.addr: i for i, ins in enumerate(instrs)}
    leaders = {0}
    targets = {}
    for i, ins in enumerate(instrs):
        if ins.base == "BRA" and ins.op != "BRA.DIV":
            m = _TARGET.search(" ".join(ins.args))
            if m:
                t = by_addr.get(labels.get(m.group(1)))
                if t is not None:
                    targets[i] = t
                    leaders.add(t)
        if _is_branch(ins) and i + 1 < len(instrs):
            leaders.add(i + 1)
    starts = sorted(leaders)
    blocks, where = [], {}
    for k, s in enumerate(starts):
        e = starts[k + 1] if k + 1 < len(starts) else len(instrs)
        blocks.append(Block(k, instrs[s:e]))
        where[s] = k
    for k, b in enumerate(blocks):
        last = b.instrs[-1]
        li = by_addr[last.addr]
        fall = k + 1 if k + 1 < len(blocks) else None
        conds = []
        if last.guard:
            conds.append(last.guard)
        if last.base == "BRA" and last.op != "BRA.DIV":
            for a in last.args:  # "BRA !P2, `(...)": a second predicate
                a = a.strip()
                if re.fullmatch(r"!?U?P[0-6T]", a):
                    conds.append((a.startswith("!"), a.lstrip("!")))
            if li in targets:
                b.succ.append((where[targets[li]], tuple(conds)))
            if conds and fall is not None:
                b.succ.append((fall, ("not",) + tuple(conds)))
        elif last.base in ("EXIT", "RET", "KILL", "JMP", "BRX", "JMX"):
            if conds and fall is not None:
                b.succ.append((fall, ("not",) + tuple(conds)))
        elif fall is not None:
            b.succ.append((fall, ()))
    return blocks


# ---- constant propagation over kernel parameters ---------------------------------------------

_REG = re.compile(r"^(-?)(\|?)(U?R(?:\d+|Z))(\.[A-Z0-9]+)?(\|?)$")
_CONST = re.compile(r"^(-?)c\[0x0\]\[(0x[0-9a-f]+)\]$")
_PRED = re.compile(r"^(!?)(U?P(?:[0-6]|T))$")


def _dest_regs(ins):
    """32-bit registers an instruction writes from its first destination."""
    parts = ins.op.split(".")
    if ins.base in ("LDG", "LDS", "LDC", "ULDC", "LD", "LDL", "ATOM", "ATOMG", "ATOMS",
                    "LDSM"):
        return 4 if "128" in parts else 2 if "64" in parts else 1
    if "WIDE" in parts or ins.base in ("CS2R", "DADD", "DMUL", "DFMA", "DMNMX", "DMUL"):
        return 2
    if ins.base == "F2I":
        return 2 if ("U64" in parts or "S64" in parts) else 1
    if ins.base in ("I2F", "F2F"):
        floats = [p for p in parts if p in ("F16", "F32", "F64")]
        return 2 if floats and floats[0] == "F64" else 1
    return 1


def _u32(v):
    return v & 0xFFFFFFFF


def _f32(bits):
    return struct.unpack("<f", struct.pack("<I", _u32(bits)))[0]


def _i32(bits):
    bits = _u32(bits)
    return bits - (1 << 32) if bits & 0x80000000 else bits


FULL = 0xFFFFFFFF


def _meet(a, b):
    """Join of two known-bits register values (None: nothing known)."""
    if a is None or b is None:
        return None
    if isinstance(a, bool) or isinstance(b, bool):
        return a if a == b else None
    mask = a[1] & b[1] & ~(a[0] ^ b[0]) & FULL
    return (a[0] & mask, mask) if mask else None


def _full(v):
    """The 32-bit value of a fully known register value, else None."""
    if v is None or isinstance(v, bool) or v[1] != FULL:
        return None
    return v[0]


class ConstProp:
    """What is known about registers and predicates when only the kernel parameters in
    ``words`` ({byte offset in c[0x0]: 32-bit word}) are known.

    Registers hold (value, mask of known bits): flags are often packed bit by bit into one
    register (LOP3 clear, predicated LOP3 set) and read back with LOP3 into a predicate.
    Evaluated: parameter loads, moves, SEL, LOP3, PLOP3, P2R/R2P and the comparisons
    ISETP/FSETP (with .EX chains for 64-bit); anything else makes what it writes unknown.
    A call makes what the callee writes unknown (``clobbers``)."""

    def __init__(self, words, clobbers=None, specials=None):
        self.words = words
        self.clobbers = clobbers or {}
        self.specials = specials or {}   # e.g. {"SR_TID.X": 96}: model one thread

    # -- operands --
    def operand(self, env, a):
        """(value, known mask) for a register/immediate/constant, a bool for a predicate,
        None if unknown."""
        a = a.strip().replace(".reuse", "")
        if a in ("RZ", "URZ"):
            return (0, FULL)
        if a == "PT":
            return True
        m = _CONST.match(a)
        if m:
            v = self.words.get(int(m.group(2), 16))
            if v is None:
                return None
            return (_u32(-v) if m.group(1) else v, FULL)
        m = _REG.match(a)
        if m:
            if m.group(2) or m.group(4):
                return None
            v = env.get(m.group(3))
            if v is None:
                return None
            if m.group(1):
                f = _full(v)
                return None if f is None else (_u32(-f), FULL)
            return v
        m = _PRED.match(a)
        if m:
            v = True if m.group(2) == "PT" else env.get(m.group(2))
            return None if v is None else (not v if m.group(1) else v)
        try:
            if a.startswith(("0x", "-0x")):
                return (_u32(int(a, 16)), FULL)
            if re.fullmatch(r"-?\d+", a):
                return (_u32(int(a)), FULL)
        except ValueError:
            return None
        return None

    def value(self, env, a):
        return _full(self.operand(env, a))

    def guard_value(self, env, guard):
        neg, p = guard
        v = True if p == "PT" else env.get(p)
        return None if v is None else (not v if neg else v)

    @staticmethod
    def _dests(ins):
        """registers and predicates the instruction writes (over-approximated)."""
        if ins.base in ("STG", "STS", "ST", "STL", "RED", "BAR", "BRA", "EXIT", "RET", "BSSY",
                        "BSYNC", "NOP", "WARPSYNC", "MEMBAR", "ERRBAR", "CCTL", "DEPBAR",
                        "CALL", "YIELD", "ENDCOLLECTIVE", "BPT", "FENCE"):
            return []
        args = [x.replace(".reuse", "") for x in ins.args]
        if not args:
            return []
        if ins.base.endswith("SETP") or ins.base in ("PLOP3", "UPLOP3"):
            return [x for x in args[:2] if _PRED.match(x) and x != "PT"]
        if ins.base == "R2P":
            return ["*P"]
        out = []
        if _PRED.match(args[0]):  # LOP3.LUT P0, R2, ... / FCHK P0, ...
            out.append(args[0].lstrip("!"))
            args = args[1:]
            if not args:
                return out
        m = _REG.match(args[0])
        if m:
            r = m.group(3)
            if r not in ("RZ", "URZ"):
                out.append(r)
                n = int(r.lstrip("UR"))
                pre = "UR" if r.startswith("UR") else "R"
                out += [f"{pre}{n + k}" for k in range(1, _dest_regs(ins))]
        for x in args[1:]:
            if _PRED.match(x):
                out.append(x.lstrip("!"))
            else:
                break
        return [d for d in out if d != "PT"]

    def step(self, env, ins):
        g = None if ins.guard is None else self.guard_value(env, ins.guard)
        if g is False:
            return
        if ins.base == "CALL":
            m = re.search(r"`\((\S+?)\)", " ".join(ins.args))
            written = self.clobbers.get(m.group(1)) if m else None
            for k in list(env):
                if (k in written or (k.startswith("P") and "*P" in written)
                        if written is not None else not k.startswith("UR")):
                    del env[k]
            return
        dests = self._dests(ins)
        try:
            new = self._eval(env, ins) or {}
        except (ValueError, AttributeError, IndexError, TypeError):
            new = {}
        old = {d: env.get(d) for d in dests if d != "*P"}
        if "*P" in dests:
            for k in [k for k in env if k.startswith("P")]:
                old[k] = env[k]
        for d in list(old) + [k for k in new if k not in old]:
            v = new.get(d)
            if g is None and ins.guard is not None:  # may or may not run: keep what agrees
                v = _meet(v, old.get(d))
            if v is None:
                env.pop(d, None)
            else:
                env[d] = v

    def _eval(self, env, ins):
        b, a = ins.base, [x.replace(".reuse", "") for x in ins.args]
        if b == "S2R" and len(a) == 2 and a[1] in self.specials:
            r = _REG.match(a[0])
            return {r.group(3): (self.specials[a[1]], FULL)} if r else None
        if b in ("LDC", "ULDC") and len(a) == 2:
            m, r = _CONST.match(a[1]), _REG.match(a[0])
            if not (m and r):
                return None
            off, reg = int(m.group(2), 16), r.group(3)
            n = int(reg.lstrip("UR"))
            pre = "UR" if reg.startswith("UR") else "R"
            out = {}
            for k in range(2 if ".64" in ins.op else 1):
                v = self.words.get(off + 4 * k)
                if v is not None:
                    out[f"{pre}{n + k}"] = (v, FULL)
            return out
        r = _REG.match(a[0]) if a else None
        dest = r.group(3) if r and r.group(3) not in ("RZ", "URZ") else None
        if b in ("MOV", "UMOV") and len(a) >= 2 and dest:
            v = self.operand(env, a[1])
            return None if v is None or isinstance(v, bool) else {dest: v}
        if ins.op in ("IMAD.MOV.U32", "IMAD.MOV", "IMAD.U32") and len(a) == 4 and dest:
            if a[1] == "RZ" and a[2] == "RZ":
                v = self.operand(env, a[3])
                return None if v is None or isinstance(v, bool) else {dest: v}
            return None
        if b in ("ISETP", "UISETP", "FSETP"):
            return self._setp(env, ins, a)
        if b in ("SEL", "FSEL", "USEL") and len(a) == 4 and dest:
            p = self.operand(env, a[3])
            if not isinstance(p, bool):
                x, y = self.operand(env, a[1]), self.operand(env, a[2])
                v = _meet(x, y)
            else:
                v = self.operand(env, a[1] if p else a[2])
            return None if v is None or isinstance(v, bool) else {dest: v}
        if b == "P2R" and len(a) == 4 and a[1] == "PR" and dest:
            base, mask = self.operand(env, a[2]), self.value(env, a[3])
            if mask is None:
                return None
            bv, bm = base if base and not isinstance(base, bool) else (0, 0)
            val, known = bv & ~mask, bm & ~mask
            for i in range(7):
                if mask >> i & 1 and isinstance(env.get(f"P{i}"), bool):
                    val |= int(env[f"P{i}"]) << i
                    known |= 1 << i
            return {dest: (val & known & FULL, known & FULL)} if known else None
        if b == "R2P" and len(a) == 3 and a[0] == "PR":
            v, mask = self.operand(env, a[1]), self.value(env, a[2])
            if v is None or isinstance(v, bool) or mask is None:
                return None
            return {f"P{i}": bool(v[0] >> i & 1) for i in range(7)
                    if mask >> i & 1 and v[1] >> i & 1}
        if b in ("LOP3", "ULOP3") and ins.op.endswith("LUT"):
            return self._lop3(env, a)
        if b in ("PLOP3", "UPLOP3") and len(a) >= 6:
            x, y, z = (self.operand(env, t) for t in a[2:5])
            lut = self.value(env, a[5])
            if not all(isinstance(t, bool) for t in (x, y, z)) or lut is None:
                return None
            res = bool(lut >> (int(x) << 2 | int(y) << 1 | int(z)) & 1)
            return {a[0]: res} if _PRED.match(a[0]) and a[0] != "PT" else None
        return None

    def _lop3(self, env, a):
        """LOP3.LUT [Pd,] Rd, a, b, c, lut, Pc: a bitwise 3-input table, bit by bit over the
        known bits; Pd = (result != 0) when that is decided."""
        pred = None
        if _PRED.match(a[0]):
            pred, a = a[0], a[1:]
        if len(a) < 5:
            return None
        ins3 = [self.operand(env, t) for t in a[1:4]]
        lut = self.value(env, a[4])
        if lut is None or any(isinstance(t, bool) for t in ins3):
            return None
        ins3 = [(0, 0) if t is None else t for t in ins3]
        val = known = 0
        for i in range(32):
            choices = [[(t[0] >> i & 1)] if t[1] >> i & 1 else [0, 1] for t in ins3]
            outs = {lut >> (x << 2 | y << 1 | z) & 1 for x in choices[0] for y in choices[1]
                    for z in choices[2]}
            if len(outs) == 1:
                known |= 1 << i
                val |= outs.pop() << i
        out = {}
        m = _REG.match(a[0])
        if m and m.group(3) not in ("RZ", "URZ") and known:
            out[m.group(3)] = (val, known)
        if pred and pred != "PT":
            if val & known:
                out[pred] = True
            elif known == FULL:
                out[pred] = False
        return out

    def _setp(self, env, ins, a):
        parts = ins.op.split(".")
        cmp = parts[1]
        unsigned = "U32" in parts
        combine = next((p for p in parts[2:] if p in ("AND", "OR", "XOR")), "AND")
        x, y = self.value(env, a[2]), self.value(env, a[3])
        c = self.operand(env, a[4]) if len(a) > 4 else True
        if x is None or y is None or not isinstance(c, bool):
            return None
        if ins.base == "FSETP":
            x, y = _f32(x), _f32(y)
        elif not unsigned:
            x, y = _i32(x), _i32(y)
        if "EX" in parts:  # 64-bit compare: these are the high words, a[5] the low-word result
            lo = self.operand(env, a[5]) if len(a) > 5 else None
            if not isinstance(lo, bool):
                return None
            r0 = lo if x == y else {"EQ": False, "NE": True}.get(cmp, _compare(cmp, x, y))
        else:
            r0 = _compare(cmp, x, y)
        if r0 is None:
            return None
        comb = {"AND": lambda p, q: p and q, "OR": lambda p, q: p or q,
                "XOR": lambda p, q: p != q}[combine]
        out = {}
        if _PRED.match(a[0]) and a[0] != "PT":
            out[a[0]] = comb(r0, c)
        if _PRED.match(a[1]) and a[1] != "PT":
            out[a[1]] = comb(not r0, c)
        return out


def _compare(cmp, x, y):
    nan = isinstance(x, float) and (math.isnan(x) or math.isnan(y))
    ops = {"EQ": x == y, "NE": x != y, "LT": x < y, "LE": x <= y, "GT": x > y, "GE": x >= y}
    if cmp in ops:
        return False if nan and cmp != "NE" else ops[cmp]
    if cmp.endswith("U") and cmp[:-1] in ops:  # unordered float compares: true on NaN
        return True if nan else ops[cmp[:-1]]
    return None


def _edge_ok(env, cond, cp):
    """Can this edge be taken given known predicate values? (None: maybe.)"""
    if not cond:
        return True
    negate = cond[0] == "not"
    preds = cond[1:] if negate else cond
    vals = [cp.guard_value(env, p) for p in preds]
    if any(v is False for v in vals):
        taken = False
    elif all(v is True for v in vals):
        taken = True
    else:
        return None
    return (not taken) if negate else taken


def clobber_sets(funcs):
    """{function: registers and predicates it writes}, for the subroutines (None: unknown,
    e.g. it calls further)."""
    out = {}
    for name, (instrs, _) in funcs.items():
        regs = set()
        for ins in instrs:
            if ins.base == "CALL":
                regs = None
                break
            regs.update(ConstProp._dests(ins))
        out[name] = regs
    return out


def feasible_edges(blocks, words, clobbers=None, specials=None):
    """SCCP-style: the edges that can run when the parameters in ``words`` hold (and the
    special registers in ``specials``, e.g. the thread index)."""
    cp = ConstProp(words, clobbers, specials)
    env_in = {0: {}}
    feasible = set()
    work = [0]
    while work:
        k = work.pop()
        env = dict(env_in[k])
        for ins in blocks[k].instrs:
            cp.step(env, ins)
        for s, cond in blocks[k].succ:
            if _edge_ok(env, cond, cp) is False:
                continue
            feasible.add((k, s))
            old = env_in.get(s)
            # a join keeps the bits both sides know (flags packed into one register)
            new = dict(env) if old is None else {
                r: m for r, v in old.items() if (m := _meet(v, env.get(r))) is not None}
            if old is None or new != old:
                env_in[s] = new
                work.append(s)
    return feasible


# ---- which array an access touches -----------------------------------------------------------

ROW_INPUTS = ("x", "logits")            # kernel arguments the rows are read from
ROW_OUTPUTS = ("g", "out", "grad")      # ... and written to
_ADDR = re.compile(r"\[(U?R\d+)(?:\.64|\.U32|\.X4|\.X8)*(?:\s*\+[^\]]*)?\]")
_OPERAND_REGS = re.compile(r"\b(U?R\d+)\b")
_CONST_OFF = re.compile(r"c\[0x0\]\[(0x[0-9a-f]+)\]")


def address_operand(ins):
    """The register holding the address of a global/shared access (None if absolute)."""
    for a in ins.args:
        if "[" in a:
            regs = _ADDR.findall(a)
            if regs:
                return regs[-1]
    return None


def access_arrays(blocks, feasible, pointers, clobbers=None):
    """{instruction address: set of array arguments} for every global load/store: which
    arrays' data pointers (``pointers``: {c[0x0] offset: argument}) its address may be
    computed from (a forward union over register dataflow)."""
    succ = collections.defaultdict(list)
    for a, b in feasible:
        succ[a].append(b)
    env_in = {0: {}}
    work = [0]
    result = {}
    while work:
        k = work.pop()
        env = dict(env_in[k])
        for ins in blocks[k].instrs:
            kind = mem_kind(ins)
            if kind in ("ld.global", "st.global"):
                r = address_operand(ins)
                result[ins.addr] = set(env.get(r, ())) if r else set()
            if ins.base == "CALL":
                m = re.search(r"`\((\S+?)\)", " ".join(ins.args))
                written = (clobbers or {}).get(m.group(1)) if m else None
                for key in list(env):
                    if written is None or key in written:
                        del env[key]
                continue
            dests = [d for d in ConstProp._dests(ins) if not d.startswith(("P", "UP", "*"))]
            if not dests:
                continue
            if ins.base in ("LDC", "ULDC"):
                m = _CONST_OFF.search(" ".join(ins.args))
                src = set()
                if m:
                    off = int(m.group(1), 16)
                    for o in (off, off - 4):
                        if o in pointers:
                            src.add(pointers[o])
            elif ins.base in ("LDG", "LDS", "LD", "LDL", "S2R", "S2UR", "CS2R", "SHFL", "ATOM",
                              "ATOMG", "RED", "LDSM"):
                src = set()
            else:
                src = set()
                for a in ins.args[1:]:
                    for r in _OPERAND_REGS.findall(a):
                        src |= env.get(r, set())
                    m = _CONST_OFF.search(a)
                    if m and int(m.group(1), 16) in pointers:
                        src.add(pointers[int(m.group(1), 16)])
            for d in dests:
                if ins.guard is not None:
                    env[d] = frozenset(src | set(env.get(d, ())))
                else:
                    env[d] = frozenset(src)
        for t in succ[k]:
            old = env_in.get(t)
            none = frozenset()
            new = dict(env) if old is None else {r: old.get(r, none) | env.get(r, none)
                                                  for r in set(old) | set(env)}
            if old is None or new != old:
                env_in[t] = new
                work.append(t)
    return result


# ---- loops and costs -------------------------------------------------------------------------

@dataclasses.dataclass
class Loop:
    header: int
    latch: int
    blocks: list
    innermost: bool = True
    top: bool = True
    trip_instrs: int = 0        # longest path through one trip
    body_instrs: int = 0        # every instruction of the loop body
    ldg_bytes: int = 0          # per thread per trip, on that path
    stg_bytes: int = 0
    lds_bytes: int = 0
    sts_bytes: int = 0
    other_bytes: int = 0        # global loads/stores of other arrays (targets, weights, ...)
    widths: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    mufu: int = 0


def find_loops(blocks, feasible):
    reach = {0}
    stack = [0]
    succ = collections.defaultdict(list)
    for a, b in feasible:
        succ[a].append(b)
    while stack:
        k = stack.pop()
        for s in succ[k]:
            if s not in reach:
                reach.add(s)
                stack.append(s)
    back = [(a, b) for a, b in feasible if a in reach and blocks[b].addr <= blocks[a].addr]
    last = {}  # header -> its last latch: back edges to one header are one loop
    for latch, header in back:
        last[header] = max(latch, last.get(header, latch))
    loops = [Loop(h, l, [k for k in range(h, l + 1) if k in reach]) for h, l in last.items()]
    for L in loops:
        for M in loops:
            if M is L:
                continue
            if L.header <= M.header and M.latch <= L.latch:
                L.innermost = False
            if M.header <= L.header and L.latch <= M.latch:
                L.top = False
    return loops, reach, back


def _longest(blocks, feasible, back, start, stop_set, weight, inside=None):
    """Longest weighted path from ``start`` over feasible forward edges (back edges removed),
    staying in ``inside`` if given. Returns (value, path)."""
    succ = collections.defaultdict(list)
    for a, b in feasible:
        if (a, b) in back:
            continue
        if inside is not None and (a not in inside or b not in inside):
            continue
        succ[a].append(b)

    @functools.lru_cache(maxsize=None)
    def best(k):
        w = weight(k)
        if k in stop_set:
            return w, (k,)
        opts = [best(s) for s in succ[k] if s > k or blocks[s].addr > blocks[k].addr]
        if not opts:
            return w, (k,)
        v, p = max(opts, key=lambda t: t[0])
        return w + v, (k,) + p
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    return best(start)


def _count(instrs):
    return sum(1 for i in instrs if i.base not in ("BSSY", "BSYNC", "NOP"))


def analyse_loop(blocks, feasible, back, L, is_row=lambda ins: True):
    inside = set(L.blocks)
    backs = set(back)
    v, path = _longest(blocks, feasible, backs, L.header, {L.latch},
                       lambda k: _count(blocks[k].instrs), inside)
    L.trip_instrs = v
    L.body_instrs = sum(_count(blocks[k].instrs) for k in L.blocks)
    for k in path:
        for ins in blocks[k].instrs:
            kind, w = mem_kind(ins), mem_width(ins)
            if kind in ("ld.global", "st.global") and not is_row(ins):
                L.other_bytes += w
            elif kind:
                L.widths[sass_width_label(ins)] += 1
                if kind == "ld.global":
                    L.ldg_bytes += w
                elif kind == "st.global":
                    L.stg_bytes += w
                elif kind == "ld.shared":
                    L.lds_bytes += w
                else:
                    L.sts_bytes += w
            if ins.base == "MUFU":
                L.mufu += 1
    return L


# ---- compiling -------------------------------------------------------------------------------

def nvdisasm_path():
    try:
        import nvidia
        for root in nvidia.__path__:
            for sub in ("cu13", "cuda_nvdisasm", "cu12"):
                p = os.path.join(root, sub, "bin", "nvdisasm")
                if os.path.exists(p):
                    return p
    except ImportError:
        pass
    return shutil.which("nvdisasm")


def link_cubin(ptx, arch="sm_90"):
    """(cubin bytes, ptxas info log) through nvJitLink."""
    from cuda.bindings import nvjitlink
    h = nvjitlink.create(2, [f"-arch={arch}", "-verbose"])
    try:
        data = ptx.encode()
        nvjitlink.add_data(h, nvjitlink.InputType.PTX, data, len(data), "gpuce")
        nvjitlink.complete(h)
        buf = bytearray(nvjitlink.get_linked_cubin_size(h))
        nvjitlink.get_linked_cubin(h, buf)
        log = bytearray(nvjitlink.get_info_log_size(h))
        nvjitlink.get_info_log(h, log)
    finally:
        nvjitlink.destroy(h)
    return bytes(buf), bytes(log).rstrip(b"\0").decode(errors="replace")


def disassemble(cubin):
    tool = nvdisasm_path()
    if tool is None:
        raise RuntimeError("nvdisasm not found (pip install nvidia-cuda-nvdisasm)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-c", f.name], capture_output=True, text=True, check=True)
    return out.stdout


def parse_log(log):
    def grab(pat, default=None):
        m = re.search(pat, log)
        if m is None:
            if default is None:
                raise ValueError(f"no {pat!r} in the ptxas log:\n{log}")
            return default
        return int(m.group(1))
    return {"registers": grab(r"[Uu]sed (\d+) registers"),
            "spill_stores": grab(r"(\d+) bytes spill stores", 0),
            "spill_loads": grab(r"(\d+) bytes spill loads", 0),
            "static_smem": grab(r"(\d+) bytes smem", 0)}


@dataclasses.dataclass
class Compiled:
    name: str
    key: object
    ptx: str
    sass: str
    resources: dict
    params: dict        # python argument name -> (byte offset, ptx type)
    compile_s: float


def param_layout(ptx, fn, sig):
    """{python argument: (c[0x0] byte offset, ptx type)} from the PTX entry's parameter list
    and numba's flattening (an array is 5 + 2 x ndim fields: meminfo, parent, nitems,
    itemsize, data, shape, strides; for arrays the offset is the data pointer's and the type
    "array")."""
    m = re.search(r"\.entry\s+\S+\(\s*(.*?)\)", ptx, re.S)
    ptypes = re.findall(r"\.param\s+(?:\.align\s+\d+\s+)?\.(\w+)\s+\S+?(?:\[(\d+)\])?\s*(?:,|$)",
                        m.group(1)) if m else []
    sizes = {"u64": 8, "s64": 8, "b64": 8, "f64": 8, "u32": 4, "s32": 4, "b32": 4, "f32": 4,
             "u16": 2, "b16": 2, "s16": 2, "u8": 1, "b8": 1, "s8": 1}
    offs, off = [], PARAM_BASE
    for t, n in ptypes:
        size = sizes.get(t, 8) * (int(n) if n else 1)
        align = sizes.get(t, 8)
        off = -(-off // align) * align
        offs.append((off, t))
        off += size
    names = list(inspect.signature(fn).parameters)
    out, i = {}, 0
    from numba import types as nbt
    for name, ty in zip(names, sig.args):
        if isinstance(ty, nbt.Array):
            if i + 4 < len(offs):
                out[name] = (offs[i + 4][0], "array")
            i += 5 + 2 * ty.ndim
            continue
        if i < len(offs):
            out[name] = offs[i]
        i += 1
    return out


_COMPILED = {}


def compile_kernel(name, key):
    """PTX, SASS and resources of one kernel, compiled once per process."""
    c = _COMPILED.get((name, key))
    if c is None:
        c = _COMPILED[(name, key)] = _compile(name, key)
    if isinstance(c, str):
        raise RuntimeError(f"{name} ({key}) did not compile: {c}")
    return c


def _compile(name, key):
    from gpuce.kernels import cuda_ptx, cuda_registry
    t0 = time.time()
    fn, sig, _ = cuda_registry.spec(name, key)
    ptx = cuda_ptx.compile_ptx(name, key, ccs=((9, 0),))[(9, 0)]
    cubin, log = link_cubin(ptx)
    sass = disassemble(cubin)
    return Compiled(name, key, ptx, sass, parse_log(log), param_layout(ptx, fn, sig),
                    time.time() - t0)


def param_words(compiled, values):
    """{c[0x0] offset: 32-bit word} for the arguments in ``values`` the kernel has."""
    words = {}
    for arg, v in values.items():
        if arg not in compiled.params or compiled.params[arg][1] == "array":
            continue
        off, t = compiled.params[arg]
        if t in ("f32",):
            raw = struct.pack("<f", float(v))
        elif t == "f64":
            raw = struct.pack("<d", float(v))
        elif t in ("u32", "s32", "b32"):
            raw = struct.pack("<i", int(v))
        else:
            raw = struct.pack("<q", int(v))
        for k in range(0, len(raw), 4):
            words[off + k] = struct.unpack("<I", raw[k:k + 4])[0]
    return words


def main_function(sass, funcs=None):
    funcs = funcs or parse_sass(sass)
    entries = {n: f for n, f in funcs.items() if not n.startswith("__cuda")}
    if len(entries) != 1:
        raise ValueError(f"expected one kernel in the cubin, found {sorted(entries)}")
    return next(iter(entries.values()))


# ---- the kernel model ------------------------------------------------------------------------

@dataclasses.dataclass
class KernelModel:
    name: str
    registers: int
    spills: int
    static_smem: int
    instr_per_elem: float       # thread-instructions per row element (streaming + per-row work)
    loop_instr_per_elem: float  # the streaming loops' share of it
    read_phases: int            # streaming loops on the path that load from global memory
    write_phases: int
    inflight_per_thread: float  # row bytes one thread's loads of one trip cover (least loop)
    loops: list                 # the streaming loops on the path
    sass_widths: collections.Counter
    ptx_widths: collections.Counter


MODEL_THREADS = (96, 0)   # lane 0 of warp 3 (every warp but the first), and thread 0


def model_kernel(compiled, values, isz, smem_isz, threads_per_row, elems_per_row,
                 other_trips=1):
    """Walk the SASS of one kernel for one case (see the module docstring).

    ``threads_per_row``: threads sharing one row (the block; the lanes of a warp kernel);
    ``elems_per_row``: the elements those threads cover (C, or a split chunk);
    ``other_trips``: trips per row of an inner loop that touches no row element (the merge
    over a split row's n_split partials).

    Branches on the thread index are resolved too: a block kernel is walked for thread 96
    (lane 0 of warp 3: what every warp but the first issues, including lane-0 work) and for
    thread 0 (the first warp, which also does the block's single-thread and single-warp
    work), weighted by the threads they stand for. A warp kernel is walked for thread 0."""
    args = (compiled, values, isz, smem_isz, threads_per_row, elems_per_row, other_trips)
    if threads_per_row <= THREADS_PER_WARP:
        return _model_thread(*args, 0)
    most = _model_thread(*args, MODEL_THREADS[0])
    first = _model_thread(*args, MODEL_THREADS[1])
    w = THREADS_PER_WARP / threads_per_row
    return dataclasses.replace(
        most, instr_per_elem=(1 - w) * most.instr_per_elem + w * first.instr_per_elem,
        loop_instr_per_elem=(1 - w) * most.loop_instr_per_elem + w * first.loop_instr_per_elem)


def _model_thread(compiled, values, isz, smem_isz, threads_per_row, elems_per_row, other_trips,
                  tid):
    funcs = parse_sass(compiled.sass)
    instrs, labels = main_function(compiled.sass, funcs)
    blocks = build_blocks(instrs, labels)
    clobbers = clobber_sets(funcs)
    feas = feasible_edges(blocks, param_words(compiled, values), clobbers,
                          {"SR_TID.X": tid, "SR_LANEID": tid % THREADS_PER_WARP})
    loops, reach, back = find_loops(blocks, feas)
    backs = set(back)
    pointers = {off: name for name, (off, t) in compiled.params.items() if t == "array"}
    names = list(pointers.values())
    row_in = {n for n in names if n in ROW_INPUTS} or set(names[:1])
    row_out = {n for n in names if n in ROW_OUTPUTS} or set(names[1:2])
    touched = access_arrays(blocks, feas, pointers, clobbers)

    def is_row(ins):
        """a load from the logits or a store to the row output (an address whose origin is
        not followed counts as one)"""
        arrays = touched.get(ins.addr)
        if not arrays:
            return True
        return bool(arrays & (row_in if mem_kind(ins) == "ld.global" else row_out))

    def touches_row(L):
        return any(mem_kind(ins) and (mem_kind(ins).endswith("shared") or is_row(ins))
                   for k in L.blocks for ins in blocks[k].instrs)

    for L in loops:
        analyse_loop(blocks, feas, backs, L, is_row)
    # row loops: the outermost loops that touch row elements (grid-stride over rows or
    # chunks); other outermost loops (e.g. a last block summing partials) run once per block
    row_loops = [L for L in loops if L.top and touches_row(L)]
    inner = [L for L in loops if L.innermost and not L.top
             and any(R.header <= L.header and L.latch <= R.latch for R in row_loops)]
    streaming = {L.header: L for L in inner
                 if L.ldg_bytes or L.stg_bytes or L.lds_bytes or L.sts_bytes}
    per_row_loops = {L.header: L for L in inner if L.header not in streaming}
    in_row, in_inner = set(), set()
    for L in row_loops:
        in_row.update(L.blocks)
    for L in inner:
        in_inner.update(L.blocks)

    def elems(L):
        return max(L.ldg_bytes / isz, L.stg_bytes / isz, L.lds_bytes / smem_isz,
                   L.sts_bytes / smem_isz)

    share = threads_per_row / elems_per_row  # per-row work of each thread, per element

    # A phase (one sweep over the row) can be several loops: an unrolled main loop and its
    # remainder loop, or a 128-bit loop and a scalar tail. Loops touching the same kinds of
    # memory form one phase; the one covering the most elements per trip is its main loop,
    # and the others cover at most (its elements per trip - 1) elements per thread (the
    # remainder of an unrolled loop: every thread) or per row (a narrower tail: one warp).
    def kinds(L):
        return frozenset(k for k, v in (("ldg", L.ldg_bytes), ("stg", L.stg_bytes),
                                        ("lds", L.lds_bytes), ("sts", L.sts_bytes)) if v)

    main_of = {}
    for L in streaming.values():
        group = [M for M in streaming.values() if kinds(M) == kinds(L)]
        main_of[L.header] = max(group, key=lambda M: (elems(M), -M.header))

    def is_main(L):
        return main_of[L.header] is L

    def remainder_weight(L):
        M = main_of[L.header]
        trips = max(0.0, elems(M) / elems(L) - 1)
        same_width = set(L.widths) == set(M.widths)
        threads = threads_per_row if same_width else min(THREADS_PER_WARP, threads_per_row)
        return L.trip_instrs * trips * threads / elems_per_row

    def weight(k):
        if k in streaming:
            L = streaming[k]
            return L.trip_instrs / elems(L) if is_main(L) else remainder_weight(L)
        if k in per_row_loops:  # e.g. merging a split row's partials: other_trips per row
            return per_row_loops[k].trip_instrs * other_trips * share
        if k in in_inner:
            return 0.0
        if k in in_row:
            return _count(blocks[k].instrs) * share
        return 0.0

    total, path = _longest(blocks, feas, backs, 0, set(), weight)
    on_path = [streaming[k] for k in path if k in streaming]
    loop_part = sum(weight(L.header) for L in on_path)
    phases = [L for L in on_path if is_main(L)]
    # a row loop with everything unrolled (warp kernels) is itself the streaming phase
    for L in row_loops:
        if L.header in path and not any(L.header <= M.header <= L.latch for M in inner):
            phases.append(L)
            loop_part = total
    reads = [L for L in phases if L.ldg_bytes]
    writes = [L for L in phases if L.stg_bytes]

    def fill(L):
        """share of a trip's load slots that hold row elements (a warp holding 512 slots for
        C = 128 fills a quarter)"""
        slots = L.ldg_bytes / isz
        return min(1.0, elems_per_row / (threads_per_row * slots)) if slots else 0.0

    inflight = min((L.ldg_bytes * fill(L) for L in reads), default=0.0)
    sass_w = collections.Counter(sass_width_label(ins) for ins in instrs
                                 if mem_kind(ins) in ("ld.global", "st.global"))
    res = compiled.resources
    return KernelModel(compiled.name, res["registers"], res["spill_stores"] + res["spill_loads"],
                       res["static_smem"], total, loop_part, len(reads), len(writes), inflight,
                       phases, sass_w, ptx_widths(compiled.ptx))


# ---- occupancy and ceilings ------------------------------------------------------------------

def blocks_per_sm(threads, registers, static_smem, dynamic_smem, shared_per_sm=228 * 1024):
    """Resident blocks per SM on sm_90 (the CUDA occupancy calculator's rules)."""
    warps = -(-threads // THREADS_PER_WARP)
    by_warps = MAX_WARPS_PER_SM // warps
    regs_per_warp = -(-registers * THREADS_PER_WARP // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (REGS_PER_SM // regs_per_warp) // warps if registers else by_warps
    smem = static_smem + dynamic_smem + SMEM_RESERVED_PER_BLOCK
    by_smem = shared_per_sm // smem
    return max(0, min(MAX_BLOCKS_PER_SM, by_warps, by_regs, by_smem))


def ceilings(useful_bytes, dram_bytes, inflight_per_sm, instr_total, device):
    """(passes, bytes in flight, issue rate) ceilings as shares of copy bandwidth, and their
    minimum (capped at 1)."""
    passes = useful_bytes / dram_bytes
    little = min(1.0, inflight_per_sm / device.bytes_needed_per_sm)
    t_issue = instr_total / device.issue_rate
    issue = math.inf if t_issue == 0 else useful_bytes / (t_issue * device.bandwidth)
    return passes, little, issue, min(1.0, passes, little, issue)


# ---- cases -----------------------------------------------------------------------------------

def _plan(n_rows, n_cls, dt, family, limits, softcap=False):
    from gpuce import _cuda_plan as P
    kw = {}
    params = inspect.signature(P.plan_for).parameters
    if "softcap" in params:  # (the shared memory of a capped row)
        kw["softcap"] = softcap
    if "family" in params:
        kw["family"] = family
    if "aligned" in params:  # a 16-byte aligned buffer: rows aligned iff their bytes are
        kw["aligned"] = (n_cls * DTYPE_BYTES[dt]) % 16 == 0
    return P.plan_for(n_rows, n_cls, dt, limits, **kw)


def _limits(device_name):
    from gpuce import _cuda_plan as P
    maker = getattr(P.DeviceLimits, device_name, None) or P.DeviceLimits.h100
    return maker()


def _lanes_per_row(plan, dt):
    """Threads that share one row: the block for block kernels, the lanes for warp kernels."""
    if plan.strategy != "warp":
        return plan.block
    for attr in ("lanes", "lanes_per_row", "threads_per_row"):
        if getattr(plan, attr, None):
            return getattr(plan, attr)
    from gpuce import _cuda_plan as P
    return P.warp_shape(plan.part, dt)[0]


def model_case(op, dt, n_rows, n_cls, device, limits):
    family, fixed, row_outputs = OPS[op]
    plan = _plan(n_rows, n_cls, dt, family, limits, op == "ce_softcap")
    isz = DTYPE_BYTES[dt]
    kernels = tuple(plan.kernels) or (plan.kernel,)
    tpr = _lanes_per_row(plan, dt)
    chunk = -(-n_cls // plan.n_split) if plan.n_split else n_cls
    smem_isz = plan.shared_bytes / n_cls if plan.shared_bytes else ACC_BYTES[dt]
    per_chunk_rows = n_rows * (plan.n_split or 1)
    values = dict(fixed, n_rows=n_rows, n_cls=n_cls, n_split=plan.n_split or 0)
    if "unused" not in values:
        values["unused"] = 0
    models, occ, inflight_sm = [], [], []
    for name in kernels:
        comp = compile_kernel(name, plan.key)
        km = model_kernel(comp, values, isz, smem_isz, tpr, chunk, max(1, plan.n_split))
        models.append(km)
        b = blocks_per_sm(plan.block, km.registers, km.static_smem, plan.shared_bytes,
                          device.shared_per_sm)
        grid = plan.grid
        # blocks a grid-stride kernel keeps resident on an average SM
        resident = min(b, grid / device.sms)
        if plan.strategy == "warp":
            rows_per_block = plan.block // tpr
            resident = min(b, -(-per_chunk_rows // rows_per_block) / device.sms, grid / device.sms)
        else:
            resident = min(resident, per_chunk_rows / device.sms)
        occ.append((b, resident))
        if km.read_phases:
            inflight_sm.append(resident * plan.block * km.inflight_per_thread)
    read_passes = sum(k.read_phases for k in models)
    # stores of per-row values (the loss, lse) are not passes over N x C
    write_passes = min(sum(k.write_phases for k in models), row_outputs)
    row_bytes = n_rows * n_cls * isz
    extra = n_rows * TARGET_BYTES if family == "ce" else 0
    if row_outputs == 0:  # logsumexp: one value per row
        extra += n_rows * ACC_BYTES[dt]
    useful = row_bytes * (1 + row_outputs) + extra
    dram = row_bytes * (read_passes + write_passes) + extra
    ipe = sum(k.instr_per_elem for k in models)
    inflight = min(inflight_sm) if inflight_sm else 0.0
    c_pass, c_little, c_issue, ceiling = ceilings(useful, dram, inflight, ipe * n_rows * n_cls,
                                                  device)
    thr = threshold(op, n_cls)
    loops = []
    for k in models:
        for L in k.loops:
            loops.append({"kernel": k.name, "trip_instrs": L.trip_instrs,
                          "body_instrs": L.body_instrs,
                          "elements_per_trip": max(L.ldg_bytes / isz, L.stg_bytes / isz,
                                                   L.lds_bytes / smem_isz, L.sts_bytes / smem_isz),
                          "ldg_bytes": L.ldg_bytes, "stg_bytes": L.stg_bytes,
                          "lds_bytes": L.lds_bytes, "sts_bytes": L.sts_bytes,
                          "widths": dict(L.widths), "mufu": L.mufu})
    return {
        "op": op, "dtype": dt, "n_rows": n_rows, "n_cls": n_cls,
        "strategy": plan.strategy, "kernels": list(kernels), "key": str(plan.key),
        "block": plan.block, "grid": plan.grid, "shared_bytes": plan.shared_bytes,
        "n_split": plan.n_split, "vectorized": bool(getattr(plan, "vectorized", False)),
        "registers": [k.registers for k in models], "spills": [k.spills for k in models],
        "blocks_per_sm": [o[0] for o in occ], "resident_blocks": [round(o[1], 2) for o in occ],
        "warps_per_sm": [round(o[1] * plan.block / THREADS_PER_WARP, 1) for o in occ],
        "inflight_bytes_per_sm": round(inflight),
        "read_passes": read_passes, "write_passes": write_passes,
        "dram_passes": round(dram / row_bytes, 3) if row_bytes else 0,
        "instr_per_elem": round(ipe, 2),
        "loop_instr_per_elem": round(sum(k.loop_instr_per_elem for k in models), 2),
        "issue_budget_per_elem": round(device.issue_rate * (useful / (n_rows * n_cls))
                                       / device.bandwidth, 1),
        "sass_global": {k.name: dict(k.sass_widths) for k in models},
        "ptx_global": {k.name: dict(k.ptx_widths) for k in models},
        "streaming_loops": loops,
        "ceiling_passes": round(c_pass, 4), "ceiling_inflight": round(c_little, 4),
        "ceiling_issue": round(min(c_issue, 99.0), 4), "ceiling": round(ceiling, 4),
        "useful_bytes": useful,
        "predicted_us": (round(useful / (ceiling * device.bandwidth) * 1e6, 2) if ceiling > 0
                         else None),
        "threshold": thr, "pass": None if thr is None else ceiling >= thr,
    }


# ---- output ----------------------------------------------------------------------------------

def _pct(x):
    return f"{100 * x:.0f}%"


def _widths_label(row):
    """Global widths in the streaming loops of the case, SASS (e.g. LDG.E.128 STG.E.128)."""
    c = collections.Counter()
    for L in row["streaming_loops"]:
        for w, n in L["widths"].items():
            if w.startswith(("LDG", "STG")):
                c[w] += n
    return " ".join(f"{w}x{n}" for w, n in sorted(c.items())) or "-"


def _ptx_label(row):
    c = collections.Counter()
    for d in row["ptx_global"].values():
        c.update(d)
    forms = sorted({k for k in c if ".v4" in k or ".v2" in k or ".nc" in k})
    return ", ".join(forms) if forms else "scalar only"


def table(rows):
    head = ("| C | N | strategy | regs | blk/SM | warps/SM | in flight/SM | passes | instr/elem "
            "(budget) | loop widths (SASS) | PTX vector/nc | passes | in flight | issue | "
            "**model** | target | |")
    lines = [head, "|" + "---:|" * 2 + "---|" + "---:|" * 6 + "---|---|" + "---:|" * 5 + "---|"]
    for r in rows:
        t = "-" if r["threshold"] is None else _pct(r["threshold"])
        ok = "" if r["pass"] is None else ("pass" if r["pass"] else "**FAIL**")
        if "error" in r:
            lines.append(f"| {r['n_cls']} | {r['n_rows']} | ERROR: {r['error']} |" + " |" * 14
                         + f" {t} | **FAIL** |")
            continue
        lines.append(
            f"| {r['n_cls']} | {r['n_rows']} | {r['strategy']}{' (v)' if r['vectorized'] else ''}"
            f" | {'/'.join(map(str, r['registers']))} | {'/'.join(map(str, r['blocks_per_sm']))}"
            f" | {'/'.join(str(w) for w in r['warps_per_sm'])}"
            f" | {r['inflight_bytes_per_sm'] / 1024:.1f} KiB | {r['dram_passes']:g}"
            f" | {r['instr_per_elem']:.1f} ({r['issue_budget_per_elem']:g})"
            f" | {_widths_label(r)} | {_ptx_label(r)}"
            f" | {_pct(r['ceiling_passes'])} | {_pct(r['ceiling_inflight'])}"
            f" | {_pct(min(r['ceiling_issue'], 9.99))} | **{_pct(r['ceiling'])}** | {t} | {ok} |")
    return "\n".join(lines)


def render(rows, meta):
    out = [f"# Static roofline: {meta['device']}", "",
           "A **model** from the compiled code (PTX and SASS for sm_90), not a measurement. "
           "No GPU ran anything here.", "",
           f"- kernels: {meta['kernels']}",
           f"- generated {meta['date']} by `python benchmarks/roofline.py {meta['argv']}` in "
           f"{meta['wall_s']:.0f} s ({meta['compile_s']:.0f} s of compiling {meta['n_kernels']} "
           f"kernels) on {meta['host']}",
           f"- assumptions: copy bandwidth {meta['bandwidth'] / 1e12:.2f} TB/s, {meta['sms']} "
           f"SMs, loaded latency {meta['latency_ns']:.0f} ns -> "
           f"{meta['needed_per_sm'] / 1024:.1f} KiB in flight per SM; issue rate "
           f"{meta['issue_rate'] / 1e12:.1f}e12 thread-instructions/s "
           f"({meta['sms']} SMs x {LANES_PER_SM} lanes x {SM_CLOCK_HZ / 1e9:.2f} GHz). "
           "Method: benchmarks/README.md, \"Static roofline\".", "",
           "Columns: registers, resident blocks and warps per SM (per kernel launched, "
           "`/`-separated), bytes of global loads in flight per SM, DRAM passes over N x C, "
           "SASS thread-instructions per element (the issue budget at copy speed in brackets), "
           "the global access widths in the streaming loops (SASS, per trip), the PTX vector or "
           ".nc global forms anywhere in the kernels, the three ceilings, the model (their "
           "minimum) and the issue's target.", ""]
    sections = []
    summary = collections.Counter()
    for op in OPS:
        for dt in meta["dtypes"]:
            sel = [r for r in rows if r["op"] == op and r["dtype"] == dt]
            if not sel:
                continue
            judged = [r for r in sel if r["pass"] is not None]
            passed = sum(1 for r in judged if r["pass"])
            summary["pass"] += passed
            summary["fail"] += len(judged) - passed
            sections += [f"## {OP_TITLES[op]}, {SHORT[dt]}", "",
                         f"{passed} of {len(judged)} cases with a target reach it.", "",
                         table(sel), ""]
    out += [f"**Against the issue's thresholds: {summary['pass']} cases pass, "
            f"{summary['fail']} fail** (a model, not measured).", ""]
    out += sections + inventory(rows)
    return "\n".join(out) + "\n"


def inventory(rows):
    """One line per kernel the cases use: resources and every global access in its code."""
    seen = {}
    for r in rows:
        if "error" in r:
            continue
        for i, name in enumerate(r["kernels"]):
            seen.setdefault((name, r["key"]), (r["registers"][i], r["spills"][i],
                                               r["sass_global"][name], r["ptx_global"][name]))
    lines = ["## Kernels", "",
             "Every global load and store in each kernel's code (not only its streaming loops).",
             "", "| kernel | key | registers | spill bytes | SASS global accesses | PTX global "
             "accesses |", "|---|---|---:|---:|---|---|"]
    for (name, key), (regs, spills, sass, ptx) in sorted(seen.items()):
        fmt = lambda d: " ".join(f"{k}x{v}" for k, v in sorted(d.items())) or "-"  # noqa: E731
        lines.append(f"| {name} | {key} | {regs} | {spills} | {fmt(sass)} | {fmt(ptx)} |")
    return lines + [""]


def kernels_commit():
    """The commit of the kernels being modelled (from the imported gpuce.kernels package)."""
    try:
        from gpuce import kernels
        here = os.path.dirname(os.path.realpath(kernels.__path__[0]))
        run = functools.partial(subprocess.run, capture_output=True, text=True, cwd=here)
        sha = run(["git", "log", "-1", "--format=%h (%cI)", "--", "kernels",
                   "gpuce/_cuda_plan.py"]).stdout.strip()
        if not sha:
            return "not in a git checkout"
        dirty = run(["git", "status", "--porcelain", "--", "kernels",
                     "gpuce/_cuda_plan.py"]).stdout.strip()
        return f"commit {sha}" + (" plus uncommitted changes" if dirty else "")
    except (OSError, ImportError):
        return "unknown"


def _needed_kernels(ops, dtypes, shapes, limits):
    need = []
    for op in ops:
        for dt in dtypes:
            for n, c in shapes:
                plan = _plan(n, c, dt, OPS[op][0], limits, op == "ce_softcap")
                for name in tuple(plan.kernels) or (plan.kernel,):
                    if (name, plan.key) not in need:
                        need.append((name, plan.key))
    return need


def _compile_job(job):
    try:
        return _compile(*job)
    except Exception as exc:  # reported in the rows that need this kernel
        return f"{type(exc).__name__}: {exc}"


def precompile(jobs_list, jobs):
    """Compile the kernels in ``jobs_list`` in ``jobs`` processes (numba's compile is
    single-threaded)."""
    todo = [j for j in jobs_list if j not in _COMPILED]
    if jobs > 1 and len(todo) > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(jobs) as pool:
            for j, c in zip(todo, pool.map(_compile_job, todo)):
                _COMPILED[j] = c
    else:
        for j in todo:
            _COMPILED[j] = _compile_job(j)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=sorted(DEVICES), default="h100")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                    choices=sorted(DTYPE_BYTES))
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    ap.add_argument("--shapes", default="", help="NxC,... instead of the bench shapes")
    ap.add_argument("--quick", action="store_true",
                    help="a small subset: ce, fp32, C = 128 and 1000 (for tests)")
    ap.add_argument("--json", default="", help="write every number here")
    ap.add_argument("--markdown", default="", help="write the report here")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="processes compiling kernels")
    ap.add_argument("--label", default="", help="say which kernels these are (default: their "
                    "git commit)")
    args = ap.parse_args(argv)
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        sys.exit("roofline.py: unset NUMBA_ENABLE_CUDASIM (the simulator compiles nothing)")
    device = DEVICES[args.device]
    limits = _limits(args.device)
    shapes = SHAPES
    if args.shapes:
        shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
    ops, dtypes = args.ops, args.dtypes
    if args.quick:
        ops, dtypes, shapes = ["ce"], ["float32"], ((N_ROWS, 128), (N_ROWS, 1000))
    t0 = time.time()
    precompile(_needed_kernels(ops, dtypes, shapes, limits), args.jobs)
    rows = []
    for op in ops:
        for dt in dtypes:
            for n, c in shapes:
                try:
                    rows.append(model_case(op, dt, n, c, device, limits))
                except Exception as exc:  # one broken kernel must not hide the rest
                    rows.append({"op": op, "dtype": dt, "n_rows": n, "n_cls": c,
                                 "error": f"{type(exc).__name__}: {exc}"[:300],
                                 "threshold": threshold(op, c), "pass": False})
    wall = time.time() - t0
    compiled = len(_COMPILED)
    meta = {"device": device.name, "kernels": args.label or kernels_commit(), "date":
            datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "argv": " ".join(argv if argv is not None else sys.argv[1:]), "wall_s": wall,
            "compile_s": _compile_seconds(), "n_kernels": compiled,
            "host": f"{os.cpu_count()} CPUs", "bandwidth": device.bandwidth, "sms": device.sms,
            "latency_ns": device.latency_s * 1e9, "needed_per_sm": device.bytes_needed_per_sm,
            "issue_rate": device.issue_rate, "dtypes": dtypes,
            "note": "a model from the compiled code, not a measurement"}
    text = render(rows, meta)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "cases": rows}, f, indent=1)
    return 0


def _compile_seconds():
    return sum(c.compile_s for c in _COMPILED.values() if not isinstance(c, str))


if __name__ == "__main__":
    sys.exit(main())
