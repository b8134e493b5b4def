"""Read what the tools of a GPU run print: the first error of a build log, compute-sanitizer reports (per
kernel and per driver case), ncu's CSV (registers, shared memory, occupancy per kernel, joined with the
compile report's prediction) and the JSON Lines that ``bench.gpu_plugin`` writes. Pure text processing,
tested on recorded outputs (``tests/fixtures/gpu_run/``)."""
from __future__ import annotations

import csv
import io
import re
from collections import Counter, defaultdict
from typing import Dict, List, Optional

from bench.compile_report import LIMITS, occupancy, template_base

# ---------------------------------------------------------------------------------------------------
# build log
# ---------------------------------------------------------------------------------------------------
_ERR = [re.compile(p) for p in (
    r"\(\d+\): (?:catastrophic )?error\b",        # nvcc: file.cu(12): error: ...
    r":\d+(?::\d+)?: (?:fatal )?error\b",           # gcc/clang: file.cpp:12:5: error: ...
    r"\berror: ",                                   # ld / generic
    r"undefined reference to|cannot find -l",
    r"^FAILED: ",                                   # ninja
    r"^(?:RuntimeError|OSError|ImportError|ModuleNotFoundError|subprocess\.CalledProcessError)\b",
)]


def first_build_error(log: str, context: int = 12) -> Optional[str]:
    """The first line of ``log`` that reports an error, by priority (a compiler's own message before
    ninja's ``FAILED:`` and Python's traceback), with up to ``context`` lines after it; None if none."""
    lines = log.splitlines()
    for pat in _ERR:
        for i, ln in enumerate(lines):
            if pat.search(ln):
                return "\n".join(lines[i:i + context])
    return None


# ---------------------------------------------------------------------------------------------------
# kernel names
# ---------------------------------------------------------------------------------------------------
def _demangle_nested(name: str) -> Optional[str]:
    """``_ZN2fb4attn22flash_attn_fwd_kernel...`` -> ``fb::attn::flash_attn_fwd_kernel`` (names only)."""
    m = re.match(r"_ZN?(.*)", name)
    if not m or not name.startswith("_Z"):
        return None
    s, parts = m.group(1), []
    while s and s[0].isdigit():
        n = re.match(r"\d+", s).group(0)
        parts.append(s[len(n):len(n) + int(n)])
        s = s[len(n) + int(n):]
    return "::".join(parts) or None


def kernel_base(name: str) -> str:
    """A kernel's name without return type, template arguments, parameters and ``+0x..`` offset:
    ``void fb::attn::flash_attn_fwd_kernel<64, bf16>(fb::attn::Params)+0x1a0`` -> ``fb::attn::flash_attn_fwd_kernel``."""
    name = re.sub(r"\+0x[0-9a-fA-F]+$", "", name.strip())
    if name.startswith("_Z"):
        return _demangle_nested(name) or name
    return template_base(name) or name


def instance_key(name: str) -> str:
    """A kernel instance without return type and parameters, spaces removed: ``fb::k<__half,8>``. The
    parameter lists are left out because demanglers differ there (``const T *`` vs ``T const*``)."""
    name = re.sub(r"^void\s+", "", name.strip())
    depth = 0
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            name = name[:i]
            break
    return re.sub(r"\s+", "", name)


# ---------------------------------------------------------------------------------------------------
# compute-sanitizer
# ---------------------------------------------------------------------------------------------------
_AT_NEW = re.compile(r"\bat (?P<fn>.+?)\+0x[0-9a-fA-F]+(?: in (?P<loc>\S+))?")
_AT_OLD = re.compile(r"\bat 0x[0-9a-fA-F]+ in (?P<loc>[^:\s]+:\d+):(?P<fn>.+?)(?: \[\d+ hazards?\])?$")
_HAZ = re.compile(r"\[(\d+) hazards?\]")
_ERR_SUM = re.compile(r"ERROR SUMMARY: (\d+) errors?")
_RACE_SUM = re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)")
_MARK = re.compile(r"^FB-CASE(?:-(OK|NA|FAIL))? (\S+)(?: (.*))?$")
_DONE = re.compile(r"^FB-DRIVER-DONE ok=(\d+) na=(\d+) fail=(\d+)")
_IGNORE = ("COMPUTE-SANITIZER", "Target application returned", "Internal debug", "Note:")


