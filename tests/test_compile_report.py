"""bench.compile_report: every kernel compiles for sm_80 / sm_90a within the rules, and the rules bite.

1. The real tree (kernels/*.py compile_specs, csrc/*.cu): the report succeeds. Skipped with the reason
   when Triton's ptxas or nvcc is missing. Uses the report's source-hash cache, so reruns are fast.
2. Planted kernels in a temporary Triton module and a temporary .cu: a spilling kernel and a bandwidth
   kernel with only scalar loads are each caught (exit 1, kernel named), a tensor_core-kind kernel without
   mma is caught, waived spills pass, and a clean control kernel passes.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _toolchain_reason():
    try:
        import triton
    except Exception as e:  # noqa: BLE001
        return f"triton is not importable: {e}"
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return f"triton's ptxas is absent ({ptxas})"
    from bench.compile_report import find_nvcc
    if find_nvcc() is None:
        return "nvcc not found (set NVCC or CUDA_HOME)"
    return None


def _run(args, env_extra=None, timeout=900):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the report compiles for real GPUs (it also drops this itself)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "bench.compile_report", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # cold: ~3 CPU-minutes (nvcc dominates); warm cache: well under a minute
def test_real_tree_passes(tmp_path):
    reason = _toolchain_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "compile-report.json"
    r = _run(["--json", str(out)])
    fails = [ln for ln in r.stderr.splitlines() if "FAIL" in ln]
    assert r.returncode == 0, "compile report failed:\n" + "\n".join(fails or [r.stderr[-3000:]])
    data = json.loads(out.read_text())
    sources = {k["source"] for k in data["kernels"]}
    archs = {k["arch"] for k in data["kernels"]}
    assert sources == {"triton", "cuda"} and archs == {"sm_80", "sm_90a"}
    assert "| kernel | config | arch | regs |" in r.stdout


PLANTED_PY = '''
import triton
import triton.language as tl


@triton.jit
def planted_spill_kernel(X, Y, BLOCK: tl.constexpr):
    # BLOCK fp32 values held by one warp across two reductions: far beyond 255 registers per thread.
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    s = tl.sum(x * x, axis=0)
    m = tl.max(x, axis=0)
    tl.store(Y + offs, x * s + m)


@triton.jit
def planted_rows_kernel(X, Y, stride, N, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(X + row * stride + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(Y + row * stride + cols, (x * 2.0).to(tl.bfloat16), mask=cols < N)


def compile_specs():
    spill_sig = {"X": "*fp32", "Y": "*fp32", "BLOCK": "constexpr"}
    rows_sig = {"X": "*bf16", "Y": "*bf16", "stride": "i32", "N": "i32", "BLOCK": "constexpr"}
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(4)}
    base = {"num_stages": 1, "hot": True, "note": ""}
    return [
        dict(base, name="planted_spill", kernel=planted_spill_kernel, signature=spill_sig,
             constexprs={"BLOCK": 8192}, num_warps=1, kind="other"),
        dict(base, name="planted_spill_waived", kernel=planted_spill_kernel, signature=spill_sig,
             constexprs={"BLOCK": 8192}, num_warps=1, kind="other", note="spills on purpose (test)"),
        # no divisibility attrs: stride and N may be odd, so every access is one bf16 element
        dict(base, name="planted_scalar", kernel=planted_rows_kernel, signature=rows_sig,
             constexprs={"BLOCK": 1024}, attrs={}, num_warps=4, kind="bandwidth"),
        dict(base, name="planted_no_tensor_core", kernel=planted_rows_kernel, signature=rows_sig,
             constexprs={"BLOCK": 1024}, attrs=aligned, num_warps=4, kind="tensor_core"),
        dict(base, name="planted_clean", kernel=planted_rows_kernel, signature=rows_sig,
             constexprs={"BLOCK": 1024}, attrs=aligned, num_warps=4, kind="bandwidth"),
    ]
'''

PLANTED_CU = r'''
// fastbert: kind: *planted_scalar_copy*: bandwidth
// fastbert: spill-ok: *planted_spill_waived_cu*: spills on purpose (test)
#include <cuda_bf16.h>

// At most 32 registers per thread (1024 threads x 2 blocks) for 96 live accumulators: ptxas spills.
#define SPILLER(NAME)                                                                              \
  __global__ void __launch_bounds__(1024, 2) NAME(const float* __restrict__ x, float* __restrict__ y, int n) { \
    float acc[96];                                                                                 \
    _Pragma("unroll") for (int j = 0; j < 96; ++j) acc[j] = x[threadIdx.x + j * 1024];             \
    for (int i = 0; i < n; ++i) {                                                                  \
      _Pragma("unroll") for (int j = 0; j < 96; ++j) acc[j] = acc[j] * acc[(j + 1) % 96] + x[i];   \
    }                                                                                              \
    _Pragma("unroll") for (int j = 0; j < 96; ++j) y[threadIdx.x + j * 1024] = acc[j];             \
  }
SPILLER(planted_spill_cu)
SPILLER(planted_spill_waived_cu)

// One bf16 element per access: a bandwidth kernel with no vector path.
__global__ void __launch_bounds__(256) planted_scalar_copy(const __nv_bfloat16* __restrict__ x,
                                                           __nv_bfloat16* __restrict__ y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = __float2bfloat16(__bfloat162float(x[i]) * 2.0f);
}
'''


def test_planted_kernels_are_caught(tmp_path):
    reason = _toolchain_reason()
    if reason:
        pytest.skip(reason)
    mod = tmp_path / "planted_kernels.py"
    mod.write_text(textwrap.dedent(PLANTED_PY))
    cu_dir = tmp_path / "csrc"
    cu_dir.mkdir()
    (cu_dir / "planted.cu").write_text(PLANTED_CU)
    out = tmp_path / "report.json"
    # A private cache: the planted kernels are really compiled, not read back from an earlier run.
    r = _run(["--no-default-triton", "--no-default-csrc", "--triton-module", str(mod), "--csrc-dir",
              str(cu_dir), "--json", str(out)], {"FASTBERT_CACHE": str(tmp_path / "cache")}, timeout=600)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    fails = [ln for ln in r.stderr.splitlines() if ln.strip().startswith("FAIL")]

    def failed(name, words):
        return [ln for ln in fails if f": {name}" in ln and words in ln]
    for arch in ("sm_80", "sm_90a"):
        assert failed("planted_spill ", "hot kernel spills") and any(arch in ln for ln in failed("planted_spill ", ""))
        assert any(arch in ln for ln in failed("planted_scalar ", "only scalar global loads"))
        assert any(arch in ln for ln in failed("planted_no_tensor_core ", "no mma/wgmma"))
        assert any(arch in ln for ln in failed("planted_spill_cu(", "hot kernel spills"))
        assert any(arch in ln for ln in failed("planted_scalar_copy(", "vector global load"))
    for ok in ("planted_clean", "planted_spill_waived", "planted_spill_waived_cu"):
        assert not [ln for ln in fails if f": {ok} " in ln or f": {ok}(" in ln], ok
    data = json.loads(out.read_text())
    by_name = {(k["name"], k["arch"]): k for k in data["kernels"]}
    clean = by_name[("planted_clean", "sm_90a")]
    assert clean["problems"] == [] and clean["ptx"]["ld_vector"] > 0
    waived = by_name[("planted_spill_waived", "sm_80")]
    assert waived["spill_stores"] > 0 and waived["problems"] == []


def test_occupancy_arithmetic():
    from bench.compile_report import occupancy
    # 255 regs x 32 threads = 8160, allocated as 8192 per warp -> 8 warps by registers -> 2 blocks of 4 warps.
    o = occupancy("sm_90a", 255, 0, 128)
    assert (o["blocks_per_sm"], o["warps_per_sm"], o["limiter"]) == (2, 8, "registers")
    # 64 KB of shared memory per block on an A100 (164 KB/SM, +1 KB reserved each): 2 blocks.
    o = occupancy("sm_80", 32, 64 * 1024, 128)
    assert (o["blocks_per_sm"], o["limiter"]) == (2, "shared memory")
    # Small kernel: threads cap at 2048 per SM.
    o = occupancy("sm_80", 16, 0, 256)
    assert (o["warps_per_sm"], o["occupancy"]) == (64, 1.0)
