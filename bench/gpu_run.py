"""The one prepared call for a lent GPU: proves and measures everything the repository can in one command.

    python -m bench.gpu_run --out DIR [--budget-s 480] [--dry-run] [--phases a,b] [--skip a,b] [--plan]

Whenever a GPU is available, run this first. On the device tool (``run``) from the repository root:

    PYTHONUNBUFFERED=1 python3 -m bench.gpu_run --out $OUT --budget-s 480      (timeout_s 570, no carry)

Phases (``bench.gpu_plan.PHASES``, in priority order, each stopped in time to leave the later ones their
share): the environment and the same-run anchors (copy GB/s, bf16 matmul TFLOP/s); the build of
``fastbert._C`` for this GPU's architecture only (in the background, while the Triton tests run); the
GPU tests for Triton and CUDA; compute-sanitizer memcheck and racecheck over ``bench.sanitize_driver``;
the core benchmarks (``bench.gpu_plan.CORE_GROUPS``); ncu occupancy against the compile report; the rest
of the suite; more sanitizer tools; the results. Nothing is installed: fastbert runs from the checkout
(``bench.checkout``), the extension is built in place, the benchmarks use our own ``benchmark`` fixture.

Results in DIR (at most 8 files, 16 MiB each, flat, rewritten after every phase so a killed run still
returns what it had): ``gpu_run.json`` (every row, versions, commands, per-phase records), ``summary.md``
(the tables), ``speedup.png``, ``logs.txt`` (each command's output, clipped), ``ncu.csv``.

``--dry-run`` walks every phase on CPU with the smoke shapes (no GPU: tests skip, the build command runs
with ``FASTBERT_SKIP_CUDA_BUILD=1``, the sanitizer driver runs on the reference without a sanitizer, the
benchmark groups run their first case in smoke mode) and checks the budget and the file limits; CI runs it
(tests/test_gpu_run.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Dict, List, Optional

from bench import gpu_parse as GP
from bench import gpu_plan as P
from bench.checkout import ROOT, ensure_importable
from bench.gpu_env import run_env

GRACE_S = 8.0
MIN_WINDOW_S = 5.0   # a phase with less time than this is skipped, not started


class Run:
    """State of one gpu_run: the budget, what each phase recorded, the logs."""

    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.out = os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)
        self.work = tempfile.mkdtemp(prefix="fastbert-gpu-run-")
        self.phases = [p for p in P.PHASES if self._wanted(p.name)]
        self.budget = P.Budget(self.phases, args.budget_s, time.time)
        self.have = set()          # satisfied needs: "gpu", "ext", "compute-sanitizer", "ncu"
        self.tools: Dict[str, Optional[str]] = {}
        self.result: dict = {"command": " ".join(["python", "-m", "bench.gpu_run"] + sys.argv[1:]),
                             "dry_run": self.dry, "budget_s": args.budget_s, "started": time.time(),
                             "import_mode": ensure_importable(), "plan": P.timeline(self.phases, args.budget_s),
                             "plan_problems": P.check_plan(self.phases, args.budget_s), "phases": {}}
        self.logs: List[tuple] = []   # (title, path)
        self.build_proc = None
        self.dry_driver_ran = False

    def _wanted(self, name: str) -> bool:
        only = [s for s in (self.args.phases or "").split(",") if s]
        skip = [s for s in (self.args.skip or "").split(",") if s]
        return name == "results" or ((not only or name in only) and name not in skip)

    def phase(self, name: str) -> dict:
        return self.result["phases"].setdefault(name, {"status": "not run"})

    def env(self, **extra) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        if self.dry:
            env["FASTBERT_BENCH_SMOKE"] = "1"
        return env

    def capped(self, name: str, cmd: List[str], deadline: float, env=None, log_title=None) -> dict:
        """Run ``cmd`` until it ends or ``deadline`` (then SIGINT, so pytest still writes its summary;
        SIGKILL to its process group after a grace). Output goes to a log that joins logs.txt."""
        log = os.path.join(self.work, f"{name}.log")
        t0 = time.time()
        with open(log, "ab") as f:
            f.write(f"$ {' '.join(cmd)}\n".encode())
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env(), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            timed_out = wait_or_stop(proc, deadline)
        self.logs.append((log_title or name, log))
        return {"cmd": cmd, "rc": proc.returncode, "seconds": round(time.time() - t0, 1), "timed_out": timed_out,
                "log": log}


def wait_or_stop(proc: subprocess.Popen, deadline: float) -> bool:
    """Wait for ``proc`` until ``deadline``; past it, interrupt and then kill its process group (only the
    processes this run started). Returns whether it had to be stopped."""
    while proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    if proc.poll() is not None:
        _reap_group(proc.pid)
        return False
    for sig, wait in ((signal.SIGINT, GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    _reap_group(proc.pid)
    return True


def _reap_group(pgid: int) -> None:
    """Kill what is left of a process group this run started (workers of a stopped pytest, say)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def build_fresh() -> Optional[str]:
    """The in-place extension if it is newer than every source it is built from (a rerun on a warm machine)."""
    sos = glob.glob(os.path.join(ROOT, "fastbert", "_C*.so"))
    if not sos:
        return None
    srcs = glob.glob(os.path.join(ROOT, "csrc", "*")) + [os.path.join(ROOT, "setup.py")]
    return sos[0] if os.path.getmtime(sos[0]) > max(os.path.getmtime(s) for s in srcs) else None


