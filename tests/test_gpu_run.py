"""``python -m bench.gpu_run``, the prepared call for a lent GPU: its plan and budget arithmetic, the
benchmark groups against the real suite, the parsers of the tools' outputs, the results-folder limits,
importing from a bare checkout, and the whole run walked on CPU (``--dry-run``)."""
import json
import os
import subprocess
import sys

import pytest

from bench import gpu_parse as GP
from bench import gpu_plan as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures", "gpu_run")


def _fix(name):
    with open(os.path.join(FIX, name)) as f:
        return f.read()


# ---------------------------------------------------------------------------------------------------
# plan and budget
# ---------------------------------------------------------------------------------------------------
def test_default_plan_fits_and_groups_fit_their_phase():
    assert P.check_plan(P.PHASES, 480) == []
    core = next(p for p in P.PHASES if p.name == "bench-core")
    assert P.check_plan(P.CORE_GROUPS, core.reserve_s) == []
    assert P.PHASES[-1].name == "results" and P.PHASES[0].name == "env"
    assert P.check_plan(P.PHASES, 200), "reserves larger than the budget must be reported"


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.mark.parametrize("total", [480.0, 300.0, 150.0])
def test_overrunning_phases_leave_every_later_phase_its_reserve(total):
    """Every phase uses its whole window (the worst case): each still gets at least its (scaled)
    reserve, the run ends inside the budget, and the background build never eats the reserve of a
    phase that must wait for it."""
    clock = FakeClock()
    b = P.Budget(P.PHASES, total, clock)
    windows, bg_end = {}, None
    for ph in P.PHASES:
        if bg_end is not None and ph.name not in P.PHASES[1].alongside:
            clock.t = max(clock.t, bg_end)
            bg_end = None
        start = clock.t
        end = b.deadline(ph.name)
        windows[ph.name] = end - start
        assert end <= b.end + 1e-9
        if ph.background:
            bg_end = end
        else:
            clock.t = end
        b.finish(ph.name)
    for ph in P.PHASES:
        if not ph.background:
            assert windows[ph.name] >= min(ph.cap_s, ph.reserve_s * b.scale) - 1e-6, (ph.name, windows)
    assert clock.t <= b.end + 1e-9


def test_skipped_phase_releases_its_reserve_and_caps_hold():
    clock = FakeClock()
    b = P.Budget(P.PHASES, 480, clock)
    before = b.deadline("correct-cuda")
    assert before - clock.t == 90          # its cap, with plenty left
    clock.t += 250                          # late: the phases after it need 190 s of the 230 s left
    squeezed = b.deadline("correct-cuda")
    assert squeezed - clock.t == pytest.approx(40)
    for name in ("memcheck", "racecheck"):
        b.skip(name)
    assert b.deadline("correct-cuda") - squeezed == pytest.approx(40)  # their two reserves came back
    # The build's window ignores the reserve of the tests running alongside it, not of the later phases.
    b2 = P.Budget(P.PHASES, 480, FakeClock())
    later = sum(p.reserve_s for p in P.PHASES[3:])
    assert b2.deadline("build") == pytest.approx(b2.start + min(200, 480 - later))


def test_plan_markdown_lists_every_phase():
    md = P.plan_markdown(P.PHASES, 480)
    assert all(f"| {p.name}" in md for p in P.PHASES)


