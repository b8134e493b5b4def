"""What CI holds the kernels to, and what ``auto`` should do, from ``bench.perf_model``'s facts and
predictions: per-kernel budgets (``bench/perf_budgets.json``) and the per-generation backend order."""
from __future__ import annotations

import math
import re
from typing import Dict, List, Tuple

from bench import perf_launches as PL
from bench import perf_model as PM

# ----------------------------------------------------------------------------------------------
# budgets: what CI holds every modelled kernel to
# ----------------------------------------------------------------------------------------------
def kernel_summary(rec: dict) -> dict:
    """The budgeted facts of one kernel build."""
    f = rec.get("facts") or {}
    sass, ptx = f.get("sass") or {}, f.get("ptx") or {}
    main = sass.get("main") or {}
    pm, pk = ptx.get("main") or {}, ptx.get("kernel") or {}
    return {"main_instr": main.get("instr"), "main_tensor_equiv": main.get("tensor_equiv"),
            "other_per_tensor": main.get("other_per_tensor"), "async_main": (main.get("ldgsts", 0) + main.get("tma", 0))
            if main else 0, "stages": PM.stages_of(rec), "bar_main": main.get("bar"),
            "smem_wavefronts": pk.get("wavefronts"), "smem_ideal": pk.get("ideal"), "smem_accesses": pk.get("accesses"),
            "smem_unknown": pk.get("unknown"), "smem_main": f"{pm.get('wavefronts')}/{pm.get('ideal')}" if pm else None,
            "conflicts": round(pk["wavefronts"] / pk["ideal"], 3) if pk.get("ideal") else 1.0,
            "worst": pk.get("worst", []), "regs": rec.get("regs"), "blocks_per_sm": rec.get("blocks_per_sm"),
            "instr": sass.get("total", {}).get("instr")}


def short_name(name: str) -> str:
    """A CUDA instance's demangled name without ``void`` and the argument list; Triton names as they are."""
    return re.sub(r"^void\s+", "", re.sub(r"\(.*\)$", "", name))


def modelled_kernels(model: "PM.Model") -> Dict[Tuple[str, str], dict]:
    """(arch, name) -> record of every kernel a launch model uses at the BERT workloads."""
    out = {}
    for _, _, sh in PM.workloads():
        for gpu in (PM.GPUS["H100"], PM.GPUS["A100"]):
            for be in PM.BACKENDS:
                for p in PM.op_passes(sh.op):
                    for la in PL.launches(sh, p, be, gpu.arch, model.tree, gpu.sms):
                        r = model.record(la, gpu.arch)
                        if la.source != "torch":
                            out[(gpu.arch, short_name(r["name"]) if r else la.kernel)] = r
    return out


def make_budgets(kernels: Dict[Tuple[str, str], dict]) -> dict:
    """Budgets from today's facts: +10% instructions, no new bank conflicts, async copies and stages kept."""
    out = {}
    for (arch, name), r in sorted(kernels.items()):
        if r is None:
            continue
        s = kernel_summary(r)
        b = {"max_conflicts": s["conflicts"]}
        if s["main_instr"]:
            b["max_main_instr"] = math.ceil(1.1 * s["main_instr"])
        if s["other_per_tensor"]:
            b["max_other_per_tensor"] = round(1.1 * s["other_per_tensor"], 2)
        if s["async_main"]:
            b["min_async_main"] = 1
            b["min_stages"] = s["stages"]
        out[f"{arch} {name}"] = b
    return out


def check_budgets(kernels: Dict[Tuple[str, str], dict], budgets: dict) -> List[str]:
    bad = []
    for (arch, name), r in sorted(kernels.items()):
        key = f"{arch} {name}"
        if r is None:
            bad.append(f"{key}: no compile record (it failed to compile, or the launch model names a kernel "
                       "that does not exist)")
            continue
        b = budgets.get(key)
        if b is None:
            bad.append(f"{key}: no budget in bench/perf_budgets.json (add it: python -m bench.perf_model "
                       "--write-budgets, and review the diff)")
            continue
        s = kernel_summary(r)
        if s["conflicts"] > b.get("max_conflicts", 1.0) + 1e-9:
            bad.append(f"{key}: shared-memory bank conflicts {s['conflicts']:.2f} wavefronts per ideal > budget "
                       f"{b['max_conflicts']:.2f} (worst: {'; '.join(s['worst'])})")
        if "max_main_instr" in b and (s["main_instr"] or 0) > b["max_main_instr"]:
            bad.append(f"{key}: main loop has {s['main_instr']} instructions > budget {b['max_main_instr']}")
        if "max_other_per_tensor" in b and (s["other_per_tensor"] or 0) > b["max_other_per_tensor"]:
            bad.append(f"{key}: {s['other_per_tensor']} other instructions per tensor-core op in the main loop > "
                       f"budget {b['max_other_per_tensor']}")
        if b.get("min_async_main") and s["async_main"] < b["min_async_main"]:
            bad.append(f"{key}: the main loop lost its async copies (cp.async / TMA): {s['async_main']} left")
        if b.get("min_stages") and s["stages"] < b["min_stages"]:
            bad.append(f"{key}: pipeline depth {s['stages']} < budget {b['min_stages']} stages")
    return bad


# ----------------------------------------------------------------------------------------------
# the auto order the predictions imply
# ----------------------------------------------------------------------------------------------
FAMILIES = {"attention": ("attention",), "layer_norm": ("layer_norm", "layer_norm+residual"),
            "bias_gelu": ("bias_gelu",), "geglu": ("geglu",), "padding": ("unpad", "pad"), "mlm_loss": ("mlm_loss",)}
GENERATIONS = {"sm_90": "H100", "sm_80": "A100"}  # the GPU whose predictions decide each generation
TIE = 0.05  # within 5%: keep the hand-written CUDA kernels first (no evidence either way)


def auto_decisions(preds: List[dict]) -> Dict[str, Dict[str, dict]]:
    """Per generation and family: backends ordered by total predicted time (fwd + bwd over the BERT
    workloads), with the reason."""
    out: Dict[str, Dict[str, dict]] = {}
    for gen, g in GENERATIONS.items():
        out[gen] = {}
        for fam, ops in FAMILIES.items():
            tot = {be: sum(r["us"] for r in preds if r["gpu"] == g and r["op"] in ops and r["backend"] == be
                           and r["us"] is not None) for be in PM.BACKENDS}
            fast, slow = sorted(PM.BACKENDS, key=lambda b: tot[b])
            ratio = tot[slow] / tot[fast] if tot[fast] else 1.0
            if ratio < 1 + TIE:
                order = ("cuda", "triton", "torch")
                why = (f"perf model: cuda and triton within {TIE:.0%} on {g} ({ratio:.2f}x): hand-written CUDA "
                       "kept first")
            else:
                order = (fast, slow, "torch")
                why = f"perf model: {fast} predicted {ratio:.2f}x faster than {slow} on {g}"
            out[gen][fam] = {"order": order, "ratio": round(ratio, 3), "total_us": tot,
                             "reason": why + " (fwd+bwd, BERT base/large, seq 128/512; static prediction, not "
                                             "yet calibrated; bench/results/perf-model.md)"}
    return out
