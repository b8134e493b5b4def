"""The environment phase of ``bench.gpu_run``: what the machine is (GPU, SMs, clocks, driver, versions of
everything the run uses, the tools it finds) and the same-run anchors every ratio is taken against
(device copy GB/s and bf16 matmul TFLOP/s, measured by the suite's own calibration benchmarks)."""
from __future__ import annotations

import glob
import importlib.metadata as md
import os
import platform
import re
import shutil
import subprocess
import time
from typing import List, Optional

from bench.checkout import ROOT

PACKAGES = ("torch", "triton", "numpy", "transformers", "pytest", "pytest-benchmark", "pytest-xdist",
            "pytest-timeout", "matplotlib", "safetensors", "tokenizers", "pyyaml", "tqdm", "datasets", "setuptools")


def find_tool(name: str) -> Optional[str]:
    cands = [shutil.which(name)]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            cands.append(os.path.join(home, "bin", name))
    cands += sorted(glob.glob(f"/usr/local/cuda-*/bin/{name}"), reverse=True)
    cands += sorted(glob.glob(f"/opt/nvidia/*/{name}") + glob.glob(f"/opt/nvidia/*/*/{name}"), reverse=True)
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def _version_line(cmd: List[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        return out[-1] if out else None
    except Exception as e:  # noqa: BLE001 - a tool that cannot say its version is recorded as such
        return f"failed: {e}"


def api_check() -> dict:
    """The torch.library / triton.language names fastbert's sources use, and whether this machine's
    torch and triton have them (the GPU machine's versions are older than the development ones)."""
    found = {"torch.library": set(), "tl": set()}
    for pat, key, files in ((r"torch\.library\.(\w+)", "torch.library", glob.glob(f"{ROOT}/fastbert/**/*.py", recursive=True)),
                            (r"\btl\.(\w+)", "tl", glob.glob(f"{ROOT}/kernels/*.py"))):
        for path in files:
            with open(path) as f:
                found[key].update(re.findall(pat, f.read()))
    out = {}
    import torch.library
    out["torch.library"] = {n: hasattr(torch.library, n) for n in sorted(found["torch.library"])}
    try:
        import triton.language as tl
        out["tl"] = {n: hasattr(tl, n) for n in sorted(found["tl"])}
    except Exception as e:  # noqa: BLE001
        out["tl"] = f"triton.language not importable: {e}"
    missing = [f"{k}.{n}" for k, v in out.items() if isinstance(v, dict) for n, ok in v.items() if not ok]
    return {"names": out, "missing": missing}


def nvidia_smi() -> Optional[dict]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    q = ("name,driver_version,pstate,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,power.limit,"
         "temperature.gpu,memory.total,memory.used,utilization.gpu")
    try:
        out = subprocess.run([smi, f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=15).stdout.strip().splitlines()
    except Exception as e:  # noqa: BLE001
        return {"error": str(e)}
    return dict(zip(q.split(","), [v.strip() for v in out[0].split(",")])) if out else None


# ---------------------------------------------------------------------------------------------------
# phases
# ---------------------------------------------------------------------------------------------------
def run_env(run, deadline: float) -> dict:
    import torch

    from bench import common
    from bench import report as BR
    from bench import test_bench_calibration as cal
    from bench.gpu_plugin import OwnBenchmark
    rec = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "packages": {}, "bench_mode": common.MODE}
    for p in PACKAGES:
        try:
            rec["packages"][p] = md.version(p)
        except md.PackageNotFoundError:
            rec["packages"][p] = None
    rec["triton"] = rec["packages"].get("triton")
    for tool in ("nvcc", "compute-sanitizer", "ncu"):
        run.tools[tool] = find_tool(tool)
        rec[tool] = {"path": run.tools[tool], "version": _version_line([run.tools[tool], "--version"]) if run.tools[tool] else None}
        if run.tools[tool] and tool != "nvcc":
            run.have.add(tool)
    rec["api_check"] = api_check()
    if torch.cuda.is_available() and not run.dry:
        run.have.add("gpu")
        p = torch.cuda.get_device_properties(0)
        rec.update(gpu=p.name, sms=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                   memory_bytes=p.total_memory, l2_bytes=getattr(p, "L2_cache_size", None))
    else:
        rec.update(gpu=None, capability="9.0" if run.dry else None)
    rec["nvidia_smi_before"] = nvidia_smi()
    rows = []
    for make in (cal._copy, cal._matmul):   # the calibration benchmarks, timed by bench.common
        if time.time() > deadline:
            break
        bm = OwnBenchmark()
        try:
            common.run(bm, make(), "fwd")
        except BaseException as e:  # noqa: BLE001 - pytest.skip() is a BaseException; record, go on
            bm.extra_info["error"] = f"{type(e).__name__}: {e}"
        rows.append(dict(bm.extra_info, nodeid=f"env::{bm.extra_info.get('op')}"))
    rec["nvidia_smi_after"] = nvidia_smi()
    c = BR.calibration(rows)
    rec.update(copy_gbps=c["copy_gbps"], matmul_tflops=c["matmul_tflops"], calibration_rows=rows)
    run.result["env"] = rec
    return {"status": "ok"}
