"""The benchmark suite stays runnable without a GPU, and its report never claims a speed it did not measure.

1. ``pytest bench/ --benchmark-only`` in smoke mode (tiny shapes, one round, reference + Triton
   interpreter) as a subprocess, then ``python -m bench.report`` on its JSON into a temp results dir:
   both succeed and the report says plainly that no timings were taken.
2. The report's timed path on a synthetic run (hand-made numbers, so the arithmetic is checkable):
   speedup vs the fastest peer, fraction of copy bandwidth, TFLOP/s, results JSON and chart written.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ)
    env["FASTBERT_BENCH_SMOKE"] = "1"   # smoke mode even where a GPU is visible
    env["TRITON_INTERPRET"] = "1"
    env.pop("FASTBERT_BACKEND", None)
    return env


def test_bench_suite_smoke_and_report(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--benchmark-only",
                           f"--benchmark-json={out}", "-q", "-p", "no:cacheprovider", "-x"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    errors = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR", "E "))]
    assert proc.returncode == 0, "\n".join(errors[-80:]) + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    fb = data["fastbert"]
    assert fb["env"]["mode"] == "smoke"
    rows = [b["extra_info"] for b in data["benchmarks"]]
    assert rows and not any(r["timed"] for r in rows)
    ops = {r["op"] for r in rows}
    assert {"attention", "layer_norm", "bias_gelu", "geglu", "mlm_loss", "unpad", "pad", "copy", "matmul",
            "hf_encoder"} <= ops
    # Providers that cannot run are recorded with a reason, not dropped (no CUDA extension in smoke mode).
    assert any(m["provider"] == "fastbert-cuda" and m["reason"] for m in fb["missing"])

    results = tmp_path / "results"
    rep = subprocess.run([sys.executable, "-m", "bench.report", str(out), "--results-dir", str(results)],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    assert "NO TIMINGS WERE TAKEN" in rep.stdout
    assert "fastbert-cuda" in rep.stdout  # the missing table names it
    written = list(results.iterdir())
    assert [p.name for p in written if p.suffix == ".json"] and not [p for p in written if p.suffix == ".png"]
    res = json.loads([p for p in written if p.suffix == ".json"][0].read_text())
    assert res["timed"] is False and "table" not in res


def _row(op, provider, role, ms, shape="s", pass_="fwd", **kw):
    info = {"op": op, "shape": shape, "pass": pass_, "provider": provider, "role": role, "kind": "bandwidth",
            "flops": 0.0, "bytes": 0.0, "tokens": 0, "mode": "gpu", "timed": True, "median_ms": ms,
            "p20_ms": ms * 0.9, "p80_ms": ms * 1.1, "peak_extra_bytes": 2**20, **kw}
    return {"name": f"{op}-{provider}", "extra_info": info}


def test_report_timed_path(tmp_path):
    pytest.importorskip("matplotlib")
    from bench import report
    data = {"datetime": "2031-01-02T03:04:05", "benchmarks": [
        _row("copy", "torch-copy", "calibration", 1.0, bytes=2e9),                 # 2000 GB/s
        _row("matmul", "torch-matmul", "calibration", 1.0, kind="compute", flops=5e11),  # 500 TFLOP/s
        _row("layer_norm", "fastbert-triton", "fastbert", 0.5, bytes=8e8),         # 1600 GB/s = 80%
        _row("layer_norm", "fastbert-cuda", "fastbert", 0.4, bytes=8e8),
        _row("layer_norm", "eager", "peer", 1.0, bytes=8e8),
        _row("layer_norm", "compile", "peer", 0.6, bytes=8e8),
        _row("attention", "fastbert-cuda", "fastbert", 2.0, kind="compute", flops=1e12),  # 500 TFLOP/s
        _row("attention", "sdpa-flash-nobias", "peer", 1.8, kind="compute", flops=1e12),
    ], "fastbert": {"env": {"mode": "gpu", "gpu": "NVIDIA H100 80GB HBM3", "torch": "x", "triton": "y",
                            "cuda": "z", "command": "python -m pytest bench/"},
                    "missing": [{"op": "attention", "shape": "s", "pass": "fwd", "provider": "flex-alibi",
                                 "reason": "because"}]}}
    src = tmp_path / "run.json"
    src.write_text(json.dumps(data))
    assert report.main([str(src), "--results-dir", str(tmp_path / "res")]) == 0
    res = json.loads((tmp_path / "res" / "NVIDIA-H100-80GB-HBM3-2031-01-02.json").read_text())
    assert (tmp_path / "res" / "NVIDIA-H100-80GB-HBM3-2031-01-02.png").stat().st_size > 0
    assert res["calibration"]["copy_gbps"] == pytest.approx(2000)
    ln = {r["provider"]: r for r in res["table"] if r["op"] == "layer_norm"}
    assert ln["fastbert-triton"]["peer"] == "compile"                      # the fastest peer
    assert ln["fastbert-triton"]["speedup"] == pytest.approx(1.2)
    assert ln["fastbert-triton"]["frac_copy"] == pytest.approx(0.8)
    att = [r for r in res["table"] if r["op"] == "attention"][0]
    assert att["tflops"] == pytest.approx(500) and att["mfu"] == pytest.approx(500 / 989)
    assert att["speedup"] == pytest.approx(0.9)
    vs = {(r["op"], r["peer"]): r for r in res["vs_peers"]}
    assert vs[("layer_norm", "eager")]["fastbert"] == "fastbert-cuda" and vs[("layer_norm", "eager")]["speedup"] == 2.5
    assert res["missing"][0]["provider"] == "flex-alibi"


def test_report_scaling_with_sequence_length():
    """The windowed-attention group's time-vs-length table: growth 1 for a linear provider, S ratio for a
    quadratic one (hand-made numbers)."""
    from bench import report
    rows = []
    for S, lin, quad in ((512, 1.0, 1.0), (1024, 2.0, 4.0), (8192, 16.0, 256.0)):
        for prov, ms in (("fastbert-cuda", lin), ("sdpa-band-mask", quad)):
            rows.append(_row("attention_window", prov, "peer", ms, shape=f"S{S}", seqlen=S)["extra_info"])
    rows.append(_row("layer_norm", "eager", "peer", 1.0)["extra_info"])  # no seqlen: not in the table
    sc = {r["provider"]: r for r in report.scaling(rows)}
    assert set(sc) == {"fastbert-cuda", "sdpa-band-mask"}
    assert sc["fastbert-cuda"]["growth"] == pytest.approx(1.0)
    assert sc["sdpa-band-mask"]["growth"] == pytest.approx(16.0)
    table = report.scaling_markdown(list(sc.values()))
    assert "ms at S=8192" in table and "| 16.00 |" in table
