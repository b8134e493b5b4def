"""pytest plugin used by ``bench.gpu_run`` for its test and benchmark phases (``-p bench.gpu_plugin
--fb-plan PLAN.json``). It

* makes fastbert importable from the checkout (``bench.checkout``: nothing is installed on the GPU machine);
* stops starting tests once the phase's deadline (wall clock, shared with gpu_run and xdist workers)
  is near, so pytest ends on its own and every result so far is kept;
* writes each result the moment it exists to a JSON Lines file (outcomes; for benchmarks the row that
  ``bench.common.run`` put in ``benchmark.extra_info`` and every provider that was missing), so even a
  killed run leaves its results behind;
* in benchmark mode selects and orders the items by the plan's groups (``bench.gpu_plan.BenchGroup``:
  case by case, every provider of a case before the next case) and gives each group its time window
  by the budget rule of ``bench.gpu_plan``;
* provides the ``benchmark`` fixture itself (``-p no:benchmark`` keeps pytest-benchmark out): the suite
  uses only ``group``, ``extra_info`` and ``pedantic``, and its numbers are ours (CUDA events in
  ``bench.common``), so the run needs no pytest-benchmark on the GPU machine.
"""
from __future__ import annotations

import json
import os
import sys
import time

import pytest

from bench.checkout import ensure_importable

IMPORT_MODE = ensure_importable()
MARGIN_S = 3.0  # stop starting tests this long before the deadline (teardown, pytest's own exit)


def pytest_addoption(parser):
    parser.addoption("--fb-plan", default=None, help="bench.gpu_run's plan file for this phase (JSON)")


def pytest_addhooks(pluginmanager):
    if pluginmanager.is_blocked("benchmark"):
        # bench/conftest.py implements pytest-benchmark's JSON hook; with that plugin blocked the hook
        # must still be known to pytest or the conftest would be refused.
        pluginmanager.add_hookspecs(_BenchmarkHookSpec)


class _BenchmarkHookSpec:
    @pytest.hookspec
    def pytest_benchmark_update_json(self, config, benchmarks, output_json):
        """pytest-benchmark's hook (never called here)."""


class OwnBenchmark:
    """The part of pytest-benchmark's fixture the suite uses. ``pedantic`` runs the target once: the
    timings are taken by ``bench.common`` before it (CUDA events), pytest-benchmark's extra wall-clock
    rounds would only cost device time."""

    def __init__(self):
        self.group = None
        self.extra_info = {}
        self.wall_ms = None

    def pedantic(self, target, args=(), kwargs=None, rounds=1, iterations=1, warmup_rounds=0, setup=None):
        t0 = time.perf_counter()
        out = target(*args, **(kwargs or {}))
        self.wall_ms = (time.perf_counter() - t0) * 1e3
        return out

    def __call__(self, fn, *args, **kwargs):
        return self.pedantic(fn, args, kwargs)


class _OwnBenchmarkFixture:
    @pytest.fixture
    def benchmark(self):
        return OwnBenchmark()


