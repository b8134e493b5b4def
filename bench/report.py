"""Turn a benchmark run into a results file, a chart and a Markdown table.

    python -m bench.report BENCH.json [--results-dir bench/results] [--no-chart]

``BENCH.json`` is the ``--benchmark-json`` output of ``pytest bench/ --benchmark-only``. Writes
``<results-dir>/<gpu>-<date>.json`` (GPU name, torch / triton / CUDA versions, both exact commands, the
measured copy bandwidth and matmul rate, every row) and ``<gpu>-<date>.png`` (speedup of fastbert's best
backend over each peer, per op), and prints the Markdown table.

Per fastbert row: median ms (p20-p80), the fastest peer on the same inputs and its time, the speedup
(peer time / our time, > 1 is faster), achieved GB/s as a fraction of the copy bandwidth measured in the
same run for bandwidth-bound ops, TFLOP/s and MFU for attention, the loss and the train step (useful FLOPs
on real tokens only), and peak memory above the inputs (ours / the peer's). Groups that sweep the sequence
length (windowed attention) also get a table of time against length with its growth rate.

A smoke run (no GPU) took no timings: the report says so, prints what ran and what was missing, and
writes a results file only into an explicitly given ``--results-dir``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import sys
from collections import defaultdict
from typing import Dict, List, Optional

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Published dense bf16 tensor-core peaks (TFLOP/s) for MFU; checked in order, first match wins.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
                    ("A100", 312.0), ("A10G", 70.0), ("L40S", 362.0), ("L4", 121.0)]

NO_TIMINGS = ("NO TIMINGS WERE TAKEN: this was a smoke run ({why}). It checks that every benchmark's code "
              "runs; it measures nothing, and nothing here is a speed claim.")


def peak_tflops(gpu: Optional[str]) -> Optional[float]:
    for key, val in PEAK_BF16_TFLOPS:
        if gpu and key.lower() in gpu.lower():
            return val
    return None


def _key(r: dict) -> tuple:
    return (r.get("op"), r.get("shape"), r.get("pass"), r.get("provider"))


def load_rows(data: dict) -> List[dict]:
    """Benchmark rows (their extra_info); a benchmark present in several merged files keeps its last run."""
    rows: Dict[tuple, dict] = {}
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info", {}))
        if "op" not in info:
            continue
        info["name"] = b.get("name")
        rows[_key(info)] = info
    return list(rows.values())


def calibration(rows: List[dict]) -> Dict[str, Optional[float]]:
    """Copy bandwidth (GB/s) and matmul rate (TFLOP/s) measured in this run."""
    out = {"copy_gbps": None, "matmul_tflops": None}
    for r in rows:
        if r.get("role") != "calibration" or not r.get("timed"):
            continue
        s = r["median_ms"] * 1e-3
        if r["op"] == "copy":
            out["copy_gbps"] = r["bytes"] / s / 1e9
        elif r["op"] == "matmul":
            out["matmul_tflops"] = r["flops"] / s / 1e12
    return out


def _rates(r: dict, cal: dict, peak: Optional[float]) -> dict:
    s = r["median_ms"] * 1e-3
    out = {}
    if r.get("bytes"):
        out["gbps"] = r["bytes"] / s / 1e9
        if cal.get("copy_gbps"):
            out["frac_copy"] = out["gbps"] / cal["copy_gbps"]
    if r.get("flops") and r.get("kind") == "compute":
        out["tflops"] = r["flops"] / s / 1e12
        denom = peak or cal.get("matmul_tflops")
        if denom:
            out["mfu"] = out["tflops"] / denom
            out["mfu_basis"] = "spec bf16 peak" if peak else "measured matmul"
    if r.get("op") == "train_step" and r.get("tokens"):
        out["tokens_per_s"] = r["tokens"] / s
    return out


def compare(rows: List[dict], cal: dict, gpu: Optional[str]) -> dict:
    """Per (op, shape, pass): each fastbert backend vs the fastest peer, and the best backend vs every peer."""
    peak = peak_tflops(gpu)
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for r in rows:
        if r.get("role") in ("fastbert", "peer") and r.get("timed"):
            groups[(r["op"], r["shape"], r["pass"])].append(r)
    table, vs_peers = [], []
    for key in sorted(groups, key=lambda k: (k[0], k[1], ["fwd", "bwd", "fwdbwd", "step"].index(k[2])
                                              if k[2] in ("fwd", "bwd", "fwdbwd", "step") else 9)):
        rs = groups[key]
        peers = sorted((r for r in rs if r["role"] == "peer"), key=lambda r: r["median_ms"])
        ours = sorted((r for r in rs if r["role"] == "fastbert"), key=lambda r: r["median_ms"])
        best_peer = peers[0] if peers else None
        for r in ours:
            row = {"op": key[0], "shape": key[1], "pass": key[2], "provider": r["provider"],
                   "median_ms": r["median_ms"], "p20_ms": r["p20_ms"], "p80_ms": r["p80_ms"],
                   "peak_extra_bytes": r.get("peak_extra_bytes"), **_rates(r, cal, peak)}
            if best_peer:
                row.update({"peer": best_peer["provider"], "peer_ms": best_peer["median_ms"],
                            "peer_peak_extra_bytes": best_peer.get("peak_extra_bytes"),
                            "speedup": best_peer["median_ms"] / r["median_ms"]})
            table.append(row)
        if ours:
            for p in peers:
                vs_peers.append({"op": key[0], "shape": key[1], "pass": key[2], "fastbert": ours[0]["provider"],
                                 "peer": p["provider"], "fastbert_ms": ours[0]["median_ms"],
                                 "peer_ms": p["median_ms"], "speedup": p["median_ms"] / ours[0]["median_ms"],
                                 "fastbert_peak_extra_bytes": ours[0].get("peak_extra_bytes"),
                                 "peer_peak_extra_bytes": p.get("peak_extra_bytes")})
    return {"table": table, "vs_peers": vs_peers}


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def markdown(cmp: dict, cal: dict) -> str:
    lines = ["| op | shape | pass | fastbert | ms (p20-p80) | fastest peer | peer ms | speedup | "
             "GB/s (% copy) | TFLOP/s (MFU) | peak MiB (peer) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in cmp["table"]:
        bw = "-"
        if "gbps" in r:
            bw = f"{r['gbps']:.0f}" + (f" ({100 * r['frac_copy']:.0f}%)" if "frac_copy" in r else "")
        fl = "-"
        if "tflops" in r:
            fl = f"{r['tflops']:.1f}" + (f" ({100 * r['mfu']:.0f}%)" if "mfu" in r else "")
        if "tokens_per_s" in r:
            fl += f", {r['tokens_per_s'] / 1e3:.0f}k tok/s"
        peer = r.get("peer", "none ran")
        peer_ms = f"{r['peer_ms']:.3f}" if "peer_ms" in r else "-"
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        lines.append(f"| {r['op']} | {r['shape']} | {r['pass']} | {r['provider'].replace('fastbert-', '')} | "
                     f"{r['median_ms']:.3f} ({r['p20_ms']:.3f}-{r['p80_ms']:.3f}) | {peer} | {peer_ms} | {speed} | "
                     f"{bw} | {fl} | {_mib(r.get('peak_extra_bytes'))} ({_mib(r.get('peer_peak_extra_bytes'))}) |")
    head = []
    if cal.get("copy_gbps"):
        head.append(f"measured copy bandwidth {cal['copy_gbps']:.0f} GB/s")
    if cal.get("matmul_tflops"):
        head.append(f"measured bf16 matmul {cal['matmul_tflops']:.0f} TFLOP/s")
    return ("; ".join(head) + "\n\n" if head else "") + "\n".join(lines)


def summary_markdown(cmp: dict) -> str:
    """Best fastbert backend vs each peer, per op and pass: geometric-mean speedup over the shapes."""
    import math
    acc: Dict[tuple, List[float]] = defaultdict(list)
    mem: Dict[tuple, List[float]] = defaultdict(list)
    for r in cmp["vs_peers"]:
        key = (r["op"], r["pass"], r["peer"])
        acc[key].append(r["speedup"])
        if r.get("fastbert_peak_extra_bytes") and r.get("peer_peak_extra_bytes") is not None:
            mem[key].append(r["peer_peak_extra_bytes"] / r["fastbert_peak_extra_bytes"])

    def gmean(xs):
        return math.exp(sum(math.log(max(x, 1e-12)) for x in xs) / len(xs))
    lines = ["| op | pass | vs peer | speedup, geomean over shapes (min-max) | peer peak memory / ours | shapes |",
             "|---|---|---|---|---|---|"]
    for key, xs in sorted(acc.items()):
        op, pass_, peer = key
        m = f"{gmean(mem[key]):.2f}x" if mem.get(key) else "-"
        lines.append(f"| {op} | {pass_} | {peer} | {gmean(xs):.2f}x ({min(xs):.2f}-{max(xs):.2f}) | {m} | {len(xs)} |")
    return "\n".join(lines)


def cpu_markdown(rows: List[dict]) -> str:
    """The CPU benchmark (``bench/test_bench_cpu.py``): the models were timed interleaved in one process;
    each speedup is the median of the per-round ratios (HF time / fastbert time) with their p20-p80, the
    noise of the run; the same from process CPU time, which other processes taking the cores disturb less."""
    by_key: Dict[tuple, List[dict]] = defaultdict(list)
    for r in rows:
        if r.get("kind") == "cpu" and r.get("timed"):
            by_key[(r["op"], r["shape"], r["pass"])].append(r)
    if not by_key:
        return ""
    lines = ["| size | pass | model | params | ms (p20-p80) | speedup vs HF, paired wall (p20-p80) | "
             "paired CPU time (p20-p80) | rounds | threads | load avg before -> after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = {"tiny": 0, "mini": 1, "base": 2, "large": 3}
    for (op, shape, pass_), rr in sorted(by_key.items(), key=lambda kv: (order.get(kv[0][0][4:], 9), kv[0][2])):
        for r in sorted(rr, key=lambda r: (r["role"] != "fastbert", r["provider"])):
            sp = cp = "-"
            if "paired_speedup" in r:
                sp = f"**{r['paired_speedup']:.2f}x** ({r['paired_p20']:.2f}-{r['paired_p80']:.2f})"
                cp = f"{r['cpu_paired_speedup']:.2f}x ({r['cpu_paired_p20']:.2f}-{r['cpu_paired_p80']:.2f})"
            lines.append(f"| {op[4:]} ({shape}) | {pass_} | {r.get('variant', r['provider'])} | "
                         f"{r.get('params', 0) / 1e6:.1f}M | {r['median_ms']:.1f} ({r['p20_ms']:.1f}-{r['p80_ms']:.1f}) | "
                         f"{sp} | {cp} | {r['rounds']} | {r['threads']} | {r['load_before']} -> {r['load_after']} |")
    return "\n".join(lines)


def scaling(rows: List[dict]) -> List[dict]:
    """Time against sequence length for the benchmarks that sweep it (rows with a ``seqlen``, e.g. the
    windowed attention group): per (op, provider, pass), the median ms at each length and
    ``growth = (ms_last / ms_first) / (S_last / S_first)``: ~1 when the time grows linearly with the
    length, ~``S_last / S_first`` when it grows quadratically."""
    groups: Dict[tuple, Dict[int, float]] = defaultdict(dict)
    for r in rows:
        if r.get("timed") and r.get("seqlen"):
            groups[(r["op"], r["pass"], r["provider"])][int(r["seqlen"])] = r["median_ms"]
    out = []
    for (op, pass_, prov), by_s in sorted(groups.items()):
        lens = sorted(by_s)
        growth = None
        if len(lens) > 1:
            growth = (by_s[lens[-1]] / by_s[lens[0]]) / (lens[-1] / lens[0])
        out.append({"op": op, "pass": pass_, "provider": prov, "ms": {str(S): by_s[S] for S in lens},
                    "growth": growth})
    return out


def scaling_markdown(sc: List[dict]) -> str:
    lens = sorted({int(S) for r in sc for S in r["ms"]})
    lines = ["| op | pass | provider | " + " | ".join(f"ms at S={S}" for S in lens)
             + " | growth vs length (1 = linear) |", "|---|---|---|" + "---|" * (len(lens) + 1)]
    for r in sc:
        cells = [f"{r['ms'][str(S)]:.3f}" if str(S) in r["ms"] else "-" for S in lens]
        g = f"{r['growth']:.2f}" if r["growth"] is not None else "-"
        lines.append(f"| {r['op']} | {r['pass']} | {r['provider']} | " + " | ".join(cells) + f" | {g} |")
    return "\n".join(lines)


def missing_markdown(missing: List[dict]) -> str:
    if not missing:
        return "Every requested provider ran."
    seen = {}
    for m in missing:  # one line per (provider, reason), listing the ops it covers
        seen.setdefault((m["provider"], m["reason"]), set()).add(m["op"])
    lines = ["| provider | ops | why it did not run |", "|---|---|---|"]
    for (prov, reason), ops in sorted(seen.items()):
        lines.append(f"| {prov} | {', '.join(sorted(ops))} | {reason} |")
    return "\n".join(lines)


def chart(cmp: dict, path: str, title: str) -> Optional[str]:
    """Speedup of fastbert's best backend over each peer, one panel per op (log scale, 1x marked)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401  (matplotlib.ticker.FuncFormatter below)
    except ImportError:
        return None
    by_op: Dict[str, List[dict]] = defaultdict(list)
    for r in cmp["vs_peers"]:
        by_op[r["op"]].append(r)
    if not by_op:
        return None
    fig, axes = plt.subplots(len(by_op), 1, figsize=(12, 3.2 * len(by_op)), squeeze=False)
    for ax, (op, rs) in zip(axes[:, 0], sorted(by_op.items())):
        cats = list(dict.fromkeys(f"{r['shape']}\n{r['pass']}" for r in rs))
        peers = list(dict.fromkeys(r["peer"] for r in rs))
        w = 0.8 / max(len(peers), 1)
        for j, p in enumerate(peers):
            xs, ys = [], []
            for r in rs:
                if r["peer"] == p:
                    xs.append(cats.index(f"{r['shape']}\n{r['pass']}") + j * w)
                    ys.append(r["speedup"])
            ax.bar(xs, ys, width=w, label=f"vs {p}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x")
        ax.yaxis.set_major_formatter(fmt)
        ax.yaxis.set_minor_formatter(fmt)
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(cats))])
        ax.set_xticklabels(cats, fontsize=6)
        ax.set_ylabel("speedup (x)")
        ax.set_title(op, fontsize=9)
        ax.legend(fontsize=6, ncol=min(len(peers), 4))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-") or "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", help="the --benchmark-json file(s) of `pytest bench/ --benchmark-only` "
                    "(several runs of parts of the suite on the same machine are merged)")
    ap.add_argument("--results-dir", default=None, help=f"where to write results (default {RESULTS_DIR}; "
                    "smoke runs write only when this is given)")
    ap.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    args = ap.parse_args(argv)

    data, env, missing, commands = None, {}, [], []
    for path in args.json:
        with open(path) as f:
            part = json.load(f)
        fb = part.get("fastbert")
        if fb is None:
            print(f"error: {path} has no 'fastbert' section: was it written by `pytest bench/ "
                  "--benchmark-only --benchmark-json=...` with bench/conftest.py active?", file=sys.stderr)
            return 2
        penv = fb.get("env", {})
        if data is None:
            data, env = part, dict(penv)
        else:
            if penv.get("gpu") != env.get("gpu") or penv.get("mode") != env.get("mode"):
                print(f"error: {path} is from {penv.get('gpu')} ({penv.get('mode')}), the first file from "
                      f"{env.get('gpu')} ({env.get('mode')}): only runs on the same machine merge", file=sys.stderr)
                return 2
            data = dict(data, benchmarks=data.get("benchmarks", []) + part.get("benchmarks", []))
        missing += fb.get("missing", [])
        commands.append(penv.get("command"))
    env["command"] = " && ".join(c for c in commands if c)
    rows = load_rows(data)
    ran = {_key(r) for r in rows}
    missing = list({_key(m): m for m in missing if _key(m) not in ran}.values())
    timed = any(r.get("timed") for r in rows)
    date = (data.get("datetime") or _dt.datetime.now(_dt.timezone.utc).isoformat())[:10]
    gpu = env.get("gpu")
    machine = gpu or (f"CPU {env['cpu']} x{env.get('cpu_count')}" if env.get("mode") == "cpu" and env.get("cpu") else None)
    report_cmd = " ".join(["python", "-m", "bench.report"] + (sys.argv[1:] if argv is None else list(argv)))

    result = {"gpu": gpu, "date": date, "mode": env.get("mode"), "timed": timed,
              "versions": {k: env.get(k) for k in ("torch", "triton", "cuda", "python")},
              "commands": {"bench": env.get("command"), "report": report_cmd}, "env": env,
              "commit": data.get("commit_info", {}).get("id"), "source_json": [os.path.abspath(p) for p in args.json],
              "missing": missing}

    print(f"# fastbert benchmark report ({date}, {machine or 'no GPU'}; torch {env.get('torch')}, "
          f"triton {env.get('triton')}, CUDA {env.get('cuda')})\n")
    print(f"Command: `{env.get('command')}`\n")
    if not timed:
        why = "no GPU visible to torch" if not gpu else "FASTBERT_BENCH_SMOKE=1"
        print(NO_TIMINGS.format(why=why) + "\n")
        ran = sorted({(r["op"], r["provider"]) for r in rows})
        by_op: Dict[str, List[str]] = defaultdict(list)
        for op, prov in ran:
            by_op[op].append(prov)
        print("Ran (code path only):\n")
        for op, provs in sorted(by_op.items()):
            print(f"- {op}: {', '.join(provs)}")
        print("\nProviders that did not run:\n\n" + missing_markdown(missing))
        result["ran"] = [{"op": op, "provider": p} for op, p in ran]
        if args.results_dir:
            os.makedirs(args.results_dir, exist_ok=True)
            out = os.path.join(args.results_dir, f"smoke-{date}.json")
            with open(out, "w") as f:
                json.dump(result, f, indent=1)
            print(f"\nwrote {out} (smoke run: no timings)")
        return 0

    cal = calibration(rows)
    cmp = compare(rows, cal, gpu)
    sc = scaling(rows)
    cpu_md = cpu_markdown(rows)
    result.update({"calibration": cal, "peak_bf16_tflops": peak_tflops(gpu), **cmp, "scaling": sc,
                   "rows": rows}, **({"cpu_table": cpu_md} if cpu_md else {}))
    out_dir = args.results_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{_slug(machine or 'gpu')}-{date}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    if cpu_md:
        print("CPU, fastbert MosaicBERT (auto = cpu backend) vs Hugging Face BERT (SDPA), same size, timed "
              "interleaved in one process:\n\n" + cpu_md + "\n")
    print(markdown(cmp, cal))
    print("\nfastbert (best backend per row) against each peer:\n\n" + summary_markdown(cmp))
    if sc:
        print("\nTime against sequence length:\n\n" + scaling_markdown(sc))
    print("\nProviders that did not run:\n\n" + missing_markdown(missing))
    print(f"\nwrote {stem}.json")
    if not args.no_chart:
        png = chart(cmp, stem + ".png", f"fastbert speedup vs peers ({machine}, {date}); > 1 is faster")
        print(f"wrote {png}" if png else "chart skipped (matplotlib not available or nothing to plot)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
