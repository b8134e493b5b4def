"""The files a GPU run leaves in its results folder (``bench.gpu_run``): ``gpu_run.json``, ``summary.md``,
``speedup.png``, ``logs.txt`` (and ``ncu.csv``, written by the ncu phase), within the device tool's limits
(``bench.gpu_plan.check_out_dir``). The benchmark tables are ``bench.report``'s, on the rows the run
recorded; the environment phase's copy and matmul rows are the anchors of every ratio."""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import subprocess
import time
from typing import List, Optional

from bench import gpu_plan as P
from bench import report as BR
from bench.checkout import ROOT


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001 - the device copy of the tree may have no .git
        return None


def bench_data(run) -> dict:
    """Rows (the env phase's calibration rows first), what was missing, and bench.report's comparison."""
    recs = run.result.get("bench_records", [])
    env = run.result.get("env", {})
    rows = [r for r in env.get("calibration_rows", []) if "op" in r] + [r for r in recs if r.get("rec") == "row"]
    ran = {BR._key(r) for r in rows}
    missing = list({BR._key(m): m for m in recs if m.get("rec") == "missing" and BR._key(m) not in ran}.values())
    timed = any(r.get("timed") for r in rows)
    out = {"rows": rows, "missing": missing, "timed": timed}
    if timed:
        cal = BR.calibration(rows)
        out.update(calibration=cal, peak_bf16_tflops=BR.peak_tflops(env.get("gpu")), **BR.compare(rows, cal, env.get("gpu")))
    return out


def perf_model(rows: List[dict], env: dict) -> Optional[dict]:
    """Measured vs predicted time per fastbert row, when ``bench/perf_model.py`` exists and defines
    ``predict_ms(row: dict, env: dict) -> float | None`` (row: a benchmark row as recorded here)."""
    if not os.path.exists(os.path.join(ROOT, "bench", "perf_model.py")):
        return None
    try:
        mod = importlib.import_module("bench.perf_model")
    except Exception as e:  # noqa: BLE001
        return {"error": f"importing bench.perf_model failed: {type(e).__name__}: {e}"}
    fn = getattr(mod, "predict_ms", None)
    if fn is None:
        return {"error": "bench/perf_model.py defines no predict_ms(row, env) -> float | None; gpu_run compares "
                         "every fastbert row with it once it does"}
    out = []
    for r in rows:
        if r.get("role") != "fastbert":
            continue
        try:
            pred = fn(r, env)
        except Exception as e:  # noqa: BLE001
            pred = f"{type(e).__name__}: {e}"
        meas = r.get("median_ms") if r.get("timed") else None
        out.append({k: r.get(k) for k in ("op", "shape", "pass", "provider")} |
                   {"measured_ms": meas, "predicted_ms": pred,
                    "measured_over_predicted": meas / pred if meas and isinstance(pred, (int, float)) and pred > 0 else None})
    return {"rows": out}


def _f(v, fmt="{:.0f}", none="-"):
    return none if v is None else (fmt.format(v) if isinstance(v, (int, float)) else str(v))


def _phases_md(run) -> List[str]:
    lines = ["| phase | status | used s | window s | note |", "|---|---|---|---|---|"]
    for ph in P.PHASES:
        rec = run.result["phases"].get(ph.name)
        if rec is None:
            continue
        note = rec.get("error") or (rec.get("first_error") or "").split("\n")[0][:120]
        if "counts" in rec:
            note = ", ".join(f"{v} {k}" for k, v in sorted(rec["counts"].items())) or "no tests"
        lines.append(f"| {ph.name} | {rec.get('status')} | {_f(rec.get('used_s', rec.get('seconds')))} | "
                     f"{_f(rec.get('window_s'))} | {note} |")
    return lines