# ---------------------------------------------------------------------------------------------------
# benchmark groups select the intended tests on a GPU (the dry run covers smoke mode)
# ---------------------------------------------------------------------------------------------------
def _gpu_attention_ids():
    from bench.common import Batch
    out = []
    for hidden in (768, 1024):
        for S in (128, 256, 512):
            out.append((f"{Batch(16384 // S, S).name}xH{hidden // 64}xD64", S, hidden // 64))
    return out


def test_core_groups_select_bert_shapes_on_gpu():
    seen = set()
    for shape, S, H in _gpu_attention_ids():
        for prov in ("fastbert-cuda", "flex-alibi", "reference"):
            nodeid = f"bench/test_bench_attention.py::test_attention[{shape}-{prov}-fwdbwd]"
            gi = P.group_of(nodeid, {"provider": prov, "pass_": "fwdbwd"}, P.CORE_GROUPS, smoke=False)
            name = None if gi is None else P.CORE_GROUPS[gi].name
            want = None if (S == 256 or H != 12 or prov == "reference") else \
                ("attention-flex" if prov == "flex-alibi" else "attention")
            assert name == want, (nodeid, name)
            seen.add(name)
    ln = "bench/test_bench_ops.py::test_layer_norm[768-residual-eager-fwd]"
    assert P.CORE_GROUPS[P.group_of(ln, {"hidden": 768, "residual": True, "provider": "eager", "pass_": "fwd"},
                                    P.CORE_GROUPS, smoke=False)].name == "layer_norm+residual"
    assert P.group_of(ln, {"hidden": 1024, "residual": True, "provider": "eager", "pass_": "fwd"},
                      P.CORE_GROUPS, smoke=False) is None
    assert P.group_of(ln, {"hidden": 768, "residual": False, "provider": "eager", "pass_": "fwd"},
                      P.CORE_GROUPS, smoke=False) is None
    tr = "bench/test_bench_train.py::test_train_step[hf-bert-sdpa]"
    assert P.CORE_GROUPS[P.group_of(tr, {"provider": "hf-bert-sdpa"}, P.CORE_GROUPS, False)].name == "train_step"
    assert P.group_of(tr, {"provider": "fastbert-torch"}, P.REST_GROUPS, False) == 0
    assert P.group_of("bench/test_bench_calibration.py::test_copy_bandwidth", {}, P.REST_GROUPS, False) is None
    files = P.group_files(P.REST_GROUPS, ROOT)   # new bench files join the rest by themselves
    assert {"bench/test_bench_attention.py", "bench/test_bench_ops.py", "bench/test_bench_train.py"} <= set(files)
    assert "bench/test_bench_calibration.py" not in files


def test_compiled_peers_run_in_the_listed_order():
    g = next(g for g in P.CORE_GROUPS if g.name == "compiled-peers")
    ids = [f"bench/test_bench_ops.py::{f}[768-compile-fwdbwd]" for f in
           ("test_mlm_loss", "test_padding", "test_bias_gelu", "test_geglu", "test_layer_norm")]
    ordered = sorted(ids, key=lambda n: P.order_key(g, n, 0, {"provider": "compile"}))
    assert [n.split("::")[1].split("[")[0] for n in ordered] == \
        ["test_layer_norm", "test_geglu", "test_bias_gelu", "test_padding", "test_mlm_loss"]


PLUGIN_TESTS = """
import time, pytest

@pytest.mark.parametrize("pass_", ["fwd", "bwd"])
@pytest.mark.parametrize("provider", ["ours", "peer"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_a(benchmark, n, provider, pass_):
    time.sleep(0.4)
    benchmark.extra_info.update(op="a", shape=str(n), provider=provider, role="peer", timed=False)
    benchmark.pedantic(lambda: None)

@pytest.mark.parametrize("provider", ["ours", "other"])
def test_b(benchmark, provider):
    benchmark.extra_info.update(op="b", shape="s", provider=provider, role="peer", timed=False)
"""


def _plugin_run(tmp_path, plan):
    (tmp_path / "test_fake_bench.py").write_text(PLUGIN_TESTS)
    record = tmp_path / "rec.jsonl"
    (tmp_path / "plan.json").write_text(json.dumps(dict(plan, record=str(record), phase="t")))
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "pytest", "test_fake_bench.py", "-p", "no:benchmark", "-p", "bench.gpu_plugin",
                        f"--fb-plan={tmp_path / 'plan.json'}", "-q", "-p", "no:cacheprovider", f"--rootdir={tmp_path}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return GP.read_jsonl(str(record))


def test_plugin_orders_groups_cuts_them_in_time_and_records_rows(tmp_path):
    """Group "a" (cap 1 s) runs case by case, both providers of a case together, and stops starting
    tests when its window closes; group "b" still gets its turn; every row is recorded as it happens."""
    import time
    groups = [dict(name="a", tests=["test_fake_bench.py::test_a"], providers=["ours", "peer"], passes=["fwd"],
                   params={}, shape_ids=[], shape_params={}, reserve_s=0.5, cap_s=1.0),
              dict(name="b", tests=["test_fake_bench.py"], providers=[], passes=[], params={}, shape_ids=[],
                   shape_params={}, reserve_s=0.5, cap_s=30.0)]
    recs = _plugin_run(tmp_path, {"mode": "bench", "deadline": time.time() + 60, "groups": groups})
    outs = [r for r in recs if r.get("rec") == "outcome"]
    order = [(r["nodeid"].split("::")[1], r["outcome"]) for r in outs]
    assert order[0] == ("test_a[1-ours-fwd]", "passed")
    assert [n for n, _ in order[:6]] == [f"test_a[{n}-{p}-fwd]" for n in (1, 2, 3) for p in ("ours", "peer")]
    assert any(o == "skipped" for _, o in order[:6]), "group a's 1 s window must close before its 6 x 0.4 s"
    assert [n for n, o in order[6:]] == ["test_a[1-ours-bwd]", "test_a[1-peer-bwd]", "test_a[2-ours-bwd]",
                                         "test_a[2-peer-bwd]", "test_a[3-ours-bwd]", "test_a[3-peer-bwd]",
                                         "test_b[ours]", "test_b[other]"][:len(order) - 6]
    assert ("test_b[ours]", "passed") in order and ("test_b[other]", "passed") in order
    rows = [r for r in recs if r.get("rec") == "row"]
    assert {(r["op"], r["provider"]) for r in rows} >= {("a", "ours"), ("b", "other")}
    assert next(r for r in recs if r.get("rec") == "groups")["selected"] == {"a": 6, "b": 8}


def test_skip_reason_phase_then_group_then_estimate():
    assert P.skip_reason(100, 100, None, 0, False) == "gpu_run: the phase's time is up"
    assert "dry run" in P.skip_reason(10, 100, ("g", 50), 0, True)
    assert P.skip_reason(60, 100, ("g", 50), 0, False) == "gpu_run: group g's time is up"
    assert "30s needed" in P.skip_reason(80, 100, ("g", 90), 30, False)
    assert P.skip_reason(49, 100, ("g", 50), 30, False) is None   # may overrun its group by one test


# ---------------------------------------------------------------------------------------------------
# parsers
# ---------------------------------------------------------------------------------------------------
def test_first_build_error_prefers_the_compiler_message():
    log = ("fastbert setup: building fastbert._C\n[1/3] c++ ... bindings.cpp\nwarning: unused variable\n"
           "/r/csrc/flash_attn.cu(212): error: identifier \"kBlockM\" is undefined\n  int x = kBlockM;\n"
           "FAILED: /r/build/flash_attn.o\nRuntimeError: Error compiling objects for extension\n")
    err = GP.first_build_error(log)
    assert err.startswith("/r/csrc/flash_attn.cu(212): error: identifier")
    assert GP.first_build_error("a.cpp:3:7: fatal error: torch/extension.h: No such file").startswith("a.cpp:3:7")
    assert GP.first_build_error("FAILED: x.o\nninja: build stopped").startswith("FAILED: x.o")
    assert GP.first_build_error("all good\n") is None


def test_kernel_names():
    assert GP.kernel_base("void fb::attn::flash_attn_fwd_kernel<64, __nv_bfloat16>(fb::attn::Params)+0x1a0") == \
        "fb::attn::flash_attn_fwd_kernel"
    assert GP.kernel_base("_ZN2fb20bias_gelu_bwd_kernelI6__halfLi1EEEvPKT_S4_PKfPS2_Pfiiib") == "fb::bias_gelu_bwd_kernel"
    assert GP.instance_key("void fb::k<__half, 8>(const __half *, int)") == GP.instance_key("fb::k<__half,8>(__half const*, int)")


def test_memcheck_errors_per_kernel_and_case():
    r = GP.parse_sanitizer(_fix("memcheck.txt"), "memcheck")
    assert r["complete"] and r["summary"] == {"errors": 2}
    assert r["per_kernel"] == {"fb::bias_gelu_fwd_kernel": {"errors": 1, "hazards": 0},
                               "fb::attn::flash_attn_bwd_dq_kernel": {"errors": 1, "hazards": 0}}
    assert set(r["per_case"]) == {"cuda:bias_gelu/tanh-nobias/N37:fp16", "cuda:attention/D64:bf16"}
    assert r["cases"]["cuda:bias_gelu/tanh-nobias/N37:fp16"]["status"] == "fail"
    assert r["driver_done"] == {"ok": 2, "na": 0, "fail": 1}


@pytest.mark.parametrize("fixture,expect", [
    ("racecheck.txt", {"fb::attn::flash_attn_fwd_kernel": {"errors": 1, "hazards": 3072},
                       "fb::layer_norm_bwd_kernel": {"warnings": 1, "hazards": 32}}),
    ("racecheck_old.txt", {"fb::geglu_bwd_kernel": {"errors": 1, "hazards": 64}}),
])
def test_racecheck_both_layouts(fixture, expect):
    r = GP.parse_sanitizer(_fix(fixture), "racecheck")
    assert r["complete"] and r["per_kernel"] == expect
    assert not GP.parse_sanitizer(_fix(fixture).rsplit("=========", 1)[0], "racecheck")["complete"]


def test_ncu_csv_joined_with_the_compile_report():
    with open(os.path.join(ROOT, "bench", "results", "compile-report.json")) as f:
        rep = json.load(f)
    rows = GP.compare_occupancy(GP.parse_ncu_csv(_fix("ncu_metrics.csv")), rep, "9.0")
    cuda = next(r for r in rows if r["base"] == "fb::layer_norm_fwd_kernel")
    assert cuda["candidates"] == 1 and "__nv_bfloat16, 8" in cuda["pred_name"]   # other demangler layout
    assert cuda["regs"] == 48 and cuda["theoretical_warps"] == 32 and cuda["time_us"] == pytest.approx(10.24)
    assert cuda["pred_warps"] is not None and cuda["pred_warps_report"] == cuda["pred_warps_report"]
    tri = next(r for r in rows if r["base"] == "_ln_fwd_kernel")
    assert tri["pred_regs"] == 38 and tri["smem_bytes"] == 4096
    sec = GP.parse_ncu_csv(_fix("ncu_sections.csv"))[0]["metrics"]
    assert sec["gpu__time_duration.sum"] == pytest.approx(12500) and sec["sm__maximum_warps_per_active_cycle_pct"] == 75


def test_jsonl_summary_survives_a_cut_line(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"rec": "outcome", "nodeid": "a", "outcome": "passed", "duration": 1.5}\n'
                 '{"rec": "outcome", "nodeid": "b", "outcome": "failed", "message": "boom", "duration": 2}\n'
                 '{"rec": "outcome", "nodeid": "c", "outco')
    s = GP.summarize_tests(GP.read_jsonl(str(p)))
    assert s["counts"] == {"passed": 1, "failed": 1} and s["failures"][0]["nodeid"] == "b"


# ---------------------------------------------------------------------------------------------------
# results folder limits
# ---------------------------------------------------------------------------------------------------
def test_out_dir_limits(tmp_path):
    assert P.check_out_dir(str(tmp_path)) == []
    for i in range(9):
        (tmp_path / f"f{i}.txt").write_text("x")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")
    (tmp_path / "bad name.txt").write_text("x")
    probs = "\n".join(P.check_out_dir(str(tmp_path)))
    assert "11 files" in probs and "deep.txt: more than 2 folders" in probs and "bad name.txt" in probs
    clipped = P.clip_text("H" * 1000 + "T" * 1000, 500, "log")
    assert len(clipped.encode()) < 600 and clipped.startswith("H") and clipped.endswith("T") and "left out" in clipped


def test_driver_covers_every_cuda_kernel_of_the_compile_report():
    from bench.sanitize_driver import SMALL_CASES
    with open(os.path.join(ROOT, "bench", "results", "compile-report.json")) as f:
        rep = json.load(f)
    built = {k["kernel"] for k in rep["kernels"] if k["source"] == "cuda"}
    covered = {k for c in SMALL_CASES for k in c.kernels}
    assert built <= covered, f"add a bench/sanitize_driver.py case for {sorted(built - covered)}"


def test_checkout_import_without_an_install(tmp_path):
    """On the GPU machine nothing is installed: fastbert.kernels (kernels/) must import from the tree."""
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
            "sys.path_hooks[:] = [h for h in sys.path_hooks if 'editable' not in repr(h).lower()]\n"
            "from bench.checkout import ensure_importable; mode = ensure_importable()\n"
            "import fastbert.kernels.padding as k; print(mode, k.__file__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    mode, path = r.stdout.split()
    assert mode in ("checkout", "installed") and path == os.path.join(ROOT, "kernels", "padding.py")


def test_sanitizer_commands_filter_to_every_fastbert_kernel():
    from types import SimpleNamespace
    from bench import gpu_run
    run = SimpleNamespace(dry=False, tools={"compute-sanitizer": "/cs"})
    cmd = gpu_run.sanitizer_cmd(run, "initcheck")
    filters = {cmd[i + 1] for i, a in enumerate(cmd) if a == "--kernel-name"}
    assert cmd[:3] == ["/cs", "--tool", "initcheck"] and "--no-poison" in cmd
    assert {"kns=flash_attn_bwd_dkdv_kernel", "kns=copy_rows_kernel", "kns=reduce_partials_kernel"} <= filters
    tri = gpu_run.sanitizer_cmd(run, "memcheck", "triton")
    assert "kns=_attn_fwd_kernel" in tri and tri[tri.index("--backend") + 1] == "triton" and "--no-poison" not in tri
    assert gpu_run.sanitizer_cmd(run, "memcheck", minimal=True)[:4] == ["/cs", "--tool", "memcheck", sys.executable]


def test_a_phase_past_its_deadline_is_stopped(monkeypatch):
    """SIGINT first (pytest still writes its summary), SIGKILL for a process that ignores it."""
    import time
    from bench import gpu_run
    monkeypatch.setattr(gpu_run, "GRACE_S", 0.5)
    stubborn = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    for code in ("import time; time.sleep(60)", stubborn):
        proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE)
        proc.stdout.readline() if code == stubborn else None
        t0 = time.time()
        assert gpu_run.wait_or_stop(proc, time.time() + 0.5) is True
        assert proc.returncode is not None and time.time() - t0 < 10
    quick = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    assert gpu_run.wait_or_stop(quick, time.time() + 60) is False and quick.returncode == 0