def parse_sanitizer(text: str, tool: str) -> dict:
    """Errors per kernel and per driver case from one compute-sanitizer run over
    ``bench.sanitize_driver`` (both the ``at fn+0x.. in file:line`` layout of current versions and the
    older ``at 0x.. in file:line:fn``). ``complete`` says whether the tool printed its summary."""
    records, case, cur = [], None, None
    summary: Dict[str, int] = {}
    cases: Dict[str, dict] = {}
    done = None
    for raw in text.splitlines():
        if not raw.startswith("========="):
            m = _MARK.match(raw.strip())
            if m:
                status, name, detail = m.groups()
                if status is None:
                    case = name
                    cases.setdefault(name, {"status": "started"})
                else:
                    cases[name] = {"status": status.lower(), "detail": detail or ""}
            d = _DONE.match(raw.strip())
            if d:
                done = dict(zip(("ok", "na", "fail"), map(int, d.groups())))
            continue
        body = raw[len("========="):]
        content = body.strip()
        if not content:
            cur = None
            continue
        s = _ERR_SUM.search(content)
        r = _RACE_SUM.search(content)
        if s or r:
            if s:
                summary["errors"] = int(s.group(1))
            if r:
                summary.update(displayed=int(r.group(1)), errors=int(r.group(2)), warnings=int(r.group(3)))
            cur = None
            continue
        if body.startswith((" ", "\t")) and body[1:2] in (" ", "\t") and cur is not None:
            cur["lines"].append(content)       # a continuation (indented under its header)
            continue
        if content.startswith(_IGNORE):
            cur = None
            continue
        sev = "warning" if content.lower().startswith("warning") else "error"
        cur = {"severity": sev, "header": content, "lines": [], "case": case}
        records.append(cur)
    per_kernel: Dict[str, Counter] = defaultdict(Counter)
    per_case: Dict[str, Counter] = defaultdict(Counter)
    for rec in records:
        fn = None
        for ln in [rec["header"]] + rec["lines"]:
            m = _AT_NEW.search(ln) or _AT_OLD.search(ln)
            if m:
                fn = m.group("fn")
                break
        rec["kernel_full"] = fn
        rec["kernel"] = kernel_base(fn) if fn else "(no kernel: host/API)"
        rec["hazards"] = sum(int(h) for ln in [rec["header"]] + rec["lines"] for h in _HAZ.findall(ln))
        for tgt, key in ((per_kernel, rec["kernel"]), (per_case, rec["case"] or "(before any case)")):
            tgt[key][rec["severity"] + "s"] += 1
            tgt[key]["hazards"] += rec["hazards"]
    return {"tool": tool, "summary": summary or None, "complete": bool(summary), "driver_done": done,
            "records": [{k: v for k, v in r.items() if k != "lines"} | {"detail": r["lines"][:6]} for r in records[:200]],
            "n_records": len(records), "per_kernel": {k: dict(v) for k, v in per_kernel.items()},
            "per_case": {k: dict(v) for k, v in per_case.items()}, "cases": cases}


# ---------------------------------------------------------------------------------------------------
# ncu
# ---------------------------------------------------------------------------------------------------
NCU_METRICS = ("launch__registers_per_thread", "launch__block_size", "launch__grid_size",
               "launch__shared_mem_per_block_static", "launch__shared_mem_per_block_dynamic",
               "sm__maximum_warps_per_active_cycle_pct", "sm__warps_active.avg.pct_of_peak_sustained_active",
               "launch__occupancy_limit_registers", "launch__occupancy_limit_shared_mem", "gpu__time_duration.sum")


# The same quantities under their section display names (``--section LaunchStats/Occupancy/SpeedOfLight``).
NCU_ALIASES = {"Registers Per Thread": "launch__registers_per_thread", "Block Size": "launch__block_size",
               "Grid Size": "launch__grid_size", "Static Shared Memory Per Block": "launch__shared_mem_per_block_static",
               "Dynamic Shared Memory Per Block": "launch__shared_mem_per_block_dynamic",
               "Theoretical Occupancy": "sm__maximum_warps_per_active_cycle_pct",
               "Achieved Occupancy": "sm__warps_active.avg.pct_of_peak_sustained_active",
               "Block Limit Registers": "launch__occupancy_limit_registers",
               "Block Limit Shared Mem": "launch__occupancy_limit_shared_mem", "Duration": "gpu__time_duration.sum"}
_TIME_NS = {"nsecond": 1.0, "ns": 1.0, "usecond": 1e3, "us": 1e3, "msecond": 1e6, "ms": 1e6, "second": 1e9}
_BYTES = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "KB": 1e3, "KiB": 1024, "MB": 1e6}


def _num(v: str):
    try:
        return float(v.replace(",", ""))
    except (AttributeError, ValueError):
        return v


