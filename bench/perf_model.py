"""Static throughput model: predicted time of every fastbert kernel at BERT shapes on H100 / H200 (and A100,
for the sm_80 ``auto`` order), from the compiled SASS / PTX and the launch geometry. No GPU is needed and
none is used: every number it prints is a **prediction**, never a measurement.

    python -m bench.perf_model [--tree REF] [--json PATH] [--write-budgets] [--no-cache] [--gpu-results F ...]

Inputs: ``bench.compile_report.collect`` (every kernel compiled for sm_80 / sm_90a, cached by source hash,
with ``bench.perf_static`` facts: main-loop instructions, tensor-core work, async copies, shared-memory
wavefronts) and ``bench.perf_launches`` (CTAs, main-loop trips and bytes of every launch of an op).

Per launch, each CTA costs (clocks, the CTA alone on an SM)
    issue  = warps * instructions / 4                (4 schedulers, 1 instruction / clock each)
    tensor = warps * HMMA.16816-equivalents / R_tc    (R_tc = 1 per clock on sm_90, 1/2 on sm_80)
    smem   = warps * shared-memory wavefronts / 1     (128 bytes / clock)
    single = max(issue, tensor, smem)
and, with k CTAs resident per SM (the compile report's occupancy), ``max(k * single, single + latency)``:
k CTAs share the SM's throughput, and a CTA whose main loop loads synchronously (no ``cp.async`` / TMA)
also waits one memory latency per iteration. CTAs are list-scheduled on ``SMs * k`` slots in launch order
(waves and tails included); the launch takes ``max(schedule, HBM bytes / bandwidth) + launch overhead``.
Library work (cuBLAS GEMMs, torch elementwise ops) is ``max(FLOPs / (peak * GEMM_EFFICIENCY), bytes / BW)``.

Outputs: ``bench/results/perf-model.json`` and ``.md`` (per-kernel facts, per-op predictions with the bound
that binds, beside the memory limit and, for attention, FlashAttention-2/3's published H100 numbers; the
change against the baseline tree when ``perf-model-baseline.json`` exists; calibration against GPU runs
when any exist; the ``auto`` order it implies). Exit status 1 when a kernel breaks its budget
(``bench/perf_budgets.json``: main-loop instructions, instructions per tensor-core op, bank conflicts, async
copies, pipeline stages), a launch restatement is stale, or a modelled kernel failed to compile.
"""
from __future__ import annotations

import argparse
import fnmatch
import functools
import glob
import heapq
import importlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import perf_launches as PL  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results")
DEFAULT_JSON = os.path.join(RESULTS, "perf-model.json")
BASELINE_JSON = os.path.join(RESULTS, "perf-model-baseline.json")
BUDGETS = os.path.join(ROOT, "bench", "perf_budgets.json")
BASELINE_REF = "b169a24"


@dataclass(frozen=True)
class GPU:
    """Published limits. clock: the SM clock at which NVIDIA's dense tensor-core peak is quoted (H100/H200
    SXM: 989 TFLOP/s bf16 = 132 SMs x 4096 FLOP/clk x 1.83 GHz; A100: 312 = 108 x 2048 x 1.41)."""
    name: str
    arch: str
    sms: int
    clock_ghz: float
    hbm_tbs: float
    hmma_per_clk: float = 1.0  # HMMA.16816 (4096 FLOP) per clock per SM


GPUS = {
    "H100": GPU("H100 SXM5 80GB", "sm_90a", 132, 1.83, 3.35),
    "H200": GPU("H200 SXM 141GB", "sm_90a", 132, 1.83, 4.8),
    "A100": GPU("A100 SXM4 80GB", "sm_80", 108, 1.41, 2.039, hmma_per_clk=0.5),
}
ISSUE_PER_CLK = 4          # warp instructions per clock per SM (4 schedulers)
SMEM_WAVEFRONTS_PER_CLK = 1  # 128 bytes per clock per SM
MEM_LATENCY_CLK = 600      # one global-memory round trip (assumption; calibrate)
LAUNCH_US = 2.0            # per kernel launch on a busy stream (assumption; calibrate)
GEMM_EFFICIENCY = 0.7      # cuBLAS fraction of the dense tensor peak at these GEMM sizes (assumption)
EXIT_INSTR = 16            # instructions of a CTA that finds no work and returns
BACKENDS = ("cuda", "triton")
PASSES = ("fwd", "bwd")


