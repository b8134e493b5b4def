"""Static facts about one compiled kernel, read from its SASS and PTX (no GPU): the input of
``bench.perf_model``. ``bench.compile_report`` calls :func:`kernel_facts` while it compiles, so the facts
live in its source-hash cache beside the register and spill numbers.

SASS (``cuobjdump -sass``):
  * loops are back-branches (a ``BRA`` whose target address is not after it); the *main loop* is the loop
    with the most tensor-core work, else the most global-memory instructions (ties: the outermost);
  * per main-loop iteration: instructions (every instruction in the loop's address range once: inner
    loops once, cold branches included; ``NOP`` padding excluded), tensor-core instructions and their
    work in ``HMMA.16816`` equivalents (one m16n8k16 product, 4096 FLOP: ``HMMA.16816`` = 1,
    ``HMMA.1688`` = 1/2, a warp's share of ``HGMMA.64xNxK`` = N*K/128), async copies (``LDGSTS``, TMA),
    shared-memory, global, barrier and special-function instructions.
PTX:
  * shared-memory wavefronts: every shared access (``ld/st/atom/red.shared``, ``ldmatrix``, ``stmatrix``,
    ``cp.async`` destinations) is evaluated for the 32 lanes of warp 0 by running the integer address
    arithmetic of the PTX in program order once, with ``%tid.x`` = lane, ``%tid.y/z`` = 0 and every other
    unknown (parameters, block indices, loaded values) a symbol. Uniform symbols cancel in the bank
    pattern; an address whose lane pattern depends on an unknown is counted as ``unknown``. Wavefronts
    follow the documented bank model: 32 banks x 4 bytes; a warp request is split into phases of 128
    bytes (all 32 lanes for <= 4-byte accesses, 2 x 16 lanes for 8 bytes, 4 x 8 lanes for 16 bytes, one
    phase per 8x8 matrix for ``ldmatrix``); each phase costs the largest number of distinct 4-byte words
    any one bank holds. ``wgmma`` operands read through descriptors count as their ideal (the swizzled
    layouts wgmma requires are conflict-free by construction);
  * ``cp.async`` count and ``cp.async.wait_group`` depths (pipeline stages of hand-written kernels).
"""
from __future__ import annotations

import itertools
import re
from typing import Dict, List, Optional, Tuple

FACTS_VERSION = "2"  # 2: the other outer loops' tensor work and shared wavefronts
LANES = 32

# ----------------------------------------------------------------------------------------------
# SASS
# ----------------------------------------------------------------------------------------------
_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_HGMMA = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)")
_TENSOR_PREFIX = ("HMMA", "HGMMA", "IMMA", "QMMA", "UTCHMMA", "UTCQMMA")
_COUNTED = {  # fact name -> opcode prefixes
    "ldgsts": ("LDGSTS",), "tma": ("UTMALDG", "UBLKCP", "UTMAPF"), "ldg": ("LDG",), "stg": ("STG",),
    "lds": ("LDS",), "ldsm": ("LDSM",), "sts": ("STS",), "bar": ("BAR",), "mufu": ("MUFU",), "shfl": ("SHFL",),
    "depbar": ("DEPBAR", "LDGDEPBAR"), "red": ("RED", "ATOM"),
}


def sass_instructions(sass: str) -> List[Tuple[int, str, str]]:
    """``(address, opcode, operands)`` of every instruction of one function's SASS."""
    return [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _SASS.finditer(sass)]


def tensor_equiv(op: str) -> float:
    """Work of one warp-level tensor-core instruction in HMMA.16816 (m16n8k16, 4096 FLOP) units."""
    if op.startswith("HMMA.16816") or op.startswith("HMMA.16832"):
        return 1.0
    if op.startswith("HMMA.1688") or op.startswith("HMMA.884"):
        return 0.5
    m = _HGMMA.match(op)
    if m:  # m64nNkK per warpgroup; each of its 4 warps issues the instruction
        return int(m.group(1)) * int(m.group(2)) * int(m.group(3)) * 2 / 4 / 4096
    return 1.0 if op.startswith(_TENSOR_PREFIX) else 0.0