def parse_ncu_csv(text: str) -> List[dict]:
    """Kernel launches from ``ncu --csv --metrics ...`` (one row per metric): ``[{id, kernel, block,
    grid, metrics: {name: value}}]``, the last launch of each (kernel, grid, block) kept."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"ID",')), None)
    if start is None:
        return []
    launches: Dict[str, dict] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        if not row.get("ID") or not row.get("Metric Name"):
            continue
        rec = launches.setdefault(row["ID"], {"id": row["ID"], "kernel": row.get("Kernel Name", ""),
                                              "block": row.get("Block Size", ""), "grid": row.get("Grid Size", ""),
                                              "metrics": {}})
        name = NCU_ALIASES.get(row["Metric Name"], row["Metric Name"])
        val, unit = _num(row.get("Metric Value", "")), (row.get("Metric Unit") or "").strip()
        if isinstance(val, float) and name == "gpu__time_duration.sum":
            val *= _TIME_NS.get(unit, 1.0)
        elif isinstance(val, float) and name.startswith("launch__shared_mem"):
            val *= _BYTES.get(unit, 1.0)
        rec["metrics"][name] = val
    last = {}
    for rec in launches.values():
        last[(rec["kernel"], rec["grid"], rec["block"])] = rec
    return list(last.values())


def arch_of(capability: str) -> str:
    major = int(str(capability).split(".")[0])
    return "sm_90a" if major >= 9 else "sm_80"


def compare_occupancy(launches: List[dict], report: dict, capability: str) -> List[dict]:
    """Each measured launch next to the compile report's prediction for the same kernel instance
    (CUDA: same template instance; Triton: same kernel and block size, registers closest): registers, shared
    memory, warps per SM (predicted vs ncu's theoretical) and ncu's achieved occupancy."""
    arch = arch_of(capability)
    warps_max = ((report.get("meta") or {}).get("limits") or {}).get(arch, {}).get("warps_per_sm", 64)
    kernels = [k for k in report.get("kernels", []) if k.get("arch") == arch]
    rows = []
    for ln in launches:
        m = ln["metrics"]
        regs = m.get("launch__registers_per_thread")
        block = m.get("launch__block_size")
        key, base = instance_key(ln["kernel"]), kernel_base(ln["kernel"])
        if "<" in key:   # a CUDA template instance: its launch block can be smaller than __launch_bounds__
            cands = [k for k in kernels if k.get("source") == "cuda" and instance_key(k.get("name", "")) == key]
        else:            # a Triton kernel: one entry per launch config; the block size tells them apart
            cands = [k for k in kernels if k.get("kernel") == base and (not block or k.get("threads") == block)]
        pred = min(cands, key=lambda k: abs((k.get("regs") or 0) - (regs or 0))) if cands else None
        theo = m.get("sm__maximum_warps_per_active_cycle_pct")
        smem = sum(v for v in (m.get("launch__shared_mem_per_block_static"), m.get("launch__shared_mem_per_block_dynamic"))
                   if isinstance(v, float))
        rows.append({
            "kernel": ln["kernel"], "base": base, "grid": ln["grid"], "block": ln["block"],
            "regs": regs, "smem_bytes": smem, "theoretical_warps": (theo / 100 * warps_max) if isinstance(theo, float) else None,
            "achieved_pct": m.get("sm__warps_active.avg.pct_of_peak_sustained_active"),
            "time_us": (m["gpu__time_duration.sum"] / 1e3) if isinstance(m.get("gpu__time_duration.sum"), float) else None,
            "pred_name": pred.get("name") if pred else None, "pred_config": pred.get("config") if pred else None,
            "pred_regs": pred.get("regs") if pred else None, "pred_smem_bytes": pred.get("smem_total") if pred else None,
            "pred_warps_report": pred.get("warps_per_sm") if pred else None, "pred_limiter": pred.get("limiter") if pred else None,
            # the report's model (registers, shared memory) at the block size this launch really used
            "pred_warps": occupancy(arch, pred.get("regs") or 1, pred.get("smem_total") or 0, int(block))["warps_per_sm"]
            if pred and isinstance(block, float) and arch in LIMITS else None,
            "candidates": len(cands)})
    return rows


# ---------------------------------------------------------------------------------------------------
# bench.gpu_plugin records
# ---------------------------------------------------------------------------------------------------
def read_jsonl(path: str) -> List[dict]:
    """The records so far (a line cut by a kill is dropped)."""
    from train.utils import read_metrics  # the same JSON Lines reader the training metrics use
    return read_metrics(path)


def summarize_tests(records: List[dict]) -> dict:
    """Counts per outcome, the failures (test id + message), the skip reasons and collection errors."""
    outs = [r for r in records if r.get("rec") == "outcome"]
    counts = Counter(r["outcome"] for r in outs)
    reasons = Counter(r.get("message", "")[:160] for r in outs if r["outcome"] == "skipped")
    return {"counts": dict(counts), "n": len(outs),
            "failures": [{"nodeid": r["nodeid"], "outcome": r["outcome"], "message": r.get("message", "")[:1000]}
                         for r in outs if r["outcome"] in ("failed", "error")],
            "skip_reasons": dict(reasons.most_common(12)),
            "collect_errors": [r for r in records if r.get("rec") == "collect-error"],
            "collected": next((r.get("n") for r in records if r.get("rec") == "collected"), None),
            "test_seconds": round(sum(r.get("duration", 0) for r in outs), 1)}