def run_build(run: Run, deadline: float) -> dict:
    """Start the build in the background; ``join_build`` waits for it."""
    env_rec = run.result.get("env", {})
    fresh = None if run.dry else build_fresh()
    if fresh:
        run.build_proc = None
        return {"status": "reused", "so": os.path.relpath(fresh, ROOT)}
    arch = env_rec.get("capability") or "9.0"
    extra = {"TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 4), "FASTBERT_FORCE_CUDA_BUILD": "1"}
    if run.dry:
        extra = {"FASTBERT_SKIP_CUDA_BUILD": "1", "TORCH_CUDA_ARCH_LIST": arch}
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    log = os.path.join(run.work, "build.log")
    f = open(log, "ab")
    f.write(f"$ {' '.join(f'{k}={v}' for k, v in extra.items())} {' '.join(cmd)}\n".encode())
    f.flush()
    run.build_proc = (subprocess.Popen(cmd, cwd=ROOT, env=run.env(**extra), stdout=f, stderr=subprocess.STDOUT,
                                       start_new_session=True), f, time.time(), deadline, log)
    run.logs.append(("build", log))
    return {"status": "running", "cmd": cmd, "env": extra, "arch_list": arch, "deadline_in_s": round(deadline - time.time())}


def join_build(run: Run) -> None:
    rec = run.phase("build")
    if run.build_proc is None:
        if "ext" not in run.have and not run.dry and rec.get("status") in ("reused", "not run") and build_fresh():
            _check_ext(run, rec)   # built by an earlier call on this machine (or --skip build)
        return
    proc, f, t0, deadline, log = run.build_proc
    rec["timed_out"] = wait_or_stop(proc, deadline)
    f.close()
    run.build_proc = None
    rec.update(rc=proc.returncode, seconds=round(time.time() - t0, 1), used_s=round(time.time() - t0, 1))
    with open(log, errors="replace") as fh:
        text = fh.read()
    if proc.returncode != 0 or rec["timed_out"]:
        rec["status"] = "timed out" if rec["timed_out"] else "failed"
        rec["first_error"] = GP.first_build_error(text) or text[-3000:]
        return
    if run.dry:
        rec["status"] = "dry run: build command ran with FASTBERT_SKIP_CUDA_BUILD=1"
        return
    _check_ext(run, rec)
    run.budget.finish("build")


def _check_ext(run: Run, rec: dict) -> None:
    try:
        C = importlib.import_module("fastbert._C")
        reused = rec.get("status") in ("reused", "not run")
        rec.update(status="reused: built earlier on this machine" if reused else "ok", so=os.path.relpath(C.__file__, ROOT),
                   functions=sorted(n for n in dir(C) if not n.startswith("_")))
        run.have.add("ext")
    except Exception as e:  # noqa: BLE001 - a built but unloadable extension is a result too
        rec.update(status="built but not importable", first_error=f"{type(e).__name__}: {e}")


def _pytest(run: Run, name: str, targets: List[str], deadline: float, extra: List[str], plan: dict,
            env=None) -> dict:
    record = os.path.join(run.work, f"{name}.jsonl")
    plan_path = os.path.join(run.work, f"{name}.plan.json")
    with open(plan_path, "w") as f:
        json.dump(dict(plan, phase=name, deadline=deadline - GRACE_S, record=record, dry_run=run.dry), f)
    cmd = [sys.executable, "-m", "pytest", *targets, "-p", "bench.gpu_plugin", f"--fb-plan={plan_path}",
           "-p", "no:cacheprovider", "-q", "-rN", *extra]
    res = run.capped(name, cmd, deadline, env=env)
    res["records"] = GP.read_jsonl(record)
    return res


def run_correct(run: Run, deadline: float, which: str) -> dict:
    triton_files = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "test_triton_*.py")))
    extra = ["--continue-on-collection-errors"]
    if importlib.util.find_spec("pytest_timeout"):
        extra.append("--timeout=120")
    if which == "triton":
        targets = triton_files
        if importlib.util.find_spec("xdist") and not run.dry:
            extra += ["-n", str(min(8, max(1, (os.cpu_count() or 2) // 4)))]  # Triton compiles in parallel
        if run.dry:
            extra += ["-m", "gpu"]
    else:
        targets = gpu_test_files(exclude=triton_files) + ["-m", "gpu"]
    res = _pytest(run, f"correct-{which}", targets, deadline, extra, {"mode": "tests"})
    summ = GP.summarize_tests(res.pop("records"))
    ok = res["rc"] in (0, 5) and not summ["failures"]   # 5: nothing collected/selected
    return {"status": "ok" if ok else ("timed out" if res["timed_out"] else "failed"), **res, **summ}


def gpu_test_files(exclude: List[str]) -> List[str]:
    """tests/ files that mark tests ``gpu`` (collecting only those saves the import of every other test module)."""
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))):
        rel = os.path.relpath(path, ROOT)
        with open(path, errors="replace") as f:
            if rel not in exclude and "mark.gpu" in f.read():
                out.append(rel)
    return out


def sanitizer_cmd(run: Run, tool: str, backend: str = "cuda", minimal: bool = False) -> List[str]:
    if run.dry:   # the driver itself, on the reference, without a sanitizer
        return [sys.executable, "-m", "bench.sanitize_driver", "--backend", "torch", "--device", "cpu", "--dtypes", "bf16"]
    driver = [sys.executable, "-m", "bench.sanitize_driver", "--backend", backend, "--shapes", "small"]
    if tool == "initcheck":
        driver.append("--no-poison")   # poisoning would initialise what initcheck must see unwritten
    cmd = [run.tools["compute-sanitizer"], "--tool", tool]
    if not minimal:
        cmd += ["--print-limit", "200", "--report-api-errors", "no"]
        # Plain identifiers: in the mangled and the demangled name alike, whichever the filter reads.
        names = cuda_kernel_names() if backend == "cuda" else triton_kernel_names()
        for n in names:
            cmd += ["--kernel-name", f"kns={n}"]
    return cmd + driver


def cuda_kernel_names() -> List[str]:
    from bench.sanitize_driver import SMALL_CASES
    return sorted({k.split("::")[-1] for c in SMALL_CASES for k in c.kernels})


def triton_kernel_names() -> List[str]:
    rep = load_compile_report()
    return sorted({k["kernel"] for k in rep.get("kernels", []) if k.get("source") == "triton"})


def load_compile_report() -> dict:
    try:
        with open(os.path.join(ROOT, "bench", "results", "compile-report.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def run_sanitizer(run: Run, deadline: float, tool: str, backend: str = "cuda", label: Optional[str] = None) -> dict:
    label = label or tool
    if run.dry and run.dry_driver_ran:
        return {"status": "dry run: command built, the driver was walked once already", "cmd": sanitizer_cmd(run, tool, backend)}
    run.dry_driver_ran = run.dry
    env = run.env(PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # one cudaMalloc per tensor: memcheck sees every bound
    res = run.capped(label, sanitizer_cmd(run, tool, backend), deadline, env=env, log_title=f"{label} ({tool})")
    text = open(res["log"], errors="replace").read()
    if not run.dry and "FB-CASE" not in text and res["seconds"] < 30 and time.time() < deadline:
        # An option this sanitizer version refuses: once more with the tool alone.
        res = run.capped(label + "-minimal", sanitizer_cmd(run, tool, backend, minimal=True), deadline, env=env)
        text = open(res["log"], errors="replace").read()
    parsed = GP.parse_sanitizer(text, tool)
    fails = [n for n, c in parsed["cases"].items() if c["status"] == "fail"]
    found = (parsed["summary"] or {}).get("errors") or parsed["n_records"] or fails
    status = ("dry run: driver only, no sanitizer" if run.dry else "timed out" if res["timed_out"] else
              "errors" if found else "clean" if parsed["complete"] else "incomplete: no sanitizer summary (see logs.txt)")
    return {"status": status, **res, **parsed, "failed_cases": fails}


def run_bench(run: Run, deadline: float, phase: str) -> dict:
    groups = P.BENCH_PHASE_GROUPS[phase]
    files = P.group_files(groups, ROOT)
    done = [r["nodeid"] for r in run.result.get("bench_records", []) if r.get("rec") == "outcome"
            and not (r["outcome"] == "skipped" and "gpu_run" in r.get("message", ""))]
    plan = {"mode": "bench", "smoke": run.dry, "skip_nodeids": done, "dry_skip_providers": list(P.DRY_SKIP_PROVIDERS),
            "groups": [dict(dataclasses.asdict(g), cap_s=min(g.cap_s, 1e9)) for g in groups]}  # JSON has no inf
    res = _pytest(run, phase, files, deadline, ["-p", "no:benchmark"], plan)
    recs = res.pop("records")
    run.result.setdefault("bench_records", []).extend(recs)
    summ = GP.summarize_tests(recs)
    rows = [r for r in recs if r.get("rec") == "row"]
    sel = next((r["selected"] for r in recs if r.get("rec") == "groups"), {})
    per_group = {g.name: {"selected": sel.get(g.name, 0),
                          "timed": sum(1 for r in rows if r.get("group") == g.name and r.get("timed"))} for g in groups}
    return {"status": "ok" if res["rc"] in (0, 5) else ("timed out" if res["timed_out"] else "failed"),
            **res, **summ, "groups": per_group, "rows": len(rows)}


def ncu_cmd(run: Run, csv_path: str, sections: bool) -> List[str]:
    names = sorted({k["kernel"].split("::")[-1] for k in load_compile_report().get("kernels", [])})
    cmd = [run.tools["ncu"], "--csv", "--print-units", "base", "--log-file", csv_path, "--clock-control", "none",
           "--launch-count", "200", "--kernel-name", "regex:" + "|".join(names)]
    cmd += (["--section", "LaunchStats", "--section", "Occupancy", "--section", "SpeedOfLight"] if sections
            else ["--metrics", ",".join(GP.NCU_METRICS)])
    backends = "cuda,triton" if "ext" in run.have else "triton"
    return cmd + [sys.executable, "-m", "bench.sanitize_driver", "--backend", backends, "--shapes", "bert",
                  "--repeat", "2"]


def run_ncu(run: Run, deadline: float) -> dict:
    """Registers, shared memory and occupancy of every kernel at BERT shapes, next to the compile report.
    First with the metrics by name; if that profiles nothing (a metric this ncu does not know), with the
    sections that hold them."""
    launches, res, text = [], {}, ""
    for sections in (False, True):
        if time.time() > deadline - 15:
            break
        csv_path = os.path.join(run.work, f"ncu{'-sections' if sections else ''}.csv")
        res = run.capped("ncu-sections" if sections else "ncu", ncu_cmd(run, csv_path, sections), deadline)
        text = open(csv_path, errors="replace").read() if os.path.exists(csv_path) else ""
        launches = GP.parse_ncu_csv(text) or GP.parse_ncu_csv(open(res["log"], errors="replace").read())
        if launches:
            break
    rows = GP.compare_occupancy(launches, load_compile_report(), run.result.get("env", {}).get("capability") or "9.0")
    run.result["ncu_rows"] = rows
    if text:
        with open(os.path.join(run.out, P.OUT_FILES["ncu"]), "w") as f:
            f.write(P.clip_text(text, P.MAX_FILE_BYTES // 2, "ncu output"))
    return {"status": "ok" if rows else "no kernels profiled", **res, "kernels": len(rows),
            "first_lines": text.splitlines()[:5]}


def run_sanitize_more(run: Run, deadline: float) -> dict:
    out = {}
    steps = [("initcheck", "cuda"), ("synccheck", "cuda"), ("memcheck", "triton")]
    for tool, backend in steps:
        if backend == "cuda" and "ext" not in run.have:
            out[f"{tool}-{backend}"] = {"status": "skipped: fastbert._C not built"}
            continue
        if time.time() > deadline - 10:
            out[f"{tool}-{backend}"] = {"status": "skipped: no time left"}
            continue
        r = run_sanitizer(run, deadline, tool, backend, label=f"{tool}-{backend}")
        out[f"{tool}-{backend}"] = {k: r.get(k) for k in ("status", "complete", "summary", "per_kernel", "failed_cases",
                                                         "seconds", "cmd")}
    return {"status": "ok", "steps": out}


RUNNERS = {
    "env": run_env, "build": run_build,
    "correct-triton": lambda run, dl: run_correct(run, dl, "triton"),
    "correct-cuda": lambda run, dl: run_correct(run, dl, "cuda"),
    "memcheck": lambda run, dl: run_sanitizer(run, dl, "memcheck"),
    "racecheck": lambda run, dl: run_sanitizer(run, dl, "racecheck"),
    "bench-core": lambda run, dl: run_bench(run, dl, "bench-core"),
    "ncu": run_ncu,
    "bench-rest": lambda run, dl: run_bench(run, dl, "bench-rest"),
    "sanitize-more": run_sanitize_more,
}


def unmet(run: Run, phase: P.Phase) -> List[str]:
    need = set(phase.needs)
    if run.dry:
        need -= {"gpu", "ext", "compute-sanitizer"}  # walked on CPU (ncu has nothing to walk without a GPU)
    return sorted(need - run.have)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="results folder (on the device tool: $OUT)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="seconds for the whole run (default 480)")
    ap.add_argument("--dry-run", action="store_true", help="walk every phase on CPU with smoke shapes")
    ap.add_argument("--phases", default="", help="run only these phases (comma-separated; results always runs)")
    ap.add_argument("--skip", default="", help="skip these phases (comma-separated)")
    ap.add_argument("--plan", action="store_true", help="print the phase plan and exit")
    args = ap.parse_args(argv)
    if args.plan:
        print(P.plan_markdown(P.PHASES, args.budget_s))
        return 0
    run = Run(args)
    from bench import gpu_summary as S
    print(P.plan_markdown(run.phases, args.budget_s), flush=True)
    for phase in run.phases:
        rec = run.phase(phase.name)
        if phase.name == "results":
            break
        build = next((p for p in run.phases if p.name == "build"), None)
        if build is not None and phase.name not in build.alongside:
            join_build(run)   # nothing but the phases alongside it shares the machine with the compilers
        missing = unmet(run, phase)
        if missing:
            rec["status"] = f"skipped: needs {', '.join(missing)}"
            run.budget.skip(phase.name)
            continue
        t0 = time.time()
        deadline = run.budget.deadline(phase.name, t0)
        if deadline - t0 < MIN_WINDOW_S:
            rec["status"] = f"skipped: {deadline - t0:.0f}s left for it"
            run.budget.skip(phase.name)
            continue
        rec.update(started_s=round(t0 - run.budget.start, 1), window_s=round(deadline - t0, 1))
        print(f"[gpu_run {t0 - run.budget.start:5.0f}s] {phase.name}: window {deadline - t0:.0f}s", flush=True)
        try:
            rec.update(RUNNERS[phase.name](run, deadline))
        except Exception as e:  # noqa: BLE001 - one phase's crash never stops the later ones
            rec.update(status="crashed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
        rec["used_s"] = round(time.time() - t0, 1)
        if not phase.background:
            run.budget.finish(phase.name)
        try:
            S.write_results(run, final=False)   # a killed run still returns what it had
        except Exception as e:  # noqa: BLE001 - the final write below tries again
            rec["results_error"] = f"{type(e).__name__}: {e}"
    join_build(run)
    t0 = time.time()
    run.phase("results").update(started_s=round(t0 - run.budget.start, 1))
    run.result["budget_check"] = budget_check(run)
    problems = S.write_results(run, final=True)
    run.phase("results").update(status="ok" if not problems else "problems", used_s=round(time.time() - t0, 1))
    problems = S.write_results(run, final=True)
    print(S.console_summary(run), flush=True)
    shutil.rmtree(run.work, ignore_errors=True)
    strict = run.result["budget_check"] + (run.result["plan_problems"] if run.dry else [])
    for p in problems + strict:
        print(f"gpu_run problem: {p}", file=sys.stderr)
    return 1 if problems or strict else 0


def budget_check(run: Run) -> List[str]:
    """Phases that ran past their window by more than the stop sequence allows, and a run past its budget."""
    out = []
    for name, rec in run.result["phases"].items():
        if rec.get("window_s") is not None and rec.get("used_s", 0) > rec["window_s"] + GRACE_S + 7:
            out.append(f"{name} used {rec['used_s']}s of a {rec['window_s']}s window")
    total = time.time() - run.budget.start
    if total > run.args.budget_s + 2 * GRACE_S + 10:
        out.append(f"the run took {total:.0f}s of a {run.args.budget_s:.0f}s budget")
    return out


if __name__ == "__main__":
    sys.exit(main())