def op_passes(op: str) -> Tuple[str, ...]:
    """The passes reported per op: the MLM loss computes its gradients in the forward (its backward only
    scales them), so its training pass is fwdbwd."""
    return ("fwd", "fwdbwd") if op == "mlm_loss" else PASSES
SIZES = {"base": (12, 768, 3072), "large": (16, 1024, 4096)}  # heads, hidden, intermediate
SEQS = (128, 512)
VOCAB = 30528
MLM_FRACTION = 0.3
# FlashAttention-3 paper (Shah et al. 2024, arXiv:2407.08608), H100 80GB SXM5, BF16, head dim 64: the bar
# labels of its attention forward / backward speed figures at sequence length 512 (TFLOP/s; 16k tokens per
# batch, hidden 2048). The figures start at 512: nothing is published for 128.
PUBLISHED_TFLOPS = {("fwd", 512): {"FA2": 282, "FA3": 333}, ("bwd", 512): {"FA2": 198, "FA3": 272}}
PUBLISHED_SOURCE = "FA3 paper (arXiv:2407.08608) attention speed figures, H100 SXM5, BF16, hd 64, seq 512"


# ----------------------------------------------------------------------------------------------
# trees: the current checkout, or another commit (the baseline) exported to a temporary directory
# ----------------------------------------------------------------------------------------------
class Tree:
    """A source tree to model: its csrc/, its kernels/ (imported under a private package name) and the
    pieces of its Python launch logic the geometry reads."""

    def __init__(self, root: str, label: str):
        self.root, self.label = root, label
        if os.path.realpath(root) == os.path.realpath(ROOT):
            from bench.checkout import ensure_importable
            ensure_importable()
            self.pkg = "fastbert.kernels"
        else:
            link_dir = tempfile.mkdtemp(prefix="fb_tree_")
            self.pkg = "fb_tree_" + re.sub(r"\W", "_", label) + "_kernels"
            os.symlink(os.path.join(root, "kernels"), os.path.join(link_dir, self.pkg))
            sys.path.insert(0, link_dir)
        self.versions, self.stale = PL.launcher_versions(self.read)
        self.attention = importlib.import_module(self.pkg + ".attention")
        self.common = importlib.import_module(self.pkg + "._common")
        self._mlm = importlib.import_module(self.pkg + ".mlm_loss")
        spec = importlib.util.spec_from_file_location(f"fb_chunked_{abs(hash(root))}",
                                                      os.path.join(root, "fastbert", "ops", "mlm_chunked.py"))
        self._chunked = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self._chunked)

    def mlm_chunk_rows(self, n: int, V: int, H: int) -> int:
        return int(self._chunked.default_chunk_rows(n, V, H))

    def mlm_block_v(self, V: int) -> Tuple[int, int]:
        cfg = self._mlm._v_config(V)
        return cfg["BLOCK_V"], cfg["num_warps"]

    def read(self, rel: str) -> str:
        with open(os.path.join(self.root, rel)) as f:
            return f.read()

    def triton_modules(self) -> List[str]:
        return [f"{self.pkg}.{os.path.basename(p)[:-3]}" for p in sorted(glob.glob(os.path.join(self.root, "kernels", "*.py")))
                if not os.path.basename(p).startswith("_")]


