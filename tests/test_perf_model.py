"""bench.perf_model: the static throughput model runs on the real tree within its budgets, its budgets bite
on planted kernels, its SASS / PTX readers count what they claim, predict_ms answers bench.gpu_run, and
``auto`` follows the per-generation table (with a mocked device capability).

1. Real tree (compilers needed; reuses bench.compile_report's source-hash cache, filled by
   tests/test_compile_report.py just before): exit 0, every op x backend x GPU predicted, every kernel
   template of the compile report modelled, the registry's per-generation order agrees with the model.
2. Planted kernels, compiled for sm_80 into a private cache: a shared-memory transpose without padding
   (32-way bank conflicts), a loop with extra math (inflated main loop), a Triton dot loop with extra
   elementwise work (more instructions per tensor-core op) and the same loop without pipelining (no
   cp.async): each breaks the budget its clean twin sets.
3. Pure parsing (no compiler): bank conflicts of hand-written PTX, loops and tensor work of SASS text.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from bench import perf_static as PS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _toolchain_reason():
    from tests.test_compile_report import _toolchain_reason as reason
    return reason()


def _env(extra=None):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the model compiles for real GPUs
    env.update(extra or {})
    return env


# ----------------------------------------------------------------------------------------------
# 1. the real tree
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow  # warm compile cache: ~15 s; cold: the compile report's few CPU-minutes
def test_real_tree_within_budgets(tmp_path):
    reason = _toolchain_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "perf-model.json"
    r = subprocess.run([sys.executable, "-m", "bench.perf_model", "--json", str(out), "--gpu-results"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1200)
    fails = [ln for ln in r.stderr.splitlines() if "FAIL" in ln]
    assert r.returncode == 0, "perf model failed:\n" + "\n".join(fails or [r.stdout[-2000:], r.stderr[-3000:]])
    data = json.loads(out.read_text())
    preds = data["predictions"]
    for op in ("attention", "layer_norm", "layer_norm+residual", "bias_gelu", "geglu", "unpad", "pad", "mlm_loss"):
        for be in ("cuda", "triton"):
            for gpu in ("H100", "H200", "A100"):
                rows = [p for p in preds if (p["op"], p["backend"], p["gpu"]) == (op, be, gpu)]
                assert rows and all(p["us"] and p["us"] > 0 for p in rows), (op, be, gpu)
    assert "No GPU results exist yet" in data["calibration"]["note"]
    assert "predictions, not measurements" in (tmp_path / "perf-model.md").read_text()

    # every hot kernel (CUDA template / Triton function) the compile report builds has a launch model
    cov = data["coverage"]
    assert cov["compiled"] and not [k for k in cov["compiled"] if k not in cov["modelled"]]

    # the registry's per-generation order is the one the model's evidence supports (15% hysteresis)
    from fastbert import registry
    for gen, fams in data["auto_order"].items():
        for fam, d in fams.items():
            order, why = registry.AUTO_BY_GENERATION[("cuda", gen)][fam]
            tot = d["total_us"]
            first, other = order[0], [b for b in ("cuda", "triton") if b != order[0]][0]
            assert tot[first] <= 1.15 * tot[other], (
                f"fastbert/registry.py AUTO_BY_GENERATION[('cuda', '{gen}')]['{fam}'] puts {first} first but the "
                f"perf model predicts {other} {tot[first] / tot[other]:.2f}x faster: update the entry and its "
                f"reason from bench/results/perf-model.md")
            assert why and "perf_model" in why


# ----------------------------------------------------------------------------------------------
# 2. planted kernels
# ----------------------------------------------------------------------------------------------
PLANTED_CU = r'''
// fastbert: kind: *planted_*: other
__global__ void __launch_bounds__(1024) planted_transpose_padded(const float* __restrict__ x, float* __restrict__ y, int n) {
  __shared__ float tile[32][33];
  for (int b = blockIdx.x; b < n; b += gridDim.x) {
    tile[threadIdx.y][threadIdx.x] = x[(b * 32 + threadIdx.y) * 32 + threadIdx.x];
    __syncthreads();
    y[(b * 32 + threadIdx.y) * 32 + threadIdx.x] = tile[threadIdx.x][threadIdx.y];
    __syncthreads();
  }
}
// The same transpose without the padding column: the column read hits one bank 32 times.
__global__ void __launch_bounds__(1024) planted_transpose_conflicted(const float* __restrict__ x, float* __restrict__ y, int n) {
  __shared__ float tile[32][32];
  for (int b = blockIdx.x; b < n; b += gridDim.x) {
    tile[threadIdx.y][threadIdx.x] = x[(b * 32 + threadIdx.y) * 32 + threadIdx.x];
    __syncthreads();
    y[(b * 32 + threadIdx.y) * 32 + threadIdx.x] = tile[threadIdx.x][threadIdx.y];
    __syncthreads();
  }
}
__global__ void planted_loop_lean(const float* __restrict__ x, float* __restrict__ y, int reps) {
  float acc = 0.f;
  for (int i = 0; i < reps; ++i) acc += x[i * 256 + threadIdx.x];
  y[threadIdx.x] = acc;
}
// The same loop with per-element math the lean one does not need.
__global__ void planted_loop_inflated(const float* __restrict__ x, float* __restrict__ y, int reps) {
  float acc = 0.f;
  for (int i = 0; i < reps; ++i) {
    const float v = x[i * 256 + threadIdx.x];
    acc += sinf(v) * expf(-v) / (1.f + fabsf(v));
  }
  y[threadIdx.x] = acc;
}
'''

PLANTED_PY = '''
import triton
import triton.language as tl


@triton.jit
def planted_dot_loop(A, B, C, K, EXTRA: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for k in range(0, K, BLOCK):
        a = tl.load(A + offs[:, None] * K + (k + offs)[None, :])
        b = tl.load(B + (k + offs)[:, None] * BLOCK + offs[None, :])
        if EXTRA:  # the operand tile rescaled in fp32 inside the main loop: a few instructions per element
            a = (a.to(tl.float32) * 1.25).to(tl.bfloat16)
        acc += tl.dot(a, b)
    tl.store(C + offs[:, None] * BLOCK + offs[None, :], acc)


def compile_specs():
    sig = {"A": "*bf16", "B": "*bf16", "C": "*fp32", "K": "i32", "EXTRA": "constexpr", "BLOCK": "constexpr"}
    attrs = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]],
             (3,): [["tt.divisibility", 16]]}
    base = {"kernel": planted_dot_loop, "signature": sig, "num_warps": 4, "hot": True, "kind": "tensor_core",
            "note": "", "attrs": attrs, "capability": 80}
    return [dict(base, name="planted_dot_pipelined", constexprs={"EXTRA": False, "BLOCK": 64}, num_stages=3),
            dict(base, name="planted_dot_inflated", constexprs={"EXTRA": True, "BLOCK": 64}, num_stages=3),
            dict(base, name="planted_dot_sync", constexprs={"EXTRA": False, "BLOCK": 64}, num_stages=1)]
'''

DRIVER = r'''
import json, sys
from bench import compile_report as CR, perf_checks as PM
recs, failures, _ = CR.collect(["sm_80"], default_triton=False, triton_modules_extra=[sys.argv[1]],
                               default_csrc=False, csrc_dirs=[sys.argv[2]], use_cache=True)
by = {PM.short_name(r["name"]): r for r in recs if not r.get("error")}
pairs = {"conflicts": ("planted_transpose_padded", "planted_transpose_conflicted"),
         "loop": ("planted_loop_lean", "planted_loop_inflated"),
         "per_tensor": ("planted_dot_pipelined", "planted_dot_inflated"),
         "async": ("planted_dot_pipelined", "planted_dot_sync")}
out = {"errors": [r.get("error") for r in recs if r.get("error")], "summary": {}, "violations": {}}
for what, (good, bad) in pairs.items():
    budgets = PM.make_budgets({("sm_80", good): by[good]})
    budgets = {"sm_80 " + bad: budgets["sm_80 " + good]}
    out["violations"][what] = {"bad": PM.check_budgets({("sm_80", bad): by[bad]}, budgets),
                               "good": PM.check_budgets({("sm_80", bad): by[good]}, budgets)}
for name, r in by.items():
    out["summary"][name] = PM.kernel_summary(r)
print(json.dumps(out))
'''


def test_planted_kernels_break_their_budgets(tmp_path):
    reason = _toolchain_reason()
    if reason:
        pytest.skip(reason)
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "planted.cu").write_text(PLANTED_CU)
    (tmp_path / "planted_dot.py").write_text(textwrap.dedent(PLANTED_PY))
    # A private cache: the planted kernels are really compiled, not read back from an earlier run.
    r = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "planted_dot.py"), str(tmp_path / "csrc")],
                       cwd=ROOT, env=_env({"FASTBERT_CACHE": str(tmp_path / "cache")}), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert not out["errors"], out["errors"]
    s, v = out["summary"], out["violations"]
    # the analysis sees the conflict (32 lanes on one bank) and its absence
    assert s["planted_transpose_padded"]["conflicts"] == 1.0
    assert s["planted_transpose_conflicted"]["conflicts"] >= 8.0
    assert s["planted_dot_pipelined"]["async_main"] > 0 and s["planted_dot_sync"]["async_main"] == 0
    expect = {"conflicts": "bank conflicts", "loop": "main loop has", "per_tensor": "other instructions per tensor",
              "async": "lost its async copies"}
    for what, words in expect.items():
        assert any(words in msg for msg in v[what]["bad"]), (what, v[what])
        assert not v[what]["good"], (what, v[what]["good"])  # the clean twin passes its own budget


# ----------------------------------------------------------------------------------------------
# 3. the readers, on hand-written PTX / SASS (no compiler needed)
# ----------------------------------------------------------------------------------------------
def _ptx(body: str) -> str:
    return ".visible .entry k(\n)\n{\n" + textwrap.dedent(body) + "\n}\n"


@pytest.mark.parametrize("row_bytes, waves", [(128, 32), (132, 1), (256, 32), (136, 2)])
def test_ptx_column_read_wavefronts(row_bytes, waves):
    """lane i reads 4 bytes at i * row_bytes: 32 banks x 4 bytes decide how many wavefronts it costs."""
    f = PS.ptx_facts(_ptx(f"""
        mov.u32 %r1, %tid.x;
        mul.lo.s32 %r2, %r1, {row_bytes};
        mov.u32 %r3, tile;
        add.s32 %r4, %r3, %r2;
        ld.shared.f32 %f1, [%r4+8];
    """))
    assert (f["kernel"]["wavefronts"], f["kernel"]["ideal"], f["kernel"]["unknown"]) == (waves, 1, 0)


def test_ptx_vector_ldmatrix_predicates_and_unknowns():
    f = PS.ptx_facts(_ptx("""
        mov.u32 %r1, %tid.x;
        shl.b32 %r2, %r1, 4;
        mov.u32 %r3, tile;
        add.s32 %r4, %r3, %r2;
        st.shared.v4.u32 [%r4], {%r9, %r9, %r9, %r9};
        and.b32 %r5, %r1, 15;
        mad.lo.s32 %r6, %r5, 144, %r3;
        ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r10, %r11, %r12, %r13}, [%r6];
        mad.lo.s32 %r7, %r5, 128, %r3;
        ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r14, %r15, %r16, %r17}, [%r7];
        setp.eq.s32 %p1, %r1, 0;
        @%p1 st.shared.f32 [%r3], %f1;
        ld.global.u32 %r8, [%rd1];
        add.s32 %r20, %r3, %r8;
        ld.shared.f32 %f2, [%r20];
        $L__BB0_1:
        bra.uni $L__BB0_1;
    """))
    k = f["kernel"]
    # 16-byte stores of consecutive lanes: 4 ideal wavefronts. ldmatrix rows 144 bytes apart: conflict
    # free (4); 128 bytes apart: 8 rows on the same banks (4 x 8). Lane 0 alone: 1. Loaded index: unknown.
    assert (k["wavefronts"], k["ideal"], k["unknown"], k["accesses"]) == (4 + 4 + 32 + 1, 4 + 4 + 4 + 1, 1, 5)
    assert k["worst"] and "ldmatrix" in k["worst"][0]


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R2.64] ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ ;
        /*0030*/                   LDGSTS.E.BYPASS.128 [R41], desc[UR22][R42.64] ;
        /*0040*/                   FADD R3, R3, R4 ;
        /*0050*/                   HMMA.16816.F32.BF16 R32, R28, R68, RZ ;
        /*0060*/                   NOP ;
        /*0070*/               @P0 BRA 0x20 ;
        /*0080*/                   FMUL R3, R3, R3 ;
        /*0090*/               @P1 BRA 0x80 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA 0xb0;
"""