def _env_md(env: dict) -> List[str]:
    smi = env.get("nvidia_smi_before") or {}
    after = env.get("nvidia_smi_after") or {}
    pk = env.get("packages", {})
    rows = [("GPU", env.get("gpu") or "none visible"), ("SMs / capability", f"{env.get('sms')} / {env.get('capability')}"),
            ("memory GiB", _f((env.get("memory_bytes") or 0) / 2**30 or None, "{:.0f}")),
            ("driver", smi.get("driver_version")), ("SM clock MHz (before / after calibration / max)",
                                                     f"{smi.get('clocks.sm')} / {after.get('clocks.sm')} / {smi.get('clocks.max.sm')}"),
            ("CUDA runtime (torch) / nvcc", f"{env.get('cuda_runtime')} / {(env.get('nvcc') or {}).get('version')}"),
            ("torch / triton / python", f"{env.get('torch')} / {env.get('triton')} / {env.get('python')}"),
            ("transformers / pytest / xdist", f"{pk.get('transformers')} / {pk.get('pytest')} / {pk.get('pytest-xdist')}"),
            ("compute-sanitizer", (env.get("compute-sanitizer") or {}).get("version")),
            ("ncu", (env.get("ncu") or {}).get("version")),
            ("measured copy bandwidth GB/s (read + write)", _f(env.get("copy_gbps"))),
            ("measured bf16 matmul TFLOP/s (8192^3)", _f(env.get("matmul_tflops"))),
            ("APIs fastbert uses that are missing here", ", ".join((env.get("api_check") or {}).get("missing", [])) or "none")]
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def _tests_md(rec: dict, title: str) -> List[str]:
    if "counts" not in rec:
        return [f"**{title}**: {rec.get('status')}"]
    out = [f"**{title}** ({rec.get('status')}, {rec.get('seconds')} s): " +
           (", ".join(f"{v} {k}" for k, v in sorted(rec["counts"].items())) or "nothing ran")]
    for f_ in rec.get("failures", [])[:30]:
        out.append(f"- FAILED `{f_['nodeid']}`: {f_['message'].splitlines()[0][:300] if f_['message'] else ''}")
    for e in rec.get("collect_errors", [])[:5]:
        out.append(f"- COLLECTION ERROR `{e['nodeid']}`: {e['message'].splitlines()[-1][:300]}")
    if rec.get("skip_reasons"):
        out.append("- skip reasons: " + "; ".join(f"{n}x {r}" for r, n in rec["skip_reasons"].items()))
    return out


def _sanitizer_md(run) -> List[str]:
    from bench.sanitize_driver import SMALL_CASES
    tools = {t: run.result["phases"].get(t, {}) for t in ("memcheck", "racecheck")}
    for name, st in (run.result["phases"].get("sanitize-more", {}).get("steps") or {}).items():
        tools[name] = st
    kernels = sorted({k for c in SMALL_CASES for k in c.kernels} |
                     {k for rec in tools.values() for k in (rec.get("per_kernel") or {})})
    head = "| kernel | " + " | ".join(tools) + " |"
    lines = [head, "|---" * (len(tools) + 1) + "|"]
    for k in kernels:
        cells = []
        for rec in tools.values():
            if not rec.get("complete"):
                cells.append("not checked")   # no sanitizer summary: nothing may be concluded
                continue
            c = rec["per_kernel"].get(k, {})
            n = c.get("errors", 0) + c.get("warnings", 0)
            cells.append("0" if not n else f"**{c.get('errors', 0)} err, {c.get('warnings', 0)} warn**"
                         + (f" ({c['hazards']} hazards)" if c.get("hazards") else ""))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    for t, rec in tools.items():
        s = rec.get("summary")
        lines.append(f"\n{t}: {rec.get('status', 'not run')}; tool summary {s if s else 'not printed'}; "
                     f"failed driver cases: {', '.join(rec.get('failed_cases') or []) or 'none'}")
    return lines