def export_tree(ref: str) -> str:
    """``git archive`` of csrc/, kernels/ and fastbert/ops/ at ``ref`` into a temporary directory."""
    d = tempfile.mkdtemp(prefix="fb_" + re.sub(r"\W", "_", ref) + "_")
    arch = subprocess.run(["git", "-C", ROOT, "archive", ref, "csrc", "kernels", "fastbert/ops"],
                          capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", d], input=arch, check=True)
    return d


# ----------------------------------------------------------------------------------------------
# workloads
# ----------------------------------------------------------------------------------------------
def batch_lengths(B: int, S: int) -> Tuple[int, ...]:
    """The benchmark suite's batch: lengths uniform in [S/4, S] with a fixed seed (bench.common.Batch)."""
    from bench.common import Batch
    return tuple(Batch(B, S).lengths)


def workloads() -> List[Tuple[str, int, PL.Shape]]:
    """(size, seq, shape) of every op at BERT shapes: 16384 padded tokens per batch (the benchmark's)."""
    out = []
    for size, (H, hidden, inter) in SIZES.items():
        for S in SEQS:
            L = batch_lengths(16384 // S, S)
            T = sum(L)
            out += [(size, S, PL.Shape("attention", L, S, heads=H, head_dim=64)),
                    (size, S, PL.Shape("layer_norm+residual", M=T, N=hidden)),
                    (size, S, PL.Shape("layer_norm", M=T, N=hidden)),
                    (size, S, PL.Shape("bias_gelu", M=T, N=inter)),
                    (size, S, PL.Shape("geglu", M=T, N=inter)),
                    (size, S, PL.Shape("unpad", L, S, hidden=hidden)),
                    (size, S, PL.Shape("pad", L, S, hidden=hidden)),
                    (size, S, PL.Shape("mlm_loss", M=T, hidden=hidden, V=VOCAB, n=round(MLM_FRACTION * T)))]
    return out


# ----------------------------------------------------------------------------------------------
# the time model
# ----------------------------------------------------------------------------------------------
def _schedule(durations: List[Tuple[float, int]], slots: int) -> float:
    """Makespan of CTAs (duration, count) dispatched in order to the first free of ``slots``."""
    if len(durations) == 1:
        d, n = durations[0]
        return d * math.ceil(n / slots)
    heap = [0.0] * slots
    for d, n in durations:
        for _ in range(n):
            t = heapq.heappop(heap)
            heapq.heappush(heap, t + d)
    return max(heap)


def stages_of(rec: dict) -> int:
    """Pipeline depth: Triton's num_stages when the kernel issues cp.async, else 1; hand-written kernels:
    the deepest ``cp.async.wait_group N`` + 2 (N groups in flight while one is consumed)."""
    ptx = (rec.get("facts") or {}).get("ptx") or {}
    if not ptx.get("cp_async"):
        return 1
    if rec["source"] == "triton":
        m = re.search(r"\bs(\d+)\b", rec.get("config", ""))
        return int(m.group(1)) if m else 1
    return (ptx.get("wait_group_max") or 0) + 2


def occupancy(la: PL.Launch, rec: dict) -> int:
    """Resident CTAs per SM at this launch's block size (the compile report's occupancy assumes the
    ``__launch_bounds__`` size for CUDA kernels) and shared memory (static + the launch's dynamic)."""
    from bench.compile_report import occupancy as occ
    smem = int(rec.get("smem_static", 0)) + (la.smem_dynamic if la.source == "cuda" else int(rec.get("smem_dynamic", 0)))
    return max(1, occ(rec["arch"], int(rec.get("regs") or 32), smem, la.threads)["blocks_per_sm"])


def predict_launch(la: PL.Launch, rec: Optional[dict], gpu: GPU) -> dict:
    """Predicted time (us) of one launch on ``gpu`` and the bounds behind it."""
    clk = gpu.clock_ghz * 1e3  # clocks per microsecond
    bw = gpu.hbm_tbs * 1e6     # bytes per microsecond
    t_hbm = la.hbm / bw
    base = {"name": la.name, "kernel": la.kernel, "ctas": la.n_ctas, "hbm_MB": la.hbm / 1e6,
            "l2_MB": la.l2 / 1e6, "ideal_MB": la.ideal / 1e6}
    if la.source == "torch":
        peak = gpu.sms * gpu.hmma_per_clk * 4096 * clk  # FLOP per microsecond
        t_tc = la.flops / (peak * GEMM_EFFICIENCY) if la.flops else 0.0
        bounds = {"HBM": t_hbm, "tensor": t_tc}
        return {**base, "us": max(t_hbm, t_tc) + LAUNCH_US, "bound": max(bounds, key=bounds.get),
                "bounds_us": bounds, "waves": None}
    facts = (rec or {}).get("facts") or {}
    sass, ptx = facts.get("sass"), facts.get("ptx") or {}
    if not sass:
        return {**base, "us": None, "bound": "no SASS facts", "bounds_us": {}, "waves": None}
    warps = -(-la.threads // 32)
    main = sass.get("main")
    total = sass["total"]
    loop_i = main["instr"] if main else 0
    outer_i = sass.get("other_outer_instr", 0)
    loop_tc = main["tensor_equiv"] if main else 0.0
    outer_tc = sass.get("other_outer_tensor_equiv", 0.0)
    pm, pk, po = ptx.get("main") or {}, ptx.get("kernel") or {}, ptx.get("other_outer") or {}
    loop_w, outer_w = pm.get("wavefronts", 0), po.get("wavefronts", 0)
    # what runs once per CTA: the kernel minus its main loop and its other outer loops
    once_i = total["instr"] - loop_i - outer_i
    once_tc = total["tensor_equiv"] - loop_tc - outer_tc
    once_w = pk.get("wavefronts", 0) - loop_w - outer_w
    if la.tensor_per_trip and loop_tc > la.tensor_per_trip:
        # the loop body holds several copies of the tile math (one per score form) and runs one per trip:
        # count the trip's real tensor work, with the loop's other instructions and wavefronts in proportion
        f = la.tensor_per_trip / loop_tc
        loop_i, loop_tc, loop_w = loop_i * f, la.tensor_per_trip, loop_w * f
        outer_i, outer_tc, outer_w = outer_i * f, outer_tc * f, outer_w * f
    sync_loop = bool(main) and main["ldg"] > 0 and main["ldgsts"] + main["tma"] == 0
    unroll = max(1, round(main["ldg"] / la.loads_per_trip)) if main and la.loads_per_trip else 1
    k = occupancy(la, rec)
    durs, tot = [], {"issue": 0.0, "tensor": 0.0, "smem": 0.0}
    for src_trips, count in la.ctas:
        trips = -(-src_trips // unroll)
        if la.whole_kernel:  # src_trips: the HMMA-equivalents a warp of this CTA runs (see PL.Launch)
            f = src_trips / total["tensor_equiv"] if total["tensor_equiv"] else 0.0
            instr, tc, wf = (total["instr"] * f, src_trips, pk.get("wavefronts", 0) * f) if src_trips else (EXIT_INSTR, 0.0, 0)
            lat = MEM_LATENCY_CLK
        elif trips == 0 and main:
            instr, tc, wf, lat = EXIT_INSTR, 0.0, 0, MEM_LATENCY_CLK
        else:
            trips -= 1 if la.tail_once else 0  # the last trip is straight-line code, counted in once_i
            other = trips if la.other_trips is None else la.other_trips  # None: they run like the main loop
            instr = once_i + trips * loop_i + other * outer_i
            tc = once_tc + trips * loop_tc + other * outer_tc
            wf = once_w + trips * loop_w + other * outer_w
            lat = MEM_LATENCY_CLK * (1 + (trips if sync_loop else 0))
        parts = {"issue": warps * instr / ISSUE_PER_CLK, "tensor": warps * tc / gpu.hmma_per_clk,
                 "smem": warps * wf / SMEM_WAVEFRONTS_PER_CLK}
        for key, v in parts.items():
            tot[key] += v * count
        single = max(parts.values())
        durs.append((max(k * single, single + lat), count))
    t_sm = _schedule(durs, gpu.sms * k) / clk
    bounds = {key: v / gpu.sms / clk for key, v in tot.items()}
    bounds["HBM"] = t_hbm
    us = max(t_sm, t_hbm) + LAUNCH_US
    top = max(bounds, key=bounds.get)
    bound = top if max(t_sm, t_hbm) <= 1.15 * bounds[top] else ("latency" if sync_loop else "waves/latency")
    return {**base, "us": us, "bound": bound, "bounds_us": bounds, "waves": round(la.n_ctas / (gpu.sms * k), 2),
            "blocks_per_sm": k}


class Model:
    """Compile facts of one tree, indexed for the launch models."""

    def __init__(self, tree: Tree, recs: List[dict]):
        self.tree = tree
        self._memo: Dict[tuple, dict] = {}
        self.by_name: Dict[Tuple[str, str], dict] = {}
        self.cuda: Dict[str, List[dict]] = {}
        for r in recs:
            if r.get("error"):
                continue
            if r["source"] == "triton":
                self.by_name[(r["arch"], r["name"])] = r
            else:
                self.cuda.setdefault(r["arch"], []).append(r)

    def record(self, la: PL.Launch, arch: str) -> Optional[dict]:
        if la.source == "triton":
            return self.by_name.get((arch, la.kernel))
        if la.source == "cuda":
            return next((r for r in self.cuda.get(arch, []) if fnmatch.fnmatchcase(r["name"], la.kernel)), None)
        return None

    def _launch_cached(self, key, la: PL.Launch, gpu: GPU) -> dict:
        if (key, gpu) not in self._memo:  # the MLM loss repeats one row-kernel launch per chunk
            self._memo[(key, gpu)] = predict_launch(la, self.record(la, gpu.arch), gpu)
        return self._memo[(key, gpu)]

    def predict(self, sh: PL.Shape, pass_: str, backend: str, gpu: GPU) -> dict:
        """Every launch of one op call and their sum (us)."""
        rows: List[dict] = []
        by_name: Dict[str, dict] = {}
        for la in PL.launches(sh, pass_, backend, gpu.arch, self.tree, gpu.sms):
            key = (la.name, la.source, la.kernel, tuple(la.ctas), la.threads, la.hbm, la.flops, la.other_trips)
            r = dict(self._launch_cached(key, la, gpu), n=1)
            if la.source != "torch" and self.record(la, gpu.arch) is None:
                r["bound"], r["us"] = f"missing compile record for {la.kernel}", None
            prev = by_name.get(la.name)
            if prev is None:  # the MLM loss repeats its launches per chunk: one row per launch name
                by_name[la.name] = r
                rows.append(r)
                continue
            prev["n"] += 1
            for k in ("us", "hbm_MB", "l2_MB", "ideal_MB"):
                prev[k] = None if prev[k] is None or r[k] is None else prev[k] + r[k]
        us = sum(r["us"] for r in rows) if all(r["us"] is not None for r in rows) else None
        ideal = PL.ideal_bytes(sh, pass_)
        limit = ideal / (gpu.hbm_tbs * 1e6)
        if sh.op == "mlm_loss":  # the decoder GEMMs at the dense tensor peak
            gemm = 2.0 * sh.n * sh.hidden * sh.V * {"fwd": 1, "bwd": 0, "fwdbwd": 3}[pass_]
            limit = max(limit, gemm / (gpu.sms * gpu.hmma_per_clk * 4096 * gpu.clock_ghz * 1e3))
        out = {"us": us, "launches": rows, "memory_limit_us": limit,
               "bound": max(rows, key=lambda r: r["us"] or 0)["bound"] if rows else None}
        if sh.op == "attention":
            flops = 4.0 * sum(x * x for x in sh.lengths) * sh.heads * sh.head_dim
            flops *= {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}[pass_]
            out["tflops"] = flops / us / 1e6 if us else None
            pub = PUBLISHED_TFLOPS.get((pass_, sh.S)) if gpu.name.startswith("H100") else None
            out["published_us"] = {k: flops / (v * 1e6) for k, v in pub.items()} if pub else None
        return out


def load_model(tree: Tree, archs=("sm_80", "sm_90a"), use_cache: bool = True) -> Tuple[Model, List[dict], List[str]]:
    from bench import compile_report as CR
    default = tree.root == ROOT
    recs, failures, _ = CR.collect(list(archs), default_triton=default,
                                   triton_modules_extra=[] if default else tree.triton_modules(),
                                   default_csrc=default, csrc_dirs=[] if default else [os.path.join(tree.root, "csrc")],
                                   use_cache=use_cache)
    return Model(tree, recs), recs, failures


# ----------------------------------------------------------------------------------------------
# predictions over the BERT workloads, calibration
# ----------------------------------------------------------------------------------------------
def shape_name(sh: PL.Shape) -> str:
    if sh.op == "attention":
        return f"B{len(sh.lengths)}xS{sh.S}(T{sh.T})xH{sh.heads}xD{sh.head_dim}"
    if sh.op in ("unpad", "pad"):
        return f"B{len(sh.lengths)}xS{sh.S}xH{sh.hidden}(T{sh.T})"
    if sh.op == "mlm_loss":
        return f"T{sh.T}(n{sh.n})xH{sh.hidden}xV{sh.V}"
    return f"M{sh.M}x2N{2 * sh.N}" if sh.op == "geglu" else f"M{sh.M}xN{sh.N}"


def predict_all(model: Model, gpus=("H100", "H200", "A100")) -> List[dict]:
    rows = []
    for size, S, sh in workloads():
        for g in gpus:
            for be in BACKENDS:
                for p in op_passes(sh.op):
                    r = model.predict(sh, p, be, GPUS[g])
                    rows.append({"size": size, "seq": S, "op": sh.op, "shape": shape_name(sh), "pass": p,
                                 "backend": be, "gpu": g, **r})
    return rows


def _attention_lengths(B: int, S: int, T: int) -> Optional[Tuple[int, ...]]:
    L = batch_lengths(B, S)
    return L if sum(L) == T else None


def shape_from_row(op: str, shape: str) -> Optional[PL.Shape]:
    """The model's Shape for a benchmark row's ``op`` / ``shape`` strings (bench/test_bench_*.py)."""
    nums = lambda pat: (lambda m: tuple(int(g) for g in m.groups()) if m else None)(re.fullmatch(pat, shape))  # noqa: E731
    if op == "attention":
        m = nums(r"B(\d+)xS(\d+)\(T(\d+)\)xH(\d+)xD(\d+)")
        L = m and _attention_lengths(m[0], m[1], m[2])
        return PL.Shape(op, L, m[1], heads=m[3], head_dim=m[4]) if L else None
    if op in ("unpad", "pad"):
        m = nums(r"B(\d+)xS(\d+)xH(\d+)\(T(\d+)\)")
        L = m and _attention_lengths(m[0], m[1], m[3])
        return PL.Shape(op, L, m[1], hidden=m[2]) if L else None
    if op == "mlm_loss":
        m = nums(r"T(\d+)\(n(\d+)\)xH(\d+)xV(\d+)")
        return PL.Shape(op, M=m[0], n=m[1], hidden=m[2], V=m[3]) if m else None
    if op == "geglu":
        m = nums(r"M(\d+)x2N(\d+)")
        return PL.Shape(op, M=m[0], N=m[1] // 2) if m else None
    if op in ("bias_gelu", "layer_norm", "layer_norm+residual"):
        m = nums(r"M(\d+)xN(\d+)")
        return PL.Shape(op, M=m[0], N=m[1]) if m else None
    return None


def gpu_for(env: dict) -> Optional[GPU]:
    name = str(env.get("gpu") or "")
    for key in ("H200", "H100", "A100"):
        if key in name:
            g = GPUS[key]
            return GPU(g.name, g.arch, int(env.get("sms") or env.get("gpu_sms") or g.sms), g.clock_ghz, g.hbm_tbs,
                       g.hmma_per_clk)
    cap = str(env.get("capability") or "")
    if cap.startswith("9"):
        return GPUS["H100"]
    if cap.startswith("8"):
        return GPUS["A100"]
    return None


@functools.lru_cache(maxsize=1)
def _saved_model() -> Optional[Model]:
    """The model of the current tree from the committed facts (bench/results/perf-model.json), so that
    predict_ms needs no compiler (the GPU machine runs it)."""
    try:
        with open(DEFAULT_JSON) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return Model(Tree(ROOT, "current"), data.get("records", []))


@functools.lru_cache(maxsize=None)
def _predict_cached(op: str, shape: str, pass_: str, backend: str, gpu: GPU) -> Optional[float]:
    model = _saved_model()
    sh = shape_from_row(op, shape)
    if model is None or sh is None or pass_ not in ("fwd", "bwd", "fwdbwd"):
        return None
    us = model.predict(sh, pass_, backend, gpu)["us"]
    return us / 1e3 if us else None


def predict_ms(row: dict, env: dict) -> Optional[float]:
    """Predicted time (ms) of one benchmark row (``bench.common.run``'s record: op, shape, pass, provider)
    on the GPU ``env`` describes; None for peers, unknown GPUs and shapes the model does not cover.
    Called by bench.gpu_summary for every fastbert row of a GPU run."""
    prov = str(row.get("provider", ""))
    if not prov.startswith("fastbert-") or prov.split("-", 1)[1] not in BACKENDS:
        return None
    gpu = gpu_for(env or {})
    if gpu is None:
        return None
    return _predict_cached(str(row.get("op")), str(row.get("shape")), str(row.get("pass")), prov.split("-", 1)[1], gpu)


def gpu_result_files() -> List[str]:
    return sorted(glob.glob(os.path.join(RESULTS, "*", "gpu_run.json")))


def calibrate(paths: List[str]) -> dict:
    """Measured / predicted per timed fastbert row of each GPU run: the model's error, per op."""
    if not paths:
        return {"runs": [], "note": "No GPU results exist yet (bench/results/*/gpu_run.json): every number here "
                                    "is an uncalibrated prediction."}
    rows = []
    for p in paths:
        with open(p) as f:
            data = json.load(f)
        env = data.get("env", {})
        for r in data.get("bench_records", []):
            if r.get("rec") != "row" or r.get("role") != "fastbert" or not r.get("timed"):
                continue
            pred = predict_ms(r, env)
            if pred:
                rows.append({"run": os.path.relpath(p, ROOT), "op": r["op"], "shape": r["shape"], "pass": r["pass"],
                             "provider": r["provider"], "measured_ms": r["median_ms"], "predicted_ms": pred,
                             "ratio": r["median_ms"] / pred})
    by_op: Dict[str, List[float]] = {}
    for r in rows:
        by_op.setdefault(r["op"], []).append(r["ratio"])
    summ = {op: {"rows": len(v), "median_ratio": sorted(v)[len(v) // 2],
                 "median_abs_log2_error": sorted(abs(math.log2(x)) for x in v)[len(v) // 2]} for op, v in by_op.items()}
    return {"runs": [os.path.relpath(p, ROOT) for p in paths], "rows": rows, "by_op": summ,
            "note": f"{len(rows)} timed rows from {len(paths)} GPU run(s); ratio = measured / predicted"}


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def _rounded(obj):
    """Floats to 4 significant digits (the model is not more precise than that; the JSON stays small)."""
    if isinstance(obj, float):
        return float(f"{obj:.4g}")
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    return obj


def dumps(res: dict) -> str:
    """JSON with one line per prediction / record / kernel: small, and a diff shows what moved."""
    parts = []
    for k, v in res.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            body = "[\n" + ",\n".join("  " + json.dumps(x, default=str) for x in v) + "\n ]"
        elif isinstance(v, dict) and v and all(isinstance(x, dict) or x is None for x in v.values()):
            body = "{\n" + ",\n".join(f"  {json.dumps(kk)}: {json.dumps(x, default=str)}" for kk, x in v.items()) + "\n }"
        else:
            body = json.dumps(v, default=str)
        parts.append(f" {json.dumps(k)}: {body}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _slim(rec: dict) -> dict:
    return {k: rec.get(k) for k in ("source", "arch", "name", "module", "config", "blocks_per_sm", "warps_per_sm",
                                    "regs", "threads", "smem_static", "smem_dynamic", "facts")}


def run(ref: Optional[str] = None, use_cache: bool = True, gpu_results: Optional[List[str]] = None) -> dict:
    t0 = time.time()
    root = ROOT if ref is None else export_tree(ref)
    tree = Tree(root, ref or "current")
    model, recs, failures = load_model(tree, use_cache=use_cache)
    from bench import perf_checks as PC
    kernels = PC.modelled_kernels(model)
    preds = predict_all(model)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", ref or "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    meta = {"tree": ref or "current checkout", "commit": commit, "seconds": None,
            "constants": {"gpus": {k: vars(v) for k, v in GPUS.items()}, "issue_per_clk": ISSUE_PER_CLK,
                          "smem_wavefronts_per_clk": SMEM_WAVEFRONTS_PER_CLK, "mem_latency_clk": MEM_LATENCY_CLK,
                          "launch_us": LAUNCH_US, "gemm_efficiency": GEMM_EFFICIENCY},
            "published": {"source": PUBLISHED_SOURCE, "tflops": {f"{p} {s}": v for (p, s), v in PUBLISHED_TFLOPS.items()}},
            "launcher_versions": tree.versions}
    for p in preds:  # launch detail is kept for H100; the other GPUs keep their totals and bounds
        if p["gpu"] != "H100":
            p["launches"] = [{k: la[k] for k in ("name", "n", "us", "bound")} for la in p["launches"]]
    out = {"meta": meta, "kernels": {f"{a} {n}": (PC.kernel_summary(r) if r else None) for (a, n), r in sorted(kernels.items())},
           "predictions": preds, "auto_order": PC.auto_decisions(preds),
           "calibration": calibrate(gpu_result_files() if gpu_results is None else gpu_results) if ref is None else None,
           "records": [_slim(r) for (a, n), r in sorted(kernels.items()) if r],
           "problems": list(tree.stale) + [f for f in failures if any(n in f for (_, n) in kernels)]}
    compiled = {(r["source"], r.get("kernel")) for r in recs if r.get("hot") and not r.get("error") and r.get("kernel")}
    modelled = {(r["source"], r.get("kernel")) for r in kernels.values() if r}
    out["coverage"] = {"compiled": sorted(map(list, compiled)), "modelled": sorted(map(list, modelled))}
    out["problems"] += [f"{src} kernel {k} has no launch model in bench/perf_launches.py: every hot kernel needs "
                        "one" for src, k in sorted(compiled - modelled)]
    out["_kernels"] = kernels
    meta["seconds"] = round(time.time() - t0, 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.perf_model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default=None, help=f"model another commit (e.g. the baseline {BASELINE_REF}); "
                    "its JSON is written, budgets are not checked")
    ap.add_argument("--json", default=None, help=f"output JSON (default {DEFAULT_JSON}, or "
                    f"{BASELINE_JSON} with --tree {BASELINE_REF}); the Markdown goes beside it")
    ap.add_argument("--no-cache", action="store_true", help="recompile every kernel")
    ap.add_argument("--write-budgets", action="store_true", help=f"rewrite {BUDGETS} from today's facts")
    ap.add_argument("--budgets", default=BUDGETS, help="budget file to check against")
    ap.add_argument("--gpu-results", nargs="*", default=None, help="gpu_run.json files to calibrate against "
                    "(default: bench/results/*/gpu_run.json)")
    args = ap.parse_args(argv)
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
        print("error: triton was imported under TRITON_INTERPRET=1; run the model in its own process", file=sys.stderr)
        return 2
    from bench import perf_checks as PC, perf_report
    res = run(args.tree, use_cache=not args.no_cache, gpu_results=args.gpu_results)
    kernels = res.pop("_kernels")
    problems = list(res["problems"])
    if args.tree is None:
        if args.write_budgets:  # entries of kernels this tree does not use (other branches') are kept
            try:
                with open(args.budgets) as f:
                    kept = json.load(f)
            except (OSError, ValueError):
                kept = {}
            with open(args.budgets, "w") as f:
                json.dump({**kept, **PC.make_budgets(kernels)}, f, indent=1, sort_keys=True)
                f.write("\n")
        try:
            with open(args.budgets) as f:
                budgets = json.load(f)
        except (OSError, ValueError) as e:
            budgets = {}
            problems.append(f"cannot read budgets {args.budgets}: {e}")
        problems += PC.check_budgets(kernels, budgets)
    res["problems"] = problems
    path = args.json or (DEFAULT_JSON if args.tree is None else
                         (BASELINE_JSON if args.tree == BASELINE_REF else os.path.join(RESULTS, f"perf-model-{args.tree}.json")))
    baseline = None
    if args.tree is None and os.path.exists(BASELINE_JSON):
        with open(BASELINE_JSON) as f:
            baseline = json.load(f)
    md = perf_report.markdown(res, baseline)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(dumps(_rounded(res)))
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(md)
    print(perf_report.console(res))
    print(f"wrote {path} and {os.path.splitext(path)[0]}.md ({res['meta']['seconds']} s)")
    from bench.compile_report import exit_status
    return exit_status(problems)


if __name__ == "__main__":
    sys.exit(main())