def test_ptx_entries_split_after_func_prototypes():
    """A non-inlined device function gets a prototype (``.func name(...);``) before the entries: the split
    appends only function definitions to each entry, never the text up to the first entry's closing brace
    (which credited one kernel with another's shared accesses)."""
    from bench.compile_report import ptx_entries
    ptx = textwrap.dedent("""\
        .func helper(.param .b64 p);
        .visible .entry first(.param .u64 a)
        {
        \tst.shared.u32 [%r1], %r2;
        }
        .visible .entry second(.param .u64 a)
        {
        \tld.shared.u32 %r3, [%r4];
        }
        .func helper(.param .b64 p)
        {
        \tret;
        }
        """)
    e = ptx_entries(ptx)
    assert set(e) == {"first", "second"}
    assert "st.shared" not in e["second"] and "ld.shared" not in e["first"]
    assert all(v.count("ret;") == 1 for v in e.values())  # the definition, appended once to each


def test_sass_loops_and_tensor_work():
    f = PS.sass_facts(SASS)
    m = f["main"]
    # main loop 0x20..0x70: HGMMA 64x64x16 = 8 HMMA.16816-equivalents per warp, plus one HMMA; NOP excluded
    assert (m["start"], m["end"], m["instr"], m["tensor"], m["tensor_equiv"], m["ldgsts"]) == (0x20, 0x70, 5, 2, 9.0, 1)
    assert m["other_per_tensor"] == round(3 / 9, 3)
    assert f["loops"] == 2 and f["other_outer_instr"] == 2 and f["total"]["instr"] == 11