def _counts(insts) -> dict:
    out = {"instr": 0, "tensor": 0, "tensor_equiv": 0.0, **{k: 0 for k in _COUNTED}}
    for _, op, _ in insts:
        if op == "NOP":
            continue
        out["instr"] += 1
        te = tensor_equiv(op)
        if te:
            out["tensor"] += 1
            out["tensor_equiv"] += te
        for k, prefixes in _COUNTED.items():
            if op.startswith(prefixes):
                out[k] += 1
    out["tensor_equiv"] = round(out["tensor_equiv"], 3)
    return out


def _loops(branches: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """(start, end) address ranges of the back-branches, merged per start (a loop with several latches
    is one loop)."""
    by_start: Dict[int, int] = {}
    for src, dst in branches:
        if dst <= src:
            by_start[dst] = max(by_start.get(dst, src), src)
    return sorted(by_start.items())


def _pick_main(loops, stats, key) -> Optional[int]:
    best = None
    for i, (s, e) in enumerate(loops):
        k = (key(stats[i]), e - s)
        if key(stats[i]) > 0 and (best is None or k > best[0]):
            best = (k, i)
    return None if best is None else best[1]


def sass_facts(sass: str) -> dict:
    insts = sass_instructions(sass)
    branches = []
    for addr, op, args in insts:
        if op.startswith("BRA") and not op.startswith("BRX"):
            m = re.search(r"0x([0-9a-f]+)", args)
            if m:
                branches.append((addr, int(m.group(1), 16)))
    loops = [(s, e) for s, e in _loops(branches) if not (s == e)]  # BRA-to-self ends every function
    stats = [_counts([i for i in insts if s <= i[0] <= e]) for s, e in loops]
    main = _pick_main(loops, stats, lambda c: c["tensor_equiv"])
    if main is None:
        main = _pick_main(loops, stats, lambda c: c["ldg"] + c["stg"] + c["ldgsts"] + c["tma"])
    total = _counts(insts)
    out = {"total": total, "loops": len(loops), "main": None, "other_outer_instr": 0, "other_outer_tensor_equiv": 0.0}
    if main is not None:
        s, e = loops[main]
        m = dict(stats[main], start=s, end=e,
                 nested=sum(1 for j, (a, b) in enumerate(loops) if j != main and s <= a and b <= e))
        other = m["instr"] - m["tensor"]
        m["other_per_tensor"] = round(other / m["tensor_equiv"], 3) if m["tensor_equiv"] else None
        out["main"] = m
        # loops outside the main loop and not nested in another outer loop: run once per CTA by default
        outer = [(a, b) for a, b in loops if b < s or a > e]
        outer = [(a, b) for a, b in outer if not any(c <= a and b <= d and (c, d) != (a, b) for c, d in outer)]
        counts = [_counts([i for i in insts if a <= i[0] <= b]) for a, b in outer]
        out["other_outer_instr"] = sum(c["instr"] for c in counts)
        out["other_outer_tensor_equiv"] = round(sum(c["tensor_equiv"] for c in counts), 3)
    return out


# ----------------------------------------------------------------------------------------------
# PTX: lane-wise evaluation of shared-memory addresses
# ----------------------------------------------------------------------------------------------
class V:
    """An integer per lane plus a uniform symbolic part (``syms``: name -> coefficient)."""
    __slots__ = ("lanes", "syms")

    def __init__(self, lanes, syms=()):
        self.lanes = tuple(lanes)
        self.syms = tuple(sorted((k, c) for k, c in dict(syms).items() if c))

    @property
    def uniform(self) -> bool:
        return all(x == self.lanes[0] for x in self.lanes)

    @property
    def const(self) -> bool:
        return not self.syms


_fresh = itertools.count()


def _sym() -> V:
    return V([0] * LANES, {f"u{next(_fresh)}": 1})


def _lin(a: V, b: V, sign: int) -> V:
    syms = dict(a.syms)
    for k, c in b.syms:
        syms[k] = syms.get(k, 0) + sign * c
    return V([x + sign * y for x, y in zip(a.lanes, b.lanes)], syms)


def _scale(a: V, k: int) -> V:
    return V([x * k for x in a.lanes], {n: c * k for n, c in a.syms})


def _wrap(x: int, bits: int, signed: bool) -> int:
    x &= (1 << bits) - 1
    return x - (1 << bits) if signed and x >> (bits - 1) else x


def _typebits(op: str) -> Tuple[int, bool]:
    m = re.search(r"\.([usb])(8|16|32|64)\b", op)
    if not m:
        return 64, True
    return int(m.group(2)), m.group(1) == "s"


_BINOPS = {
    "and": lambda x, y: x & y, "or": lambda x, y: x | y, "xor": lambda x, y: x ^ y,
    "min": min, "max": max, "div": lambda x, y: int(x / y) if y else 0, "rem": lambda x, y: x % y if y else 0,
}
_CMP = {"eq": lambda x, y: x == y, "ne": lambda x, y: x != y, "lt": lambda x, y: x < y, "le": lambda x, y: x <= y,
        "gt": lambda x, y: x > y, "ge": lambda x, y: x >= y, "lo": lambda x, y: x < y, "ls": lambda x, y: x <= y,
        "hi": lambda x, y: x > y, "hs": lambda x, y: x >= y}


def _elementwise(op: str, args: List[V], fn) -> Optional[V]:
    if all(a.const for a in args):
        bits, signed = _typebits(op)
        return V([_wrap(fn(*xs), bits, signed) for xs in zip(*(a.lanes for a in args))])
    if all(a.uniform for a in args):
        return _sym()
    return None


def _split_operands(s: str) -> List[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


_INT = re.compile(r"^-?(0[xX][0-9a-fA-F]+|\d+)U?$")
_STMT = re.compile(r"^(@!?%\w+\s+)?([a-z][\w.:]*)\s*(.*?);?$")


class PtxEval:
    """Runs the integer arithmetic of one PTX entry for warp 0 (see the module docstring)."""

    def __init__(self):
        self.regs: Dict[str, Optional[V]] = {}

    def val(self, tok: str) -> Optional[V]:
        tok = tok.strip()
        if _INT.match(tok):
            return V([int(tok.rstrip("U"), 0)] * LANES)
        if tok in ("%tid.x", "%laneid"):
            return V(range(LANES))
        if tok in ("%tid.y", "%tid.z", "%warpid"):
            return V([0] * LANES)
        if tok.startswith("%"):
            if tok in self.regs:
                return self.regs[tok]
            return _sym() if re.match(r"%(n?ctaid|ntid|nctaid|clusterid|cluster_ctaid)", tok) else None
        if re.match(r"^[A-Za-z_$][\w$]*$", tok):  # a shared array / global symbol: a uniform base
            return V([0] * LANES, {"&" + tok: 1})
        return None

    def address(self, operand: str) -> Optional[V]:
        inner = operand.strip().strip("[]").replace(" ", "")
        parts = re.split(r"\+(?=[^+]*$)", inner) if "+" in inner else [inner]
        base = self.val(parts[0])
        if base is None:
            return None
        if len(parts) == 2:
            off = self.val(parts[1])
            return None if off is None else _lin(base, off, 1)
        return base

    def step(self, op: str, ops: List[str], pred: Optional[str]) -> None:
        """Execute one non-memory instruction (unknown results become None)."""
        if not ops or op.startswith(("st.", "bar", "bra", "ret", "cp.async", "mma", "wgmma", "red.", "fence", "membar")):
            return
        dst = ops[0]
        if dst.startswith("{"):
            for r in re.findall(r"%\w+", dst):
                self.regs[r] = None
            return
        res = self._compute(op, ops)
        for d in dst.split("|"):
            d = d.strip()
            if not d.startswith("%"):
                continue
            if pred is not None and d in self.regs and res is not None:
                p = self.val(pred.lstrip("!"))
                old = self.regs[d]
                if p is not None and p.const and old is not None and old.syms == res.syms:
                    neg = pred.startswith("!")
                    res = V([n if bool(c) != neg else o for n, o, c in zip(res.lanes, old.lanes, p.lanes)], res.syms)
            self.regs[d] = res if d == dst.split("|")[0].strip() else None

    def _compute(self, op: str, ops: List[str]) -> Optional[V]:
        base = op.split(".")[0]
        src = [self.val(o) for o in ops[1:]]
        if base == "ld":  # a load from a uniform address gives a uniform (unknown) value
            if ".param" in op:
                return _sym()
            a = self.address(ops[1]) if len(ops) > 1 and ops[1].startswith("[") else None
            return _sym() if a is not None and a.uniform else None
        if base in ("ldmatrix", "atom", "shfl", "vote", "activemask", "tex", "suld", "match"):
            return None
        if base in ("mov", "cvt", "cvta"):
            if len(ops) != 2 or ops[1].startswith("{") or (base == "cvt" and re.search(r"\.f(16|32|64)|bf16", op)):
                return None
            return src[0]
        if any(s is None for s in src):
            return None
        if base in ("add", "sub") and len(src) == 2:
            return _lin(src[0], src[1], 1 if base == "add" else -1)
        if base == "neg":
            return _scale(src[0], -1)
        if base in ("mul", "mad", "shl"):
            a, b = src[0], src[1]
            if base == "shl":
                if not (b.const and b.uniform):
                    return None
                b = V([1 << b.lanes[0]] * LANES)
            if a.const and a.uniform:
                a, b = b, a
            if b.const and b.uniform:
                prod = _scale(a, b.lanes[0])
            elif a.const and b.const:
                prod = V([x * y for x, y in zip(a.lanes, b.lanes)])
            elif a.uniform and b.uniform:
                prod = _sym()
            else:
                return None
            if ".hi" in op:
                return _elementwise(op, [a, b], lambda x, y: (x * y) >> 32) if a.const and b.const else (
                    _sym() if a.uniform and b.uniform else None)
            return _lin(prod, src[2], 1) if base == "mad" else prod
        if base == "shr":
            return _elementwise(op, src, lambda x, y: x >> y)
        if base in _BINOPS:
            return _elementwise(op, src, _BINOPS[base])
        if base == "not":
            return _elementwise(op, src, lambda x: ~x)
        if base == "bfe":
            return _elementwise(op, src, lambda x, p, n: (x >> p) & ((1 << n) - 1))
        if base == "bfi":  # insert the low `n` bits of x at bit p of y
            return _elementwise(op, src, lambda x, y, p, n: (y & ~(((1 << n) - 1) << p)) | ((x << p) & (((1 << n) - 1) << p)))
        if base == "setp":
            cmp = op.split(".")[1]
            if cmp not in _CMP:
                return None
            d = _lin(src[0], src[1], -1)
            if not d.const:
                return _sym() if src[0].uniform and src[1].uniform else None
            return V([int(_CMP[cmp](x, y)) for x, y in zip(src[0].lanes, _lin(src[0], d, -1).lanes)])
        if base == "selp" and len(src) == 3:
            a, b, p = src
            if not p.const:
                return a if (a.lanes, a.syms) == (b.lanes, b.syms) else None
            if a.syms != b.syms:
                return None
            return V([x if c else y for x, y, c in zip(a.lanes, b.lanes, p.lanes)], a.syms)
        if base == "abs":
            return _elementwise(op, src, abs)
        return _elementwise(op, src, lambda *xs: 0) if all(s.uniform for s in src) else None


def wavefronts(addrs: List[Optional[int]], nbytes: int, phase_lanes: Optional[int] = None) -> Tuple[int, int]:
    """(wavefronts, ideal) of one warp access: lane byte addresses (None: inactive lane), bytes per lane."""
    if phase_lanes is None:
        phase_lanes = 32 if nbytes <= 4 else (16 if nbytes == 8 else 8)
    waves = ideal = 0
    for p in range(0, LANES, phase_lanes):
        words = set()
        for a in addrs[p:p + phase_lanes]:
            if a is not None:
                words.update(range(a // 4, (a + max(nbytes, 4) - 1) // 4 + 1) if nbytes >= 4 else [a // 4])
        if not words:
            continue
        per_bank: Dict[int, int] = {}
        for w in words:
            per_bank[w % 32] = per_bank.get(w % 32, 0) + 1
        waves += max(per_bank.values())
        ideal += 1
    return waves, ideal


def _access(op: str, ops: List[str]) -> Optional[Tuple[str, int, Optional[int], int]]:
    """(address operand, bytes per lane, lanes per phase, lanes used) of a shared-memory access."""
    if op.startswith(("ldmatrix", "stmatrix")):
        x = int(re.search(r"\.x(\d)", op).group(1))
        addr = ops[1] if op.startswith("ldmatrix") else ops[0]
        return addr, 16, 8, 8 * x
    if op.startswith("cp.async") and ".shared" in op and "bulk" not in op:
        size = int(ops[2], 0) if len(ops) > 2 and _INT.match(ops[2]) else 16
        return ops[0], size, None, LANES
    if ".shared" not in op or not op.startswith(("ld.", "st.", "atom.", "red.")):
        return None
    vec = int(re.search(r"\.v(\d)", op).group(1)) if re.search(r"\.v\d", op) else 1
    bits, _ = _typebits(op)
    if re.search(r"\.f16x2|\.bf16x2", op):
        bits = 32
    elif re.search(r"\.f(16|32|64)\b|\.bf16\b", op):
        bits = int(re.search(r"(16|32|64)", op.split(".")[-1]).group(1))
    addr = ops[0] if op.startswith(("st.", "red.")) else ops[1]
    return addr, vec * bits // 8, None, LANES


def _wgmma_bytes(op: str, ops: List[str]) -> int:
    """Shared-memory operand bytes one warp's share of a wgmma reads (A via a descriptor, and B)."""
    m = re.search(r"m(\d+)n(\d+)k(\d+)", op)
    if not m:
        return 0
    M, N, K = (int(g) for g in m.groups())
    el = 1 if re.search(r"e4m3|e5m2|\.s8|\.u8", op) else (4 if "tf32" in op else 2)
    a_desc = len(ops) > 1 and not ops[1].startswith("{")
    return ((M * K * el if a_desc else 0) + N * K * el) // 4


def _ptx_statements(ptx: str) -> List[Tuple[str, Optional[str], str, List[str]]]:
    """(kind, pred, opcode, operands) with kind "label" or "inst", in order."""
    out = []
    for raw in ptx.splitlines():
        line = raw.split("//")[0].strip()
        if not line or line in ("{", "}") or line.startswith("."):
            continue
        if re.match(r"^[$\w]+:$", line):
            out.append(("label", None, line[:-1], []))
            continue
        m = _STMT.match(line)
        if not m:
            continue
        pred = m.group(1).strip()[1:] if m.group(1) else None
        out.append(("inst", pred, m.group(2), _split_operands(m.group(3))))
    return out


def ptx_facts(ptx: str) -> dict:
    """Shared-memory wavefronts (whole kernel and main loop), async copies, tensor ops and loops of one
    PTX entry."""
    stmts = _ptx_statements(ptx)
    ev = PtxEval()
    labels = {s[2]: i for i, s in enumerate(stmts) if s[0] == "label"}
    accesses = []  # (index, op, wavefronts, ideal) ; wavefronts None = unknown
    loops, waits, cp_async, mma, gmem = [], [], [], [], []
    for i, (kind, pred, op, ops) in enumerate(stmts):
        if kind != "inst":
            continue
        if op.startswith("bra") and ops and ops[0] in labels and labels[ops[0]] < i:
            loops.append((labels[ops[0]], i))
        if op.startswith("cp.async.wait_group"):
            waits.append(int(ops[0], 0) if ops and _INT.match(ops[0]) else 0)
        if op.startswith(("mma.sync", "wgmma.mma_async")):
            mma.append(i)
        if op.startswith(("ld.global", "st.global")) or (op.startswith("cp.async") and "global" in op):
            gmem.append(i)
        if op.startswith("cp.async") and ".shared" in op and "bulk" not in op:
            cp_async.append(i)
        if op.startswith("wgmma.mma_async"):
            b = _wgmma_bytes(op, ops)
            w = -(-b // 128)
            accesses.append((i, op, w, w))
        acc = _access(op, ops)
        if acc is not None:
            addr_op, nbytes, phase, used = acc
            a = ev.address(addr_op)
            if a is None:
                accesses.append((i, op, None, None))
            else:
                p = ev.val(pred.lstrip("!")) if pred else None
                active = [True] * LANES
                if p is not None and p.const:
                    active = [bool(c) != pred.startswith("!") for c in p.lanes]
                lanes = [x if (j < used and active[j]) else None for j, x in enumerate(a.lanes)]
                if any(x is not None for x in lanes):
                    accesses.append((i, op, *wavefronts(lanes, nbytes, phase)))
        ev.step(op, ops, pred)

    def summary(lo, hi):
        sel = [a for a in accesses if lo <= a[0] <= hi]
        known = [a for a in sel if a[2] is not None]
        worst = sorted((a for a in known if a[2] > a[3]), key=lambda a: a[3] - a[2])[:3]
        return {"accesses": len(sel), "unknown": len(sel) - len(known), "wavefronts": sum(a[2] for a in known),
                "ideal": sum(a[3] for a in known),
                "worst": [f"{a[1]} @{a[0]}: {a[2]}/{a[3]}" for a in worst]}

    by_start: Dict[int, int] = {}
    for s, e in loops:
        by_start[s] = max(by_start.get(s, e), e)
    loops = sorted(by_start.items())

    def count(idx, lo, hi):
        return sum(1 for j in idx if lo <= j <= hi)
    main = None
    for key in (mma, gmem):
        cands = [(count(key, s, e), e - s, (s, e)) for s, e in loops if count(key, s, e)]
        if cands:
            main = max(cands)[2]
            break
    outer = [(a, b) for a, b in loops if main and (b < main[0] or a > main[1])]
    outer = [(a, b) for a, b in outer if not any(c <= a and b <= d and (c, d) != (a, b) for c, d in outer)]
    other = {"accesses": 0, "unknown": 0, "wavefronts": 0, "ideal": 0}
    for a, b in outer:
        part = summary(a, b)
        for k in other:
            other[k] += part[k]
    out = {"kernel": summary(0, len(stmts)), "main": summary(*main) if main else None, "other_outer": other,
           "cp_async": len(cp_async), "cp_async_main": count(cp_async, *main) if main else 0,
           "wait_group_max": max(waits) if waits else None}
    return out


def kernel_facts(sass: Optional[str], ptx: Optional[str]) -> dict:
    """Everything the throughput model reads from one kernel's SASS and PTX (either may be missing)."""
    out = {"version": FACTS_VERSION}
    if sass:
        out["sass"] = sass_facts(sass)
    if ptx:
        try:
            out["ptx"] = ptx_facts(ptx)
        except Exception as e:  # noqa: BLE001 - an unparsable PTX is a missing fact, never a crash
            out["ptx"] = {"error": f"{type(e).__name__}: {e}"}
    return out