# ---------------------------------------------------------------------------------------------------
# the whole run, walked on CPU
# ---------------------------------------------------------------------------------------------------
def test_dry_run_walks_every_phase(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("FASTBERT_BACKEND", "TRITON_INTERPRET")}
    r = subprocess.run([sys.executable, "-m", "bench.gpu_run", "--out", str(out), "--dry-run"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "DRY RUN" in r.stdout
    res = json.loads((out / "gpu_run.json").read_text())
    assert P.check_out_dir(str(out)) == [] and res["out_check"] == []
    assert sorted(os.listdir(out)) == ["gpu_run.json", "logs.txt", "summary.md"]
    assert res["plan_problems"] == [] and res["plan"][-1]["end_s"] <= 480 and res["budget_check"] == []
    ph = res["phases"]
    assert set(ph) == {p.name for p in P.PHASES}
    assert ph["ncu"]["status"].startswith("skipped") or ph["ncu"]["status"] == "ok"
    for name in ("env", "correct-triton", "correct-cuda", "bench-core", "bench-rest", "sanitize-more", "results"):
        assert ph[name]["status"] == "ok", (name, ph[name])
    assert ph["build"]["status"].startswith("dry run") and ph["build"]["rc"] == 0
    assert ph["correct-cuda"]["n"] > 0 and ph["correct-cuda"]["failures"] == []
    assert ph["memcheck"]["driver_done"]["fail"] == 0 and ph["memcheck"]["driver_done"]["ok"] > 10
    groups = ph["bench-core"]["groups"]
    assert all(groups[g.name]["selected"] > 0 for g in P.CORE_GROUPS), groups
    rows = res["bench"]["rows"]
    assert {"attention", "layer_norm+residual", "geglu", "mlm_loss", "copy", "matmul"} <= {r["op"] for r in rows}
    assert not any(r.get("timed") for r in rows)
    assert "NO TIMINGS WERE TAKEN" in (out / "summary.md").read_text()