# ----------------------------------------------------------------------------------------------
# predict_ms and the auto order
# ----------------------------------------------------------------------------------------------
def test_predict_ms_answers_gpu_run_rows():
    from bench import perf_model as PM
    if PM._saved_model() is None:
        pytest.skip("bench/results/perf-model.json is missing (python -m bench.perf_model writes it)")
    from bench.common import Batch
    b = Batch(128, 128)
    h100 = {"gpu": "NVIDIA H100 80GB HBM3", "sms": 132, "capability": "9.0"}
    row = {"op": "attention", "shape": f"{b.name}xH12xD64", "pass": "fwd", "provider": "fastbert-triton",
           "role": "fastbert"}
    t = PM.predict_ms(row, h100)
    assert isinstance(t, float) and 0.001 < t < 10
    assert PM.predict_ms(dict(row, provider="fastbert-cuda"), h100) > 0
    assert PM.predict_ms(dict(row, provider="sdpa-flash-nobias"), h100) is None  # peers are not modelled
    assert PM.predict_ms(row, {"gpu": "Tesla T4", "capability": "7.5"}) is None
    # the same op at the same shape on H200 (more bandwidth) is never predicted slower
    assert PM.predict_ms(row, {"gpu": "NVIDIA H200", "capability": "9.0"}) <= t
    ln = {"op": "layer_norm+residual", "shape": "M10466xN768", "pass": "fwdbwd", "provider": "fastbert-cuda"}
    assert PM.predict_ms(ln, h100) > PM.predict_ms(dict(ln, **{"pass": "fwd"}), h100)


