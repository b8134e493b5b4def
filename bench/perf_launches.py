"""Launch geometry of every fastbert op at a given shape: which kernels run, how many CTAs, how many
main-loop iterations each CTA runs, and the bytes each launch moves (the input of ``bench.perf_model``).

Triton launches are computed from the tree's own config tables (``kernels.attention._CONFIGS``,
``kernels._common.tile_config`` / ``row_config`` / ``num_strips``), so a config change is seen at once. The
CUDA launchers are C++; their geometry is restated here and each restatement names the source lines it
mirrors (``MIRRORS``): when a launcher changes so that a mirrored line no longer matches, the model refuses
to run on that tree (``check_mirrors``) instead of predicting from stale geometry.

Bytes: ``hbm`` is DRAM traffic (a tensor re-read by several CTAs of one kernel counts once when the re-reads
are L2 hits: attention's K/V, LayerNorm's second read of dy); ``l2`` every byte requested from the memory
system; ``ideal`` what one fused pass must move for the same job (every input read once, every output
written once). Library work (cuBLAS GEMMs, torch elementwise ops, memsets) appears as ``source="torch"``
launches with bytes and FLOPs only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

BF16 = 2
F32 = 4


@dataclass
class Launch:
    """One kernel launch. ``ctas``: (main-loop trips, number of CTAs) groups in launch order (trips 0: the
    CTA exits at once). ``kernel``: the compile report's Triton spec name, or an fnmatch pattern of the CUDA
    instance's demangled name. ``other_trips``: iterations of the kernel's other outer loops."""
    name: str
    source: str  # "triton" | "cuda" | "torch"
    kernel: str
    ctas: List[Tuple[int, int]]
    threads: int
    hbm: float
    l2: float
    ideal: float
    flops: float = 0.0
    other_trips: Optional[int] = 1
    note: str = ""
    loads_per_trip: Optional[int] = None  # global loads per source iteration: the compiler's unroll = SASS / this
    smem_dynamic: int = 0                  # CUDA: dynamic shared memory per CTA at launch
    # HMMA.16816-equivalents one warp runs per main-loop trip. A loop whose compiled body holds more (one
    # copy of the tile math per ALiBi / mask form, one of which runs per trip) is counted at this tensor
    # work with its own other-instructions-per-tensor-op ratio (bench.perf_model.predict_launch).
    tensor_per_trip: float = 0.0
    # whole_kernel: the kernel is counted as a whole, not as once + trips x main loop: each group's "trips"
    # is then the HMMA-equivalents one warp runs on average in that CTA, and the kernel's instructions and
    # wavefronts scale with it (for straight-line phases with form copies and a short inner loop)
    whole_kernel: bool = False
    # tail_once: an active CTA's last trip (a partial block) runs as straight-line code outside the loops
    # (the Triton attention's masked block), so the loops run trips - 1 times and the kernel's once-per-CTA
    # instructions hold that trip
    tail_once: bool = False

    @property
    def n_ctas(self) -> int:
        return sum(c for _, c in self.ctas)


@dataclass(frozen=True)
class Shape:
    """An op's problem size. lengths: the real sequence lengths (attention, padding); M x N: rows x columns
    of the row-wise ops; hidden, V, n: the MLM head (hidden size, vocabulary, labelled rows)."""
    op: str
    lengths: Tuple[int, ...] = ()
    S: int = 0
    heads: int = 0
    head_dim: int = 64
    M: int = 0
    N: int = 0
    hidden: int = 0
    V: int = 0
    n: int = 0

    @property
    def T(self) -> int:
        return sum(self.lengths) if self.lengths else self.M


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _lib(name: str, hbm: float, flops: float = 0.0, note: str = "") -> Launch:
    return Launch(name, "torch", "", [(1, 1)], 0, hbm, hbm, hbm, flops, note=note)


# ----------------------------------------------------------------------------------------------
# CUDA launchers restated (csrc/*.cu); each pattern must match the named source file
# ----------------------------------------------------------------------------------------------
# family -> launcher version -> lines that version's source contains. The tree's version of a family is
# the first whose lines all match; the baseline (b169a24) keeps its own restatement beside today's.
_ATTN_V1 = [("csrc/flash_attn.cu", r"constexpr int kWarps = 4;"),
            ("csrc/flash_attn.cu", r"kFwdKeys = D <= 64 \? 64 : 32"),
            ("csrc/flash_attn.cu", r"kDqKeys = D <= 64 \? 64 : 16"),
            ("csrc/flash_attn.cu", r"kDkvQueries = D <= 64 \? 64 : 16"),
            ("csrc/flash_attn.cu", r"grid\(ceil_div\(max_seqlen, kRows\), p\.heads, p\.batch\)")]
_ATTN_V3_SHORT = [  # v3 adds the single-CTA backward for short sequences (one block per sequence and head)
    ("csrc/flash_attn.cu", r"constexpr int kShortRows = 128;"),
    ("csrc/flash_attn.cu", r"constexpr int kShortThreads = 32 \* kShortRows / 16;"),
    ("csrc/flash_attn.cu", r"if constexpr \(D <= 64\) \{"),
    ("csrc/flash_attn.cu", r"if \(max_seqlen <= kShortRows\) \{"),
    ("csrc/flash_attn.cu", r"FB_LAUNCH\(kern, dim3\(1, p\.heads, p\.batch\), dim3\(kShortThreads\), Cfg<D>::kShortSmem"),
    ("csrc/flash_attn.cu", r"kShortSmem = \(\(size_t\)4 \* kShortRows \* LD \+ 2 \* kShortRows \* \(kShortRows \+ 8\)\) \* 2;"),
    ("csrc/flash_attn.cu", r"dq +grid \(query blocks, H, B\): over the key tiles twice"),
    ("csrc/flash_attn.cu", r"template <typename T, int D, bool kWindow>"),
    ("kernels/attention.py", r"# Pass 2: dQ = sum_j dS_ij K_j")]
MIRRORS: Dict[str, Dict[str, List[Tuple[str, str]]]] = {
    "attention": {"v3": _ATTN_V1 + _ATTN_V3_SHORT,
                  "v2": _ATTN_V1 + [  # the dq passes walk the key tiles twice (delta from P and dP, then dQ)
        ("csrc/flash_attn.cu", r"dq +grid \(query blocks, H, B\): over key tiles twice"),
        ("csrc/flash_attn.cu", r"template <typename T, int D, bool kWindow>"),
        ("kernels/attention.py", r"# Pass 2: dQ = sum_j dS_ij K_j")],
                  "v1": _ATTN_V1},
    "pointwise": {"v1": [("csrc/common.cu", r"int64_t g = \(M \+ 31\) / 32;"),
                         ("csrc/common.cu", r"g > 256 \? 256 : g"),
                         ("csrc/common.cuh", r"l\.grid = dim3\(ceil_div\(N, 32 \* l\.vec\), l\.G\);"),
                         ("csrc/common.cuh", r"constexpr int kPwRows = 8;")]},
    "reduce_partials": {"v1": [("csrc/common.cu", r"FB_LAUNCH\(kern, dim3\(ceil_div\(N, 256\)\), dim3\(256\)")],
                        "v2": [("csrc/common.cu", r"constexpr int kRedRows = 16;"),
                               ("csrc/common.cu", r"FB_LAUNCH\(kern, dim3\(ceil_div\(N, 32\)\), dim3\(32, kRedRows\)")]},
    "layer_norm": {"v1": [("csrc/layer_norm.cu", r"constexpr int kLnValsPerThread = 16;"),
                          ("csrc/layer_norm.cu", r"return \{tpr, tpr >= 128 \? 1 : 128 / tpr\};"),
                          ("csrc/layer_norm.cu", r"int cap = sms \* \(2048 / \(s\.tpr \* s\.rows\)\);")],
                   "v2": [("csrc/layer_norm.cu", r"constexpr int kLnValsPerThread = 16;"),
                          ("csrc/layer_norm.cu", r"constexpr int kLnBwdThreads = 512;"),
                          ("csrc/layer_norm.cu", r"return \{tpr, tpr >= kLnBwdThreads \? 1 : kLnBwdThreads / tpr\};"),
                          ("csrc/layer_norm.cu", r"const int per_sm = 1024 / \(s\.tpr \* s\.rows\) > 1 \? 1024 / \(s\.tpr \* s\.rows\) : 1;"),
                          ("csrc/layer_norm.cu", r"return s\.rows > 1 \? sizeof\(float\) \* \(size_t\)s\.rows \* \(size_t\)N : 0;")]},
    "padding": {"v1": [("csrc/padding.cu",
                        r"dim3 grid\(\(unsigned\)\(gx < 64 \? gx : 64\), \(unsigned\)\(gy < 65535 \? gy : 65535\)\);")]},
    "mlm_loss": {"v1": [("csrc/mlm_loss.cu", r"constexpr int kCeThreads = 256;"),
                        ("csrc/mlm_loss.cu", r"FB_LAUNCH\(kern, dim3\(n\), dim3\(kCeThreads\)"),
                        ("fastbert/ops/mlm_chunked.py", r"logits \+= bias32"),
                        ("fastbert/ops/mlm_chunked.py", r"db32 \+= dl\.sum\(0\)")],
                 "v2": [("csrc/mlm_loss.cu", r"constexpr int kCeResident = 32;"),
                        ("csrc/mlm_loss.cu", r"for \(int vals : \{8, kCeResident\}\)"),
                        ("csrc/mlm_loss.cu", r"FB_LAUNCH\(kern, dim3\(n\), dim3\(sh\.threads\)"),
                        ("fastbert/ops/mlm_chunked.py", r"loss_sum \+= row_kernel\(logits, targets\[s:s \+ r\], bias32, grad, S\)"),
                        ("fastbert/ops/mlm_chunked.py", r"addmm_f32_\(acc, grad\.t\(\), h_aug\[:r\]\)")]},
}


def launcher_versions(read_file) -> Tuple[Dict[str, str], List[str]]:
    """``({family: version}, problems)`` for a tree (``read_file(relpath) -> str``): a family none of whose
    restatements matches is a problem (its launcher changed: update this module)."""
    versions, bad = {}, []
    cache: Dict[str, str] = {}

    def text(path):
        if path not in cache:
            try:
                cache[path] = read_file(path)
            except OSError:
                cache[path] = ""
        return cache[path]
    for fam, by_version in MIRRORS.items():
        for ver, pats in by_version.items():
            if all(re.search(pat, text(path)) for path, pat in pats):
                versions[fam] = ver
                break
        else:
            misses = [f"{path}: /{pat}/" for ver, pats in by_version.items() for path, pat in pats
                      if not re.search(pat, text(path))]
            bad.append(f"{fam}: the CUDA launcher matches no restatement in bench/perf_launches.py "
                       f"(not found: {'; '.join(misses[:3])})")
    return versions, bad


def _attn_groups(lengths: Sequence[int], heads: int, rows: int, trip_rows: int, S: int):
    """CTA groups of a (row blocks, ., .) attention grid: active blocks run ceil(len / trip_rows) trips."""
    gx = cdiv(S, rows)
    groups = []
    for L in lengths:
        act = cdiv(L, rows)
        groups.append((cdiv(L, trip_rows), act * heads))
        if gx - act:
            groups.append((0, (gx - act) * heads))
    return groups


def _attn_bytes(sh: Shape, tensors_in: int, tensors_out: int, lse_like: int) -> float:
    T, H, D = sh.T, sh.heads, sh.head_dim
    return (tensors_in + tensors_out) * T * H * D * BF16 + lse_like * T * H * F32


def attention_launches(sh: Shape, pass_: str, backend: str, arch: str, tree) -> List[Launch]:
    L, H, D, S = sh.lengths, sh.heads, sh.head_dim, sh.S
    sum_sq = sum(x * x for x in L)
    fwd_flops = 4.0 * sum_sq * H * D
    twice = tree.versions.get("attention") != "v1"  # v1 (b169a24): one pass over the key tiles in dq
    inst = ", false" if twice else ""  # v2: CUDA kernels templated on the window (false: global attention)
    forms = tree.versions.get("attention") == "v3"  # v3: one copy of the tile math per score form
    out: List[Launch] = []
    if backend == "cuda":
        rows, keys = 64, (64 if D <= 64 else 32)
        dq_keys, dkv_q = (64, 64) if D <= 64 else (16, 16)
        kv_reread = sum(cdiv(x, rows) * x for x in L) * H * D * BF16  # every row block reads its sequence's K/V
        if pass_ in ("fwd", "fwdbwd"):
            out.append(Launch("flash_attn_fwd", "cuda", f"*flash_attn_fwd_kernel<__nv_bfloat16, {D}{inst}>*",
                              _attn_groups(L, H, rows, keys, S), 128,
                              hbm=_attn_bytes(sh, 3, 1, 1), l2=sh.T * H * D * BF16 * 2 + 2 * kv_reread + sh.T * H * F32,
                              ideal=_attn_bytes(sh, 3, 1, 1), flops=fwd_flops,
                              tensor_per_trip=2 * D * keys / 128 if forms else 0.0))  # S = Q K^T, O += P V
        if pass_ in ("bwd", "fwdbwd") and tree.versions.get("attention") == "v3" and S <= 128 and D <= 64:
            # one CTA of 8 warps per (sequence, head); its loop is the dK/dV phase over 16-query steps.
            # Reads q, k, v, dout and lse once, writes dq, dk, dv; no delta workspace, no K/V re-reads.
            d_ld = D + 8
            smem = (4 * 128 * d_ld + 2 * 128 * 136) * BF16

            def warp_tc(x):  # mean over the 8 warps: the live ones run phase 1 (S, dP, dQ per 64-key chunk)
                live = cdiv(x, 16)  # and phase 2 (dV, dK per 16-query step); warps past the end exit
                return live / 8 * (cdiv(x, 64) * 3 * D * 64 / 128 + live * 2 * D / 8)
            groups = [(warp_tc(x), H) for x in L]
            out.append(Launch("flash_attn_bwd_short", "cuda", f"*flash_attn_bwd_short_kernel<__nv_bfloat16, {D}, false>*",
                              groups, 256, whole_kernel=True,
                              hbm=_attn_bytes(sh, 4, 3, 1), l2=_attn_bytes(sh, 4, 3, 1), ideal=_attn_bytes(sh, 4, 3, 1),
                              flops=2.5 * fwd_flops, smem_dynamic=smem))
        elif pass_ in ("bwd", "fwdbwd"):
            out.append(Launch("flash_attn_bwd_dq", "cuda", f"*flash_attn_bwd_dq_kernel<__nv_bfloat16, {D}{inst}>*",
                              _attn_groups(L, H, rows, dq_keys, S), 128,
                              hbm=_attn_bytes(sh, 5, 1, 2), l2=_attn_bytes(sh, 3, 1, 2) + (4 if twice else 2) * kv_reread,
                              ideal=_attn_bytes(sh, 5, 1, 2), flops=(2.5 if twice else 1.5) * fwd_flops,
                              other_trips=None if twice else 1,
                              tensor_per_trip=3 * D * dq_keys / 128 if forms else 0.0))  # S, dP, dQ += dS K
            qdo_reread = sum(cdiv(x, rows) * x for x in L) * H * (2 * D * BF16 + 2 * F32)
            out.append(Launch("flash_attn_bwd_dkdv", "cuda", f"*flash_attn_bwd_dkdv_kernel<__nv_bfloat16, {D}{inst}>*",
                              _attn_groups(L, H, rows, dkv_q, S), 128,
                              hbm=_attn_bytes(sh, 4, 2, 2), l2=_attn_bytes(sh, 2, 2, 0) + qdo_reread,
                              ideal=_attn_bytes(sh, 4, 2, 2), flops=2.0 * fwd_flops,
                              tensor_per_trip=4 * D * dkv_q / 128 if forms else 0.0))  # S^T, dP^T, dV, dK
        return out
    cfgs = tree.attention._CONFIGS["sm90" if arch == "sm_90a" else "sm80"]
    gen = "sm90" if arch == "sm_90a" else "sm80"
    for kind in (["fwd"] if pass_ == "fwd" else ["dq", "dkdv"] if pass_ == "bwd" else ["fwd", "dq", "dkdv"]):
        bm, bn, warps, _ = cfgs[kind][max(D, 32)]
        own, stream = (bn, bm) if kind == "dkdv" else (bm, bn)
        reread = sum(cdiv(x, own) * x for x in L) * H * D * BF16
        io = {"fwd": (3, 1, 1), "dq": (5, 1, 2), "dkdv": (4, 2, 2)}[kind]
        flops = {"fwd": 1.0, "dq": 2.5 if twice else 1.5, "dkdv": 2.0}[kind] * fwd_flops
        out.append(Launch(f"attn_{kind}", "triton", f"attention.{kind}.d{D}.bf16.{gen}",
                          _attn_groups(L, H, own, stream, S), 32 * warps,
                          hbm=_attn_bytes(sh, *io), l2=_attn_bytes(sh, *io) + (4 if kind == "dq" and twice else 2) * reread,
                          ideal=_attn_bytes(sh, *io), flops=flops, other_trips=None if kind == "dq" and twice else 1,
                          tail_once=kind in ("fwd", "dq")))
    return out


# ----------------------------------------------------------------------------------------------
# row-wise ops
# ----------------------------------------------------------------------------------------------
def _pointwise_cuda(name: str, M: int, N: int, x_cols: int, bwd: bool, red: str) -> List[Launch]:
    G = min(max(cdiv(M, 32), 1), 256)
    rpc = cdiv(M, G)
    vec = 8 if N % 8 == 0 else 1
    ctas = cdiv(N, 32 * vec) * G
    trips = cdiv(rpc, 8)
    io = M * N * BF16 * (x_cols + 1) if not bwd else M * N * BF16 * (2 * x_cols + 1)
    inst = f"*{name}_{'bwd' if bwd else 'fwd'}_kernel<__nv_bfloat16, {vec}>*"
    out = [Launch(f"{name}_{'bwd' if bwd else 'fwd'}", "cuda", inst, [(trips, ctas)], 256,
                  hbm=io + (G * x_cols * N * F32 if bwd else 0), l2=io + (G * x_cols * N * F32 if bwd else 0),
                  ideal=io + (x_cols * N * F32 if bwd else 0), loads_per_trip=x_cols + (1 if bwd else 0))]
    if bwd:
        out.append(_reduce_partials(G, x_cols * N, red))
    return out


def _reduce_partials(G: int, N: int, ver: str = "v1") -> Launch:
    """v1: one thread per column walks all G rows; v2: 32 columns x 16 row-threads per CTA."""
    ctas, threads, trips = (cdiv(N, 256), 256, G) if ver == "v1" else (cdiv(N, 32), 512, cdiv(G, 16))
    return Launch("reduce_partials", "cuda", "*reduce_partials_kernel*", [(trips, ctas)], threads,
                  hbm=G * N * F32 + N * F32, l2=G * N * F32 + N * F32, ideal=N * F32, loads_per_trip=1,
                  note=f"{G} partial rows summed by {ctas} CTAs")


def _strips(tree, row_blocks: int, col_tiles: int, sms: int) -> int:
    """kernels._common.num_strips on a GPU with ``sms`` SMs (the function itself asks the device)."""
    target = max(1, (4 * sms) // max(col_tiles, 1))
    return max(1, min(row_blocks, target))


def _pointwise_triton(tree, name: str, M: int, N: int, x_cols: int, bwd: bool, sms: int) -> List[Launch]:
    cfg = tree.common.tile_config(N)
    bm, bn, warps = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"]
    col_tiles, row_blocks = cdiv(N, bn), cdiv(M, bm)
    io = M * N * BF16 * ((x_cols + 1) if not bwd else (2 * x_cols + 1))
    spec = f"{name}_{'bwd' if bwd else 'fwd'}_bf16_N{N}"
    if not bwd:
        return [Launch(spec, "triton", spec, [(1, row_blocks * col_tiles)], 32 * warps, io, io, io)]
    strips = _strips(tree, row_blocks, col_tiles, sms)
    per = cdiv(row_blocks, strips)
    strips = cdiv(row_blocks, per)
    part = strips * x_cols * N * F32
    return [Launch(spec, "triton", spec, [(per, strips * col_tiles)], 32 * warps, io + part, io + part,
                   io + x_cols * N * F32),
            _lib("dbias partial sum (torch)", part + x_cols * N * (F32 + BF16))]


def pointwise_launches(sh: Shape, pass_: str, backend: str, arch: str, tree, sms: int) -> List[Launch]:
    x_cols = 2 if sh.op == "geglu" else 1
    out = []
    for bwd in ([False] if pass_ == "fwd" else [True] if pass_ == "bwd" else [False, True]):
        if backend == "cuda":
            out += _pointwise_cuda(sh.op, sh.M, sh.N, x_cols, bwd, tree.versions.get("reduce_partials", "v1"))
        else:
            out += _pointwise_triton(tree, sh.op, sh.M, sh.N, x_cols, bwd, sms)
    return out


def layer_norm_launches(sh: Shape, pass_: str, backend: str, arch: str, tree, sms: int) -> List[Launch]:
    M, N = sh.M, sh.N
    res = sh.op == "layer_norm+residual"
    fwd_io = M * N * BF16 * (4 if res else 2) + 2 * M * F32
    bwd_io = M * N * BF16 * (4 if res else 3) + 2 * M * F32  # dy, z, dz (+ dz_extra): the residual's gradient
    out = []
    if backend == "cuda":
        tpr = 32
        while tpr * 16 < N:
            tpr *= 2
        R = 1 if tpr >= 128 else 128 // tpr
        if pass_ in ("fwd", "fwdbwd"):
            out.append(Launch("layer_norm_fwd", "cuda", "*layer_norm_fwd_kernel<__nv_bfloat16, 8>*",
                              [(1, cdiv(M, R))], tpr * R, fwd_io, fwd_io, fwd_io))
        if pass_ in ("bwd", "fwdbwd"):
            if tree.versions.get("layer_norm") == "v1":  # dW/dB accumulated in shared memory, ~16 blocks per SM
                Rb, G = R, max(1, min(cdiv(M, R), sms * (2048 // (tpr * R))))
                smem, other, reread = 2 * Rb * N * F32, cdiv(N, Rb * tpr), M * N * BF16  # dy twice
            else:  # v2: dW/dB in registers, 512-thread blocks, ~2 per SM, one combine buffer
                Rb = 1 if tpr >= 512 else 512 // tpr
                G = max(1, min(cdiv(M, Rb), sms * max(1, 1024 // (tpr * Rb))))
                smem, other = (Rb * N * F32 if Rb > 1 else 0), 2 * cdiv(N, Rb * tpr)
                reread = 2 * M * N * BF16  # dy and z read again by the second pass (L2)
            part = 2 * G * N * F32
            out.append(Launch("layer_norm_bwd", "cuda", "*layer_norm_bwd_kernel<__nv_bfloat16, 8>*",
                              [(cdiv(M, G * Rb), G)], tpr * Rb, bwd_io + part, bwd_io + part + reread,
                              bwd_io + 2 * N * F32, other_trips=other, smem_dynamic=smem,
                              note=f"{G} partial rows"))
            red = tree.versions.get("reduce_partials", "v1")
            out += [_reduce_partials(G, N, red), _reduce_partials(G, N, red)]
        return out
    cfg = tree.common.row_config(N)
    bm, warps = cfg["BLOCK_M"], cfg["num_warps"]
    suffix = "_residual" if res else ""
    if pass_ in ("fwd", "fwdbwd"):
        out.append(Launch("layer_norm_fwd", "triton", f"layer_norm_fwd_bf16_N{N}{suffix}", [(1, cdiv(M, bm))],
                          32 * warps, fwd_io, fwd_io, fwd_io))
    if pass_ in ("bwd", "fwdbwd"):
        row_blocks = cdiv(M, bm)
        strips = _strips(tree, row_blocks, 1, sms)
        per = cdiv(row_blocks, strips)
        strips = cdiv(row_blocks, per)
        part = 2 * strips * N * F32
        out.append(Launch("layer_norm_bwd", "triton", f"layer_norm_bwd_bf16_N{N}", [(per, strips)], 32 * warps,
                          bwd_io + part, bwd_io + part, bwd_io + 2 * N * F32, note=f"{strips} partial rows"))
        out.append(_lib("dW/dB partial sums (torch)", part + 2 * N * (F32 + BF16)))
    return out


def padding_launches(sh: Shape, pass_: str, backend: str, arch: str, tree) -> List[Launch]:
    """unpad: fwd gathers T rows, bwd scatters them into zeroed [B*S] rows; pad: the reverse."""
    T, rows, F = sh.T, len(sh.lengths) * sh.S, sh.hidden
    gather = (sh.op == "unpad") == (pass_ == "fwd")
    out = []
    for g in ([gather] if pass_ != "fwdbwd" else [sh.op == "unpad", sh.op != "unpad"]):
        copy = 2 * T * F * BF16 + T * 8
        if not g:
            out.append(_lib("zero fill (memset)", rows * F * BF16))
        if backend == "cuda":
            chunks = F * BF16 // 16
            gx, gy = min(cdiv(chunks, 32), 64), min(cdiv(T, 8), 65535)
            out.append(Launch("copy_rows", "cuda", "*copy_rows_kernel<uint4>*", [(cdiv(T, gy * 8), gx * gy)], 256,
                              copy, copy, copy + (0 if g else rows * F * BF16)))
        else:
            cfg = tree.common.tile_config(F)
            n_out = T if g else rows
            if not g:
                out.append(_lib("inverse index map (torch)", rows * 4 * 2 + T * 12))
            io = 2 * T * F * BF16 + (rows - T) * F * BF16 * (not g) + n_out * (8 if g else 4)
            out.append(Launch("gather_rows", "triton", f"index_{'gather' if g else 'scatter'}_bf16_F{F}",
                              [(1, cdiv(n_out, cfg["BLOCK_M"]) * cdiv(F, cfg["BLOCK_N"]))], 32 * cfg["num_warps"],
                              io, io, io))
    return out


# ----------------------------------------------------------------------------------------------
# sparse MLM loss (fastbert/ops/mlm_chunked.py drives cuBLAS GEMMs and a backend's row kernel)
# ----------------------------------------------------------------------------------------------
def mlm_launches(sh: Shape, pass_: str, backend: str, arch: str, tree) -> List[Launch]:
    if tree.versions.get("mlm_loss", "v1") == "v1":
        return _mlm_v1(sh, pass_, backend, tree)
    return _mlm_v2(sh, pass_, backend, tree)


def _mlm_v1(sh: Shape, pass_: str, backend: str, tree) -> List[Launch]:
    """b169a24: 256-row chunks (at BERT sizes), the bias added by torch, a two-pass row kernel overwriting the
    fp32 logits with the gradient, a torch reduction for dbias, a cast, then the GEMMs."""
    n, H, V, T = sh.n, sh.hidden, sh.V, sh.M
    scale = _lib("scale saved grads (torch)", 2 * (T * H + V * H + V) * BF16)
    if pass_ == "bwd":  # the op's backward scales the saved gradients by the incoming one
        return [scale]
    grad = pass_ == "fwdbwd"
    c = tree.mlm_chunk_rows(n, V, H)
    out: List[Launch] = []
    for rows in [min(c, n - s) for s in range(0, n, c)]:
        lv = rows * V * F32
        out.append(_lib("gather rows + logits GEMM (cuBLAS)", rows * H * BF16 * 2 + V * H * BF16 + lv,
                        flops=2.0 * rows * H * V))
        out.append(_lib("logits += bias (torch)", 2 * lv + V * F32))
        io = lv * (3 if grad else 1)
        if backend == "cuda":
            out.append(Launch("ce_rows", "cuda", "*cross_entropy_rows_kernel<float, 4>*",
                              [(cdiv(V, 256 * 4), rows)], 256, io, io, lv if not grad else 2 * lv,
                              other_trips=cdiv(V, 256 * 4) if grad else 0, loads_per_trip=1))
        else:
            blk, warps = tree.mlm_block_v(V)
            out.append(Launch("ce_rows", "triton", "mlm_ce_rows_V30528" + ("" if grad else "_nograd"),
                              [(cdiv(V, blk), rows)], 32 * warps, io, io, lv if not grad else 2 * lv,
                              other_trips=cdiv(V, blk) if grad else 0))
        if grad:
            out.append(_lib("dbias += dl.sum(0) (torch)", lv + 2 * V * F32))
            out.append(_lib("dl -> bf16 (torch)", lv + rows * V * BF16))
            out.append(_lib("dhidden GEMM + index_copy (cuBLAS)", rows * V * BF16 + V * H * BF16 + 3 * rows * H * BF16,
                            flops=2.0 * rows * H * V))
            out.append(_lib("dW += dl^T h (cuBLAS, fp32 accumulator)", rows * V * BF16 + rows * H * BF16 + 2 * V * H * F32,
                            flops=2.0 * rows * H * V))
    if grad:
        out += [_lib("dW, dbias -> bf16 (torch)", V * H * (F32 + BF16) + V * (F32 + BF16)), scale]
    return out


def _mlm_v2(sh: Shape, pass_: str, backend: str, tree) -> List[Launch]:
    """Labelled rows compacted on the device, big chunks, a one-read row kernel that adds the bias and writes
    the bf16 gradient, dbias from the dweight GEMM (a ones column), fp32 gradients scaled once."""
    n, H, V, T = sh.n, sh.hidden, sh.V, sh.M
    Hp = H + 8
    scale = _lib("upstream scale + cast of dhidden, dweight, dbias (torch)", (V * H + T * H + V) * (F32 + BF16))
    if pass_ == "bwd":
        return [scale]
    grad = pass_ == "fwdbwd"
    c = tree.mlm_chunk_rows(n, V, H)
    out = [_lib("compact labelled rows (torch)", T * 32)]
    if grad:
        out.append(_lib("zero dweight accumulator and dhidden (torch)", V * Hp * F32 + T * H * F32))
    for rows in [min(c, n - s) for s in range(0, n, c)]:
        lv = rows * V * F32
        out.append(_lib("gather rows + logits GEMM (cuBLAS)", rows * H * BF16 * 2 + V * H * BF16 + lv,
                        flops=2.0 * rows * H * V))
        io = lv + V * F32 + (rows * V * BF16 if grad else 0)
        if backend == "cuda":
            inst = f"*cross_entropy_rows_kernel<{'__nv_bfloat16' if grad else 'float'}, 4, 32>*"
            out.append(Launch("ce_rows", "cuda", inst, [(1, rows)], 1024, io, io, io))
        else:
            blk, warps = tree.mlm_block_v(V)
            spec = "mlm_ce_rows_V30528_" + ("bf16grad" if grad else "nograd")
            out.append(Launch("ce_rows", "triton", spec, [(1, rows)], 32 * warps, io, io, io))
        if grad:
            out.append(_lib("dhidden GEMM + index_copy (cuBLAS)", rows * V * BF16 + V * H * BF16 + 3 * rows * H * F32,
                            flops=2.0 * rows * H * V))
            out.append(_lib("dW|dbias += grad^T [h|1] (cuBLAS, fp32 accumulator)",
                            rows * V * BF16 + 3 * rows * Hp * BF16 + 2 * V * Hp * F32, flops=2.0 * rows * Hp * V))
    if grad:
        out += [_lib("scale dhidden, dweight, dbias by 1/n (torch)", 2 * T * H * F32 + V * Hp * F32 + V * H * F32), scale]
    return out


FAMILY_OF = {"attention": "attention", "bias_gelu": "bias_gelu", "geglu": "geglu", "layer_norm": "layer_norm",
             "layer_norm+residual": "layer_norm", "unpad": "padding", "pad": "padding", "mlm_loss": "mlm_loss"}


def launches(sh: Shape, pass_: str, backend: str, arch: str, tree, sms: int) -> List[Launch]:
    """Every launch of one op call (``pass_``: fwd, bwd or fwdbwd) on ``backend`` (cuda / triton)."""
    fam = FAMILY_OF[sh.op]
    if fam == "attention":
        return attention_launches(sh, pass_, backend, arch, tree)
    if fam in ("bias_gelu", "geglu"):
        return pointwise_launches(sh, pass_, backend, arch, tree, sms)
    if fam == "layer_norm":
        return layer_norm_launches(sh, pass_, backend, arch, tree, sms)
    if fam == "padding":
        return padding_launches(sh, pass_, backend, arch, tree)
    return mlm_launches(sh, pass_, backend, arch, tree)


def ideal_bytes(sh: Shape, pass_: str) -> float:
    """Bytes one fused implementation must move for the whole op call (the memory limit's numerator)."""
    T, H, D = sh.T, sh.heads, sh.head_dim
    if sh.op == "attention":
        f, b = _attn_bytes(sh, 3, 1, 1), _attn_bytes(sh, 6, 3, 1)  # bwd: q k v o do lse in, dq dk dv out
        return {"fwd": f, "bwd": b, "fwdbwd": f + b}[pass_]
    if sh.op in ("bias_gelu", "geglu"):
        xc = 2 if sh.op == "geglu" else 1
        f, b = sh.M * sh.N * BF16 * (xc + 1), sh.M * sh.N * BF16 * (2 * xc + 1) + xc * sh.N * F32
        return {"fwd": f, "bwd": b, "fwdbwd": f + b}[pass_]
    if sh.op.startswith("layer_norm"):
        r = sh.op.endswith("residual")
        f = sh.M * sh.N * BF16 * (4 if r else 2) + 2 * sh.M * F32
        b = sh.M * sh.N * BF16 * (4 if r else 3) + 2 * sh.M * F32 + 2 * sh.N * F32
        return {"fwd": f, "bwd": b, "fwdbwd": f + b}[pass_]
    if sh.op in ("unpad", "pad"):
        rows, F = len(sh.lengths) * sh.S, sh.hidden
        one = (sh.T + rows) * F * BF16
        return one * (2 if pass_ == "fwdbwd" else 1)
    # MLM: hidden rows and the weight once, the gradients once (no logits ever reach memory when fused)
    f = sh.n * sh.hidden * BF16 + sh.V * sh.hidden * BF16 + sh.T * 8
    b = f + (sh.T * sh.hidden + sh.V * sh.hidden + sh.V) * BF16
    return {"fwd": f, "bwd": 2 * (sh.T * sh.hidden + sh.V * sh.hidden) * BF16, "fwdbwd": b}[pass_]