class GpuRunPlugin:
    def __init__(self, config, plan: dict):
        self.config = config
        self.plan = plan
        self.worker = hasattr(config, "workerinput")
        self.deadline = float(plan.get("deadline", float("inf")))
        self.record_path = plan.get("record")
        self.groups = []
        self.group_of_item = {}
        self.group_deadline = {}
        self.budget = None
        self.n_missing = 0

    # -- recording (controller only: xdist workers forward their reports to it) -------------------
    def write(self, rec: dict) -> None:
        if self.worker or not self.record_path:
            return
        rec = dict(rec, t=time.time(), phase=self.plan.get("phase"))
        with open(self.record_path, "a") as f:
            f.write(json.dumps(rec, default=repr) + "\n")

    # -- selection and ordering (benchmark mode) ---------------------------------------------------
    def pytest_collection_modifyitems(self, session, config, items):
        if self.plan.get("mode") != "bench":
            return
        from bench import gpu_plan as P
        self.groups = [P.BenchGroup(**{**g, "tests": tuple(g["tests"]), "providers": tuple(g["providers"]),
                                       "passes": tuple(g["passes"]),
                                       "params": {k: tuple(v) for k, v in g["params"].items()},
                                       "shape_ids": tuple(tuple(a) for a in g["shape_ids"]),
                                       "shape_params": {k: tuple(v) for k, v in g["shape_params"].items()}})
                       for g in self.plan["groups"]]
        smoke, skip = bool(self.plan.get("smoke")), set(self.plan.get("skip_nodeids", ()))
        keep, cases = [], {}
        for it in items:
            params = dict(getattr(getattr(it, "callspec", None), "params", {}) or {})
            gi = P.group_of(it.nodeid, params, self.groups, smoke)
            if gi is None or it.nodeid in skip:
                continue
            case = cases.setdefault((gi, P.case_key(it.nodeid, params)), len([k for k in cases if k[0] == gi]))
            if self.plan.get("dry_run") and case > 0:
                continue  # a dry run walks the first case of every group
            keep.append((gi, P.order_key(self.groups[gi], it.nodeid, case, params), it))
            self.group_of_item[it.nodeid] = gi
        keep.sort(key=lambda x: (x[0], x[1]))
        dropped = [it for it in items if it.nodeid not in self.group_of_item]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = [it for _, _, it in keep]
        used = {gi for gi, _, _ in keep}
        start = time.time()
        self.budget = P.Budget(self.groups, max(self.deadline - start, 0.0), time.time, start=start)
        for gi, g in enumerate(self.groups):
            if gi not in used:
                self.budget.skip(g.name)
        self.write({"rec": "groups", "selected": {g.name: sum(1 for _, _, it in keep if self.group_of_item[it.nodeid] == gi)
                                                   for gi, g in enumerate(self.groups)}})

    # -- deadlines ---------------------------------------------------------------------------------
    def pytest_runtest_setup(self, item):
        from bench import gpu_plan as P
        now = time.time()
        gi = self.group_of_item.get(item.nodeid)
        params = dict(getattr(getattr(item, "callspec", None), "params", {}) or {})
        group_end = None
        if gi is not None:
            g = self.groups[gi]
            if g.name not in self.group_deadline:   # the group's window opens with its first test
                for prev in self.group_deadline:
                    self.budget.finish(prev)
                self.group_deadline[g.name] = self.budget.deadline(g.name, now)
            group_end = (g.name, self.group_deadline[g.name])
        why = P.skip_reason(now, self.deadline - MARGIN_S, group_end,
                            0.0 if (gi is None or self.plan.get("dry_run")) else P.est_seconds(params, item.nodeid),
                            params.get("provider") in self.plan.get("dry_skip_providers", ()) and bool(self.plan.get("dry_run")))
        if why:
            pytest.skip(why)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_makereport(self, item, call):
        # Returns None, so pytest's own implementation still makes the report (a firstresult hook).
        if call.when != "call":
            return None
        bm = getattr(item, "funcargs", {}).get("benchmark")
        info = getattr(bm, "extra_info", None)
        if info and "op" in info:
            gi = self.group_of_item.get(item.nodeid)
            self.write({"rec": "row", "nodeid": item.nodeid, "name": item.name,
                        "group": self.groups[gi].name if gi is not None else None,
                        "raised": call.excinfo is not None, **info})
        return None

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and not report.passed) or \
                (report.when == "teardown" and report.failed):
            msg = ""
            if report.skipped and isinstance(report.longrepr, tuple):
                msg = str(report.longrepr[2])
            elif report.failed:
                crash = getattr(report.longrepr, "reprcrash", None)
                msg = crash.message if crash is not None else str(report.longrepr)[-2000:]
            outcome = "error" if (report.failed and report.when != "call") else report.outcome
            gi = self.group_of_item.get(report.nodeid)
            self.write({"rec": "outcome", "nodeid": report.nodeid, "outcome": outcome, "when": report.when,
                        "duration": round(report.duration, 3), "message": msg[:2000],
                        "group": self.groups[gi].name if gi is not None else None})
        common = sys.modules.get("bench.common")
        missing = getattr(common, "MISSING", None)
        if missing is not None and len(missing) > self.n_missing:
            for m in missing[self.n_missing:]:
                self.write({"rec": "missing", **m})
            self.n_missing = len(missing)

    def pytest_collectreport(self, report):
        if report.failed:
            self.write({"rec": "collect-error", "nodeid": report.nodeid, "message": str(report.longrepr)[-3000:]})

    def pytest_collection_finish(self, session):
        self.write({"rec": "collected", "n": len(session.items), "import_mode": IMPORT_MODE})


def pytest_configure(config):
    path = config.getoption("--fb-plan")
    if not path:
        return
    with open(path) as f:
        plan = json.load(f)
    config.pluginmanager.register(GpuRunPlugin(config, plan), "fastbert-gpu-run")
    if config.pluginmanager.is_blocked("benchmark"):
        config.pluginmanager.register(_OwnBenchmarkFixture(), "fastbert-own-benchmark")
    os.environ.setdefault("FASTBERT_GPU_RUN_PHASE", str(plan.get("phase")))