@pytest.mark.parametrize("capability, gen", [((9, 0), "sm_90"), ((8, 0), "sm_80"), ((8, 9), "sm_80"), ((7, 5), None)])
def test_auto_order_per_generation(monkeypatch, capability, gen):
    from fastbert import registry
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    dev = torch.device("cuda")
    assert registry.gpu_generation(dev) == gen
    for fam in registry.PRIMITIVES:
        order, why = registry.auto_order(fam, dev)
        if gen is None:
            assert order == registry.AUTO_ORDER["cuda"] and "default" in why
        else:
            assert (order, why) == registry.AUTO_BY_GENERATION[("cuda", gen)][fam]
            assert set(order) == {"cuda", "triton", "torch"} and why
    # resolve() walks that order: with every backend able to run, the first one wins
    monkeypatch.setattr(registry, "_impl_or_reason", lambda prim, be, *a, **k: (object(), None))
    want = registry.auto_order("attention", dev)[0][0]
    assert registry.resolve("flash_attn_fwd", dev) == want
    # backends() shows the order and the reason of every family
    text = str(registry.backends("cuda"))
    for fam in registry.PRIMITIVES:
        order, why = registry.auto_order(fam, dev)
        assert f"auto {fam}" in text and why in text
    # CPU tensors keep the device-type order
    assert registry.auto_order("attention", torch.device("cpu"))[0] == registry.AUTO_ORDER["cpu"]