def _ncu_md(rows: List[dict]) -> List[str]:
    if not rows:
        return ["No ncu measurements (ncu missing, not run, or it profiled nothing; see logs.txt)."]
    lines = ["Predicted = `bench/results/compile-report.json` (this commit's compile, the nearest arch); measured = ncu.",
             "", "| kernel | grid | block | regs pred / ncu | smem KiB pred / ncu | warps/SM pred / ncu theoretical | "
             "achieved occupancy % | time us |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kib = (lambda b: None if b is None else b / 1024)
        lines.append(f"| {r['kernel'][:90]} | {r['grid']} | {r['block']} | {_f(r['pred_regs'])} / {_f(r['regs'])} | "
                     f"{_f(kib(r['pred_smem_bytes']), '{:.1f}')} / {_f(kib(r['smem_bytes']), '{:.1f}')} | "
                     f"{_f(r['pred_warps'])} / {_f(r['theoretical_warps'])} | {_f(r['achieved_pct'], '{:.0f}')} | "
                     f"{_f(r['time_us'], '{:.1f}')} |")
    return lines


def summary_markdown(run, bench: dict) -> str:
    env, res = run.result.get("env", {}), run.result
    date = _dt.datetime.fromtimestamp(res["started"], _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"# fastbert GPU run: {env.get('gpu') or 'no GPU'}, {date}", "",
           f"Command: `{res['command']}`; budget {res['budget_s']:.0f} s; wall {time.time() - res['started']:.0f} s; "
           f"commit {res.get('commit') or 'unknown (no .git)'}; fastbert imported as: {res.get('import_mode')}.", ""]
    if res["dry_run"]:
        out += ["**DRY RUN on CPU**: every phase was walked with smoke shapes; nothing was measured and nothing "
                "here is a GPU result.", ""]
    if res.get("plan_problems"):
        out += ["Plan problems (reserves shrunk to fit): " + "; ".join(res["plan_problems"]), ""]
    out += ["## Phases", ""] + _phases_md(run) + ["", "## Machine", ""] + _env_md(env)
    b = res["phases"].get("build", {})
    out += ["", "## Build of fastbert._C", "", f"{b.get('status', 'not run')}; {b.get('seconds', '-')} s; "
            f"TORCH_CUDA_ARCH_LIST={b.get('arch_list', '-')}; {b.get('cmd') and ' '.join(b['cmd'])}"]
    if b.get("first_error"):
        out += ["", "First error:", "```", b["first_error"][:3000], "```"]
    out += ["", "## Correctness on the GPU", ""]
    for name in ("correct-triton", "correct-cuda"):
        out += _tests_md(res["phases"].get(name, {}), name) + [""]
    out += ["## compute-sanitizer (errors per kernel over bench.sanitize_driver)", ""] + _sanitizer_md(run)
    out += ["", "## Benchmarks", ""]
    if bench["timed"]:
        out += [BR.markdown({"table": bench["table"], "vs_peers": bench["vs_peers"]}, bench["calibration"]), "",
                "fastbert (best backend per row) against each peer:", "",
                BR.summary_markdown({"table": bench["table"], "vs_peers": bench["vs_peers"]})]
    else:
        out += [BR.NO_TIMINGS.format(why="dry run" if res["dry_run"] else "no GPU visible"), "",
                "Ran (code path only): " + ", ".join(sorted({f"{r['op']}/{r['provider']}" for r in bench["rows"]}))]
    groups = {**res["phases"].get("bench-core", {}).get("groups", {}), **res["phases"].get("bench-rest", {}).get("groups", {})}
    if groups:
        out += ["", "| group | selected | timed |", "|---|---|---|"] + \
               [f"| {g} | {v['selected']} | {v['timed']} |" for g, v in groups.items()]
    out += ["", "Providers that did not run:", "", BR.missing_markdown(bench["missing"])]
    out += ["", "## Compile report vs ncu (registers, shared memory, occupancy)", ""] + _ncu_md(res.get("ncu_rows", []))
    pm = res.get("perf_model")
    if pm is not None:
        out += ["", "## Performance model vs measured", ""]
        out += [pm["error"]] if "error" in pm else \
            ["| op | shape | pass | provider | measured ms | predicted ms | measured / predicted |", "|---|---|---|---|---|---|---|"] + \
            [f"| {r['op']} | {r['shape']} | {r['pass']} | {r['provider']} | {_f(r['measured_ms'], '{:.3f}')} | "
             f"{_f(r['predicted_ms'], '{:.3f}')} | {_f(r['measured_over_predicted'], '{:.2f}')} |" for r in pm["rows"]]
    out += ["", "## Files", "", ", ".join(res.get("files", [])) + "; limits: " +
            ("; ".join(res.get("out_check", [])) or "all within the device tool's limits")]
    return "\n".join(out) + "\n"


def write_logs(run) -> None:
    per = max(P.LOG_BUDGET_BYTES // max(len(run.logs), 1), 64 * 1024)
    parts = []
    for title, path in run.logs:
        try:
            with open(path, errors="replace") as f:
                parts.append(f"===== {title} =====\n" + P.clip_text(f.read(), per, f"{title} log"))
        except OSError:
            continue
    with open(os.path.join(run.out, P.OUT_FILES["logs"]), "w") as f:
        f.write(P.clip_text("\n".join(parts), P.LOG_BUDGET_BYTES, "logs"))


def _jsonable(rec):
    if isinstance(rec, dict):
        return {k: _jsonable(v) for k, v in rec.items() if k not in ("log",)}
    if isinstance(rec, (list, tuple)):
        return [_jsonable(v) for v in rec]
    if isinstance(rec, float) and rec in (float("inf"), float("-inf")):
        return None
    return rec


def write_results(run, final: bool) -> List[str]:
    """Write every results file; returns what would not come back from the device (empty: fine)."""
    res = run.result
    res.setdefault("commit", _git_commit())
    bench = bench_data(run)
    if final:
        res["perf_model"] = perf_model(bench["rows"], res.get("env", {}))
        res["finished"] = time.time()
    if final and bench["timed"]:
        png = BR.chart({"table": bench["table"], "vs_peers": bench["vs_peers"]},
                       os.path.join(run.out, P.OUT_FILES["chart"]),
                       f"fastbert speedup vs peers ({res.get('env', {}).get('gpu')}); > 1 is faster")
        res["chart"] = os.path.basename(png) if png else "not drawn (matplotlib missing or nothing to plot)"
    write_logs(run)
    res["files"] = sorted(os.listdir(run.out)) + [n for n in (P.OUT_FILES["json"], P.OUT_FILES["summary"])
                                                   if n not in os.listdir(run.out)]
    for _ in range(2):  # the check's verdict is part of what it checks
        with open(os.path.join(run.out, P.OUT_FILES["summary"]), "w") as f:
            f.write(summary_markdown(run, bench))
        with open(os.path.join(run.out, P.OUT_FILES["json"]), "w") as f:
            json.dump(_jsonable(dict(res, bench=bench)), f, indent=1, default=repr)
        res["out_check"] = P.check_out_dir(run.out)
    return res["out_check"]


def console_summary(run) -> str:
    """What the device tool's output tail shows: the phases, the headline numbers, where the rest is."""
    env = run.result.get("env", {})
    lines = ["", "=" * 100, f"fastbert gpu_run: {env.get('gpu') or 'no GPU'}"
             f"{' (DRY RUN)' if run.dry else ''}; copy {_f(env.get('copy_gbps'))} GB/s, "
             f"bf16 matmul {_f(env.get('matmul_tflops'))} TFLOP/s", ""] + _phases_md(run)
    bench = bench_data(run)
    if bench["timed"]:
        lines += ["", BR.summary_markdown({"table": bench["table"], "vs_peers": bench["vs_peers"]})]
    lines += ["", f"results in {run.out}: {', '.join(run.result.get('files', []))}",
              "limits: " + ("; ".join(run.result.get("out_check", [])) or "ok")]
    return P.clip_text("\n".join(lines), 10000, "console summary")
