"""Every csrc/*.cu compiles with the machine's nvcc for sm_80 and sm_90, warnings as errors, and ptxas
reports no register spill in any kernel unless the file explains why (a comment
``// fastbert: spill-ok: <reason>``). The ptxas report (registers, spills, shared memory per kernel) is
printed (``pytest -s`` shows it). Compiles run in parallel (FASTBERT_NVCC_JOBS, default 2) and reports are
cached by a hash of the sources, the flags and the nvcc version (under $FASTBERT_CACHE/nvcc_reports).
Skipped with the reason when no nvcc is installed.
"""
import concurrent.futures as cf
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import fastbert

CSRC = Path(__file__).resolve().parent.parent / "csrc"
ARCHS = ("80", "90")
FLAGS = ["-c", "-std=c++17", "-O3", "-lineinfo", "-Werror", "all-warnings", "-Xptxas", "-v", "--expt-relaxed-constexpr"]
SPILL_OK = re.compile(r"//\s*fastbert:\s*spill-ok:\s*\S")


def _nvcc():
    for cand in (os.environ.get("NVCC"), "/usr/local/cuda/bin/nvcc", shutil.which("nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="no nvcc found (/usr/local/cuda/bin/nvcc or on PATH)")
CU_FILES = sorted(p.name for p in CSRC.glob("*.cu"))


def _nvcc_version():
    return subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout


def _key(cu: str, arch: str) -> str:
    h = hashlib.sha256()
    for p in sorted(CSRC.iterdir()):  # the file and every header it may include
        if p.suffix in (".cuh", ".h") or p.name == cu:
            h.update(p.name.encode() + p.read_bytes())
    h.update(" ".join(FLAGS + [arch]).encode() + _nvcc_version().encode())
    return h.hexdigest()[:20]


def _cache_dir() -> Path:
    return fastbert.cache_dir("nvcc_reports")


def _compile(cu: str, arch: str):
    """(returncode, nvcc output, seconds, cached) for one file and arch."""
    cache = _cache_dir() / f"{cu}.sm{arch}.{_key(cu, arch)}.txt"
    if cache.is_file():
        return 0, cache.read_text(), 0.0, True
    import time
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [NVCC] + FLAGS + [f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-I{CSRC}", str(CSRC / cu),
                                "-o", os.path.join(tmp, "k.o")]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        dt = time.perf_counter() - t0
    out = r.stdout + r.stderr
    if r.returncode == 0:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(out)
    return r.returncode, out, dt, False


_results = {}


def _all_results():
    """Compile every (file, arch) once per session, in parallel."""
    if not _results:
        jobs = int(os.environ.get("FASTBERT_NVCC_JOBS", "2"))
        with cf.ThreadPoolExecutor(max_workers=jobs) as ex:
            futs = {(cu, a): ex.submit(_compile, cu, a) for cu in CU_FILES for a in ARCHS}
            for k, f in futs.items():
                _results[k] = f.result()
    return _results


def _demangle(names):
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    r = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    out = r.stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse_ptxas(text: str):
    """[{kernel, arch, registers, spill_stores, spill_loads, stack, smem}] from ``-Xptxas -v`` output."""
    kernels, cur = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2), "registers": 0, "spill_stores": 0, "spill_loads": 0,
                   "stack": 0, "smem": 0}
            kernels.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
    return kernels


@pytest.mark.parametrize("cu", CU_FILES)
def test_compiles_for_sm80_sm90_without_spills(cu):
    results = _all_results()
    spills = []
    print(f"\n== {cu} ==")
    for arch in ARCHS:
        rc, out, dt, cached = results[(cu, arch)]
        assert rc == 0, f"nvcc failed for {cu} sm_{arch}:\n{out[-6000:]}"
        ks = parse_ptxas(out)
        assert ks, f"no kernels in the ptxas report of {cu} sm_{arch}:\n{out[-2000:]}"
        names = _demangle([k["kernel"] for k in ks])
        print(f"-- sm_{arch}: {'cached report' if cached else f'compiled in {dt:.1f}s'}")
        for k in ks:
            print(f"  {k['registers']:3d} regs  spill {k['spill_stores']:4d}/{k['spill_loads']:4d} B  "
                  f"stack {k['stack']:4d} B  smem {k['smem']:6d} B  {names[k['kernel']][:110]}")
            if k["spill_stores"] or k["spill_loads"]:
                spills.append(f"sm_{arch} {names[k['kernel']]}: {k['spill_stores']} B stores / {k['spill_loads']} B loads")
    if spills and not SPILL_OK.search((CSRC / cu).read_text()):
        pytest.fail(f"{cu}: register spills (add '// fastbert: spill-ok: <reason>' to the file if intended):\n  "
                    + "\n  ".join(spills))


def test_parse_ptxas_report():
    text = ("ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'\n"
            "ptxas info    : Function properties for _Z1kPf\n"
            "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
            "ptxas info    : Used 40 registers, used 1 barriers, 512 bytes smem, 360 bytes cmem[0]\n")
    (k,) = parse_ptxas(text)
    assert (k["arch"], k["registers"], k["spill_stores"], k["spill_loads"], k["smem"]) == ("sm_90", 40, 4, 12, 512)
