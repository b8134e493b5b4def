"""Markdown and console views of ``bench.perf_model``'s results (every number a prediction)."""
from __future__ import annotations

from typing import Dict, List, Optional

OPS = ("attention", "layer_norm+residual", "layer_norm", "bias_gelu", "geglu", "unpad", "pad", "mlm_loss")


def _us(v, digits=1) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.{digits}f}"


def _index(preds: List[dict]) -> Dict[tuple, dict]:
    return {(r["size"], r["seq"], r["op"], r["pass"], r["backend"], r["gpu"]): r for r in preds}


def constants_md(meta: dict) -> List[str]:
    c = meta["constants"]
    lines = ["| GPU | arch | SMs | SM clock GHz | HBM TB/s | HMMA.16816 / clk / SM | issue / clk / SM | shared B / clk / SM |",
             "|---|---|---|---|---|---|---|---|"]
    for g in c["gpus"].values():
        lines.append(f"| {g['name']} | {g['arch']} | {g['sms']} | {g['clock_ghz']} | {g['hbm_tbs']} | "
                     f"{g['hmma_per_clk']} | {c['issue_per_clk']} | {128 * c['smem_wavefronts_per_clk']} |")
    lines.append("")
    lines.append(f"Assumed (to be calibrated): global-memory latency {c['mem_latency_clk']} clocks, "
                 f"{c['launch_us']} us per launch, cuBLAS at {c['gemm_efficiency']:.0%} of the dense tensor peak.")
    return lines


def kernels_md(kernels: Dict[str, Optional[dict]]) -> List[str]:
    lines = ["| kernel (arch) | regs | CTAs/SM | main-loop instr | tensor ops (HMMA.16816-eq) | other / tensor op | "
             "async copies / iter, stages | barriers / iter | smem accesses: wavefronts / ideal (conflicts) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, s in kernels.items():
        if s is None:
            lines.append(f"| {key} | - | - | - | - | - | - | - | no compile record |")
            continue
        arch, name = key.split(" ", 1)
        name = name.replace("__nv_bfloat16", "bf16").replace("void ", "")
        smem = (f"{s.get('smem_accesses')}: {s['smem_wavefronts']}/{s['smem_ideal']} ({s['conflicts']:.2f}x)"
                if s.get("smem_ideal") else "-")
        if s.get("smem_unknown"):
            smem += f", {s['smem_unknown']} unresolved"
        lines.append(f"| {name} ({arch}) | {s['regs']} | {s['blocks_per_sm']} | {s['main_instr'] or '-'} | "
                     f"{s['main_tensor_equiv'] or '-'} | {s['other_per_tensor'] or '-'} | "
                     f"{s['async_main']}, {s['stages']} | {s['bar_main'] if s['bar_main'] is not None else '-'} | {smem} |")
    return lines


def predictions_md(preds: List[dict]) -> List[str]:
    idx = _index(preds)
    out = []
    for size in ("base", "large"):
        for seq in (128, 512):
            any_row = next((r for r in preds if r["size"] == size and r["seq"] == seq and r["op"] == "attention"), None)
            if any_row is None:
                continue
            out += [f"### BERT-{size}, seq {seq} (attention {any_row['shape']})", "",
                    "| op | pass | CUDA H100 us (bound) | Triton H100 us (bound) | CUDA H200 us | Triton H200 us | "
                    "limit H100 / H200 us |", "|---|---|---|---|---|---|---|"]
            for op in OPS:
                for p in ("fwd", "bwd", "fwdbwd"):
                    c, t = idx.get((size, seq, op, p, "cuda", "H100")), idx.get((size, seq, op, p, "triton", "H100"))
                    c2, t2 = idx.get((size, seq, op, p, "cuda", "H200")), idx.get((size, seq, op, p, "triton", "H200"))
                    if not c:
                        continue
                    lim = f"{_us(c['memory_limit_us'])} / {_us(c2['memory_limit_us'])} " + (
                        "(GEMMs at peak)" if op == "mlm_loss" else "(memory)")
                    if op == "attention" and c.get("published_us"):
                        pub = c["published_us"]
                        lim = f"FA2 {_us(pub['FA2'])}, FA3 {_us(pub['FA3'])} (published rates, H100); " + lim
                    out.append(f"| {op} | {p} | {_us(c['us'])} ({c['bound']}) | {_us(t['us'])} ({t['bound']}) | "
                               f"{_us(c2['us'])} | {_us(t2['us'])} | {lim} |")
            out.append("")
    return out


def launches_md(preds: List[dict], size="base", seq=128, gpu="H100") -> List[str]:
    lines = [f"Launches at BERT-{size}, seq {seq} on {gpu} (bound: the largest of issue / tensor / smem / HBM; "
             "`latency`: exposed memory latency of synchronous loads; `waves/latency`: tails and latency):", "",
             "| op | pass | backend | launch | CTAs | waves | us | bound | HBM MB (ideal MB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in preds:
        if (r["size"], r["seq"], r["gpu"]) != (size, seq, gpu):
            continue
        for la in r["launches"]:
            mult = f" x{la['n']}" if la.get("n", 1) > 1 else ""
            lines.append(f"| {r['op']} | {r['pass']} | {r['backend']} | {la['name']}{mult} | {la['ctas'] or '-'} | "
                         f"{la['waves'] if la['waves'] is not None else '-'} | {_us(la['us'])} | {la['bound']} | "
                         f"{la['hbm_MB']:.1f} ({la['ideal_MB']:.1f}) |")
    return lines


def baseline_md(res: dict, base: dict) -> List[str]:
    cur, old = _index(res["predictions"]), _index(base["predictions"])
    lines = [f"Predicted H100 time, baseline `{base['meta']['tree']}` -> this tree (us; ratio < 1: faster). "
             "Only rows that moved by more than 2% are listed.", "",
             "| op | pass | backend | size, seq | before | after | after / before |", "|---|---|---|---|---|---|---|"]
    n = 0
    for key, r in cur.items():
        size, seq, op, p, be, gpu = key
        o = old.get(key)
        if gpu != "H100" or not o or not r["us"] or not o["us"]:
            continue
        ratio = r["us"] / o["us"]
        if abs(ratio - 1) > 0.02:
            n += 1
            lines.append(f"| {op} | {p} | {be} | {size}, {seq} | {_us(o['us'])} | {_us(r['us'])} | {ratio:.2f} |")
    if not n:
        lines.append("| (no prediction moved by more than 2%) | | | | | | |")
    return lines


def auto_md(auto: dict) -> List[str]:
    lines = ["| generation | family | auto order | faster by | reason |", "|---|---|---|---|---|"]
    for gen, fams in auto.items():
        for fam, d in fams.items():
            lines.append(f"| {gen} | {fam} | {' > '.join(d['order'])} | {d['ratio']:.2f}x | {d['reason']} |")
    return lines


def calibration_md(cal: Optional[dict]) -> List[str]:
    if not cal:
        return ["(not computed for this tree)"]
    lines = [cal["note"]]
    if cal.get("by_op"):
        lines += ["", "| op | rows | median measured / predicted | median abs log2 error |", "|---|---|---|---|"]
        for op, s in sorted(cal["by_op"].items()):
            lines.append(f"| {op} | {s['rows']} | {s['median_ratio']:.2f} | {s['median_abs_log2_error']:.2f} |")
    return lines


def markdown(res: dict, baseline: Optional[dict]) -> str:
    m = res["meta"]
    out = [f"# Static throughput model: predictions, not measurements", "",
           f"`python -m bench.perf_model` on {m['tree']} ({m['commit']}). Every time below is **predicted** from the "
           "compiled SASS / PTX and the launch geometry (bench/README.md: the model, its constants and its limits); "
           "no kernel was run.", "", "## Calibration", ""] + calibration_md(res.get("calibration"))
    out += ["", "## Constants", ""] + constants_md(m)
    if res.get("problems"):
        out += ["", "## Problems", ""] + [f"- FAIL {p}" for p in res["problems"]]
    out += ["", "## Kernels (BERT shapes: bf16, head dim 64)", "",
            "Main loop: the SASS loop with the most tensor-core work (else global-memory instructions), every "
            "instruction of its address range counted once. Shared-memory wavefronts: every shared access of the "
            "kernel evaluated for one warp (32 banks x 4 bytes), against the conflict-free ideal.", ""]
    out += kernels_md(res["kernels"])
    out += ["", "## Predicted time per op call", "",
            "Batches of 16384 padded tokens, lengths uniform in [S/4, S] (the benchmark suite's); bf16. Limit: the "
            "ideal bytes of the op at the GPU's HBM bandwidth; attention also beside FlashAttention-2/3's published "
            f"rates ({m['published']['source']}) applied to the same FLOPs.", ""]
    out += predictions_md(res["predictions"])
    out += ["## Launch detail", ""] + launches_md(res["predictions"]) + [""]
    if baseline:
        out += ["## Against the baseline", ""] + baseline_md(res, baseline) + [""]
    if res.get("auto_order"):
        out += ["## `auto` order implied (fastbert/registry.py AUTO_BY_GENERATION)", ""] + auto_md(res["auto_order"])
    return "\n".join(out) + "\n"


def console(res: dict) -> str:
    idx = _index(res["predictions"])
    lines = ["Predicted (not measured) H100 us at BERT-base, seq 128: op pass cuda triton (memory limit)"]
    for op in OPS:
        for p in ("fwd", "bwd", "fwdbwd"):
            c, t = idx.get(("base", 128, op, p, "cuda", "H100")), idx.get(("base", 128, op, p, "triton", "H100"))
            if c:
                lines.append(f"  {op:20s} {p}  {_us(c['us']):>8s} {_us(t['us']):>8s}  ({_us(c['memory_limit_us'])})")
    for gen, fams in (res.get("auto_order") or {}).items():
        lines.append(f"auto {gen}: " + ", ".join(f"{f}={'>'.join(d['order'][:2])}" for f, d in fams.items()))
    return "\n".join(lines)
