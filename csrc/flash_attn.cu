// flash_attn.cu: bidirectional ALiBi attention over packed variable-length sequences, global or local
// (sliding window), forward and backward, on tensor cores (mma.sync m16n8k16, fp32 accumulation),
// FlashAttention-2 structure. Tile-level pieces (loads, fragments, the score forms): flash_attn_tiles.cuh.
//
// Semantics (fastbert.reference.flash_attn_fwd / flash_attn_bwd): for the tokens of one sequence b,
//   score[i, j] = q_i . k_j * scale - slope[b, h] * |i - j|     (i, j positions inside sequence b)
//   out_i = sum_j softmax_j(score[i, :]) v_j,   lse[h, t] = logsumexp_j score[i, j]  (natural log, fp32)
// with j restricted to i - win_left <= j <= i + win_right under a window (flash-attn's window_size).
// No token ever attends across sequences; empty sequences produce nothing. softmax_scale > 0.
//
// Layout: q, k, v are [T, H, D] with unit stride over D and any token / head strides (views of a fused
// [T, 3, H, D] QKV projection work without a copy). out, dout, dq, dk, dv are contiguous [T, H, D];
// lse and the backward's delta workspace are [H, T] fp32.
//
// Kernels, each one template with the window as a compile-time switch (kWindow = false is the global
// kernel, with no window code in it):
//   fwd    grid (query blocks, H, B), 4 warps, each owns 16 rows of a 64-row query tile. Q goes through
//          shared memory into registers once; K/V tiles stream through two shared buffers with cp.async
//          (tile n + 1 is in flight while tile n is computed; one barrier per tile). S = Q K^T and O += P V
//          on tensor cores, online softmax in fp32 in the log2 domain.
//   bwd_short  (max_seqlen <= 128, D <= 64: BERT pretraining) grid (1, H, B), 8 warps: one block holds a
//          whole (sequence, head). Warp w takes query rows 16w..: S, dP = dO V^T for every key (in
//          registers), delta = sum_j P dP / sum_j P, dS = P (dP - delta), dQ = dS K; P and dS go to shared
//          memory; then warp w takes key rows 16w..: dV = P^T dO, dK = dS^T Q. Five matmuls, each P and
//          dP computed once, no atomics, no workspace: deterministic.
//   dq, dkdv  (longer sequences) two passes, pipelined like fwd:
//     dq   grid (query blocks, H, B): over the key tiles twice: first delta for its rows (written to the
//          workspace for the next kernel), then P from lse, dP = dO V^T, dS = P (dP - delta), dQ += dS K.
//     dkdv grid (key blocks, H, B): over query tiles: S^T = K Q^T, P^T, dP^T = V dO^T, dS^T,
//          dV += P^T dO, dK += dS^T Q. Working transposed keeps P^T / dS^T in the C-fragment layout,
//          which is directly the A-fragment layout of the next mma (no shuffles, no shared memory).
//     dQ has its own pass instead of fp32 atomics from the dK/dV pass: bitwise reproducible gradients,
//     no [T, H, D] fp32 accumulator, no atomics in the emulation. The price is recomputing S and dP (9
//     tile matmuls per tile pair with the delta loop, against the short kernel's 5), which the short
//     kernel avoids where a whole sequence fits in one block (up to 128 tokens: BERT pretraining).
// delta comes from P and dP rather than rowsum(dO * O) of the output rounded to fp16/bf16:
// fastbert.reference.flash_attn_bwd explains the measured difference.
// Scores are kept in q.k units with a per-form ALiBi term, masks run only on the tiles a sequence end or
// a window edge cuts, and exp2 is one ex2.approx.ftz (flash_attn_tiles.cuh).
// With a window every tile loop's bounds come from reach(): tiles wholly outside the window are skipped,
// so the work per row is proportional to the window.
#include "flash_attn_tiles.cuh"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

namespace fb {
namespace attn {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16 * kWarps;  // rows of the tile a block owns (query rows, or key rows in dkdv)
constexpr int kShortRows = 128;     // the short backward: a whole sequence per block
constexpr int kShortThreads = 32 * kShortRows / 16;
constexpr int kShortKeys = 64;      // its key chunk (S and dP of a warp: 2 chunks of 16 x 64 in registers)

// Tile widths and shared memory per head dim. fwd: static (48 KiB at most: two stages of K and V, Q staged
// through the second); dq, dkdv, short: dynamic (dq / dkdv: Q, dO or K, V resident plus two stages of the
// streamed pair; short: Q, K, V, dO, P, dS of the whole sequence). Every kernel without register spills.
template <int D>
struct Cfg {
  static constexpr int LD = D + 8;  // row pitch of the D-wide tiles: conflict-free ldmatrix
  static constexpr int kFwdKeys = D <= 64 ? 64 : 32;     // key tile of the forward
  static constexpr int kDqKeys = D <= 64 ? 64 : 16;      // key tile of the dq pass
  static constexpr int kDkvQueries = D <= 64 ? 64 : 16;  // query tile of the dk/dv pass
  static constexpr size_t kDqSmem = (2 * kRows + 4 * kDqKeys) * LD * 2;
  static constexpr size_t kDkvSmem = (2 * kRows + 4 * kDkvQueries) * LD * 2 + 4 * kDkvQueries * sizeof(float);
  static constexpr size_t kShortSmem = ((size_t)4 * kShortRows * LD + 2 * kShortRows * (kShortRows + 8)) * 2;
};
// fastbert: dynamic-smem: *flash_attn_bwd_dq_kernel<*, 32, *: 30720
// fastbert: dynamic-smem: *flash_attn_bwd_dq_kernel<*, 64, *: 55296
// fastbert: dynamic-smem: *flash_attn_bwd_dq_kernel<*, 128, *: 52224
// fastbert: dynamic-smem: *flash_attn_bwd_dkdv_kernel<*, 32, *: 31744
// fastbert: dynamic-smem: *flash_attn_bwd_dkdv_kernel<*, 64, *: 56320
// fastbert: dynamic-smem: *flash_attn_bwd_dkdv_kernel<*, 128, *: 52480
// fastbert: dynamic-smem: *flash_attn_bwd_short_kernel<*, 32, *: 110592
// fastbert: dynamic-smem: *flash_attn_bwd_short_kernel<*, 64, *: 143360
static_assert(Cfg<64>::kDqSmem == 55296 && Cfg<64>::kDkvSmem == 56320 && Cfg<64>::kShortSmem == 143360,
              "the dynamic-smem annotations above");
static_assert(Cfg<32>::kDqSmem == 30720 && Cfg<32>::kDkvSmem == 31744 && Cfg<32>::kShortSmem == 110592 &&
              Cfg<128>::kDqSmem == 52224 && Cfg<128>::kDkvSmem == 52480, "the dynamic-smem annotations above");

// ================================================================================================
// forward
// ================================================================================================
template <typename T, int D, bool kWindow>
__global__ void __launch_bounds__(kThreads) flash_attn_fwd_kernel(const Params p) {
  using Tag = typename MmaTag<T>::type;
  constexpr int BN = Cfg<D>::kFwdKeys, LD = Cfg<D>::LD;
  constexpr int NT = BN / 8, ND = D / 8, KD = D / 16;
  constexpr int kStage = 2 * BN * LD;  // one buffer: a K tile, then its V tile
  static_assert(kStage >= kRows * LD, "Q is staged through the second buffer");
  const int b = blockIdx.z, h = blockIdx.y, m0 = blockIdx.x * kRows;
  const int start = p.cu_seqlens[b], len = p.cu_seqlens[b + 1] - start;
  if (m0 >= len) return;  // whole block: grid.x covers the longest sequence
  FB_SHARED(T, sKV, 2 * kStage);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const float scale2 = p.scale * kLog2e, c = alibi_c(p, b, h);
  const T* k = static_cast<const T*>(p.k) + start * p.k_st + h * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + start * p.v_st + h * p.v_sh;
  auto load_kv = [&](int stage, int n0) {
    T* dst = sKV + stage * kStage;
    load_tile_async<T, BN, D, LD, kThreads>(dst, k + n0 * p.k_st, p.k_st, len - n0, p.vec);
    load_tile_async<T, BN, D, LD, kThreads>(dst + BN * LD, v + n0 * p.v_st, p.v_st, len - n0, p.vec);
  };
  int lo, hi, tiles = 0;
  reach<kWindow, BN>(m0, min(m0 + kRows, len) - 1, len, p.win_left, p.win_right, lo, hi);

  // Q through the second buffer into registers (it is the A operand of every S = Q K^T), the first K/V
  // tile into the first buffer.
  load_tile_async<T, kRows, D, LD, kThreads>(sKV + kStage, static_cast<const T*>(p.q) + (start + m0) * p.q_st +
                                             h * p.q_sh, p.q_st, len - m0, p.vec);
  load_kv(0, lo);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  const int r0 = warp * 16;
  uint32_t qf[KD][4];
#pragma unroll
  for (int kk = 0; kk < KD; ++kk) load_a<LD>(qf[kk], sKV + kStage, r0, kk * 16, lane);

  const int row = m0 + r0;        // this warp's first row; this lane's rows: row + g and row + g + 8
  const bool live = row < len;    // a warp whose rows are all past the end only keeps the barriers
  float o[ND][4];
  zero_frags(o);
  float m[2] = {-INFINITY, -INFINITY};  // running max (log2 units)
  float l[2] = {0.f, 0.f};              // running sum of this lane's columns (quad-reduced at the end)
  int stage = 0;
  for (int n0 = lo; n0 < hi; n0 += BN, stage ^= 1, ++tiles) {
    cp_async_wait<0>();
    __syncthreads();  // tile n0 is in for every thread, and every warp is done with the other buffer
    if (n0 + BN < hi) load_kv(stage ^ 1, n0 + BN);  // the next tile streams in during this one's math
    cp_async_commit();
    if (!live) continue;
    const T* sK = sKV + stage * kStage;
    const WarpTile w{row, n0, len, p.win_left, p.win_right};
    with_form(tile_form<kWindow, true, BN>(w, p.slopes != nullptr), [&](auto form) {
      float s[NT][4];  // S = Q K^T, then scores (q.k units), then P
      zero_frags(s);
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) step_bt<Tag, LD>(s, qf[kk], sK, kk * 16, lane);
      float rt[2];
      tile_scores<kWindow, true>(s, rt, form, w, c, g, t);
      float mx[2] = {fmaxf(s[0][0], s[0][1]), fmaxf(s[0][2], s[0][3])};
#pragma unroll
      for (int nt = 1; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
      }
      // A row can meet a tile with no finite score (cut off by the window's edge, or an ALiBi bias that
      // overflowed to -inf): its max stays -inf and exp2(-inf - -inf) would be nan, so it subtracts 0.
      float rb[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float mn = fmaxf(m[r], quad_max(mx[r] + rt[r]) * scale2);  // rt depends on the lane's columns
        const float base = mn == -INFINITY ? 0.f : mn;
        const float alpha = exp2_ftz(m[r] - base);
        m[r] = mn;
        l[r] *= alpha;
#pragma unroll
        for (int nd = 0; nd < ND; ++nd) o[nd][2 * r] *= alpha, o[nd][2 * r + 1] *= alpha;
        rb[r] = fmaf(rt[r], scale2, -base);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[nt][e] = exp2_ftz(fmaf(s[nt][e], scale2, rb[e >> 1]));
          l[e >> 1] += s[nt][e];
        }
      }
      mma_pb<Tag, LD>(o, s, sK + BN * LD, lane);  // O += P V, P taken straight from the score registers
    });
  }

  T* out = static_cast<T*>(const_cast<void*>(p.out));
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float lsum = quad_sum(l[r]);  // warp collective: before the early continue
    const int i = row + g + 8 * r;
    if (i >= len) continue;
    const float inv = lsum > 0.f ? 1.f / lsum : 0.f;  // 0 only when every score was -inf: out 0, lse -inf
    const int64_t tok = start + i;
    store_frag_row<T>(out + (tok * p.heads + h) * D, o, r, t, inv);
    if (t == 0) p.lse[h * p.total + tok] = (m[r] + log2f(lsum)) * kLn2;
  }
  record_visits(p, tiles);
}

// P = exp2(score * log2(e) - lse2) of a warp tile whose rows are queries (lse2: theirs, log2 units), from
// the raw q.k in s (s becomes P; 0 where the row cannot see the key).
template <bool kWindow, int F, int NT>
__device__ __forceinline__ void probs_rows(float (&s)[NT][4], FormT<F> form, const WarpTile& w, float c, float scale2,
                                           const float (&lse2)[2], int g, int t) {
  float rt[2];
  tile_scores<kWindow, true>(s, rt, form, w, c, g, t);
  const float rb[2] = {fmaf(rt[0], scale2, -lse2[0]), fmaf(rt[1], scale2, -lse2[1])};
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] = exp2_ftz(fmaf(s[nt][e], scale2, rb[e >> 1]));
  }
}

// delta = sum_j P dP / sum_j P of this lane's two rows from its column partial sums (0 for rows with no P).
__device__ __forceinline__ void finish_delta(float (&delta)[2], const float (&pdp)[2], const float (&psum)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float ps = quad_sum(psum[r]), pd = quad_sum(pdp[r]);
    delta[r] = ps > 0.f ? pd / ps : 0.f;
  }
}

// ================================================================================================
// backward for short sequences: one block per (sequence, head)
// ================================================================================================
template <typename T, int D, bool kWindow>
__global__ void __launch_bounds__(kShortThreads) flash_attn_bwd_short_kernel(const Params p) {
  using Tag = typename MmaTag<T>::type;
  constexpr int L = kShortRows, LD = Cfg<D>::LD, LP = L + 8, NC = kShortKeys, NT = NC / 8, ND = D / 8;
  const int b = blockIdx.z, h = blockIdx.y;
  const int start = p.cu_seqlens[b], len = p.cu_seqlens[b + 1] - start;  // len <= L (the launcher checks)
  if (len == 0) return;
  FB_DYNAMIC_SHARED(T, smem);  // Q, K, V, dO: [L][LD]; P, dS: [L queries][LP]
  T *sQ = smem, *sK = sQ + L * LD, *sV = sK + L * LD, *sdO = sV + L * LD, *sP = sdO + L * LD, *sdS = sP + L * LP;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const float scale2 = p.scale * kLog2e, c = alibi_c(p, b, h);
  const int64_t rs = (int64_t)p.heads * D;  // token stride of the contiguous tensors
  load_tile_async<T, L, D, LD, kShortThreads>(sQ, static_cast<const T*>(p.q) + start * p.q_st + h * p.q_sh, p.q_st,
                                              len, p.vec);
  load_tile_async<T, L, D, LD, kShortThreads>(sK, static_cast<const T*>(p.k) + start * p.k_st + h * p.k_sh, p.k_st,
                                              len, p.vec);
  load_tile_async<T, L, D, LD, kShortThreads>(sV, static_cast<const T*>(p.v) + start * p.v_st + h * p.v_sh, p.v_st,
                                              len, p.vec);
  load_tile_async<T, L, D, LD, kShortThreads>(sdO, static_cast<const T*>(p.dout) + start * rs + h * D, rs, len,
                                              p.vec);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  const int r0 = warp * 16;  // phase 1: this warp's query rows; phase 2: its key rows
  const int chunks = len > NC ? 2 : 1;
  if (r0 < len) {
    const float lse2[2] = {lse_log2(p, h, start + r0 + g, r0 + g < len),
                           lse_log2(p, h, start + r0 + g + 8, r0 + g + 8 < len)};
    float pf[2][NT][4], dpf[2][NT][4];  // P and dP of both key chunks, then dS in pf
    float pdp[2] = {0.f, 0.f}, psum[2] = {0.f, 0.f};
#pragma unroll
    for (int ch = 0; ch < 2; ++ch) {
      zero_frags(pf[ch]);
      zero_frags(dpf[ch]);
      if (ch >= chunks) continue;
      const WarpTile w{r0, ch * NC, len, p.win_left, p.win_right};
      with_form(tile_form<kWindow, true, NC>(w, p.slopes != nullptr), [&](auto form) {
        mma_abt2<Tag, LD, D>(pf[ch], sQ, sK + ch * NC * LD, dpf[ch], sdO, sV + ch * NC * LD, r0, lane);
        probs_rows<kWindow>(pf[ch], form, w, c, scale2, lse2, g, t);
      });
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          pdp[e >> 1] += pf[ch][nt][e] * dpf[ch][nt][e];
          psum[e >> 1] += pf[ch][nt][e];
        }
      }
    }
    // delta from every key of the row at once: no delta pass, no workspace
    float delta[2];
    finish_delta(delta, pdp, psum);
    float dq[ND][4];
    zero_frags(dq);
#pragma unroll
    for (int ch = 0; ch < 2; ++ch) {
      if (ch >= chunks) continue;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {  // P and dS = P (dP - delta), row-major [query][key], for phase 2
          const int off = (r0 + g + 8 * r) * LP + ch * NC + nt * 8 + 2 * t;
          st32(sP + off, pack2<T>(pf[ch][nt][2 * r], pf[ch][nt][2 * r + 1]));
          pf[ch][nt][2 * r] *= dpf[ch][nt][2 * r] - delta[r];
          pf[ch][nt][2 * r + 1] *= dpf[ch][nt][2 * r + 1] - delta[r];
          st32(sdS + off, pack2<T>(pf[ch][nt][2 * r], pf[ch][nt][2 * r + 1]));
        }
      }
      mma_pb<Tag, LD>(dq, pf[ch], sK + ch * NC * LD, lane);  // dQ += dS K
    }
    T* dqp = static_cast<T*>(p.dq);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = r0 + g + 8 * r;
      if (i < len) store_frag_row<T>(dqp + ((start + i) * p.heads + h) * D, dq, r, t, p.scale);
    }
  }
  __syncthreads();  // every warp's P and dS rows are in

  if (r0 < len) {  // phase 2: dV = P^T dO, dK = dS^T Q over the queries (rows past the end are zeros)
    float dk[ND][4], dv[ND][4];
    zero_frags(dk);
    zero_frags(dv);
    const int steps = (len + 15) / 16;
    for (int kk = 0; kk < steps; ++kk) {
      uint32_t ap[4], ads[4];
      load_a_trans<LP>(ap, sP, r0, kk * 16, lane);
      load_a_trans<LP>(ads, sdS, r0, kk * 16, lane);
      step_b<Tag, LD>(dv, ap, sdO, kk * 16, lane);
      step_b<Tag, LD>(dk, ads, sQ, kk * 16, lane);
    }
    T* dkp = static_cast<T*>(p.dk);
    T* dvp = static_cast<T*>(p.dv);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int j = r0 + g + 8 * r;
      if (j >= len) continue;
      const int64_t off = ((start + j) * p.heads + h) * D;
      store_frag_row<T>(dkp + off, dk, r, t, p.scale);
      store_frag_row<T>(dvp + off, dv, r, t, 1.f);  // x * 1.f is exact: folded away
    }
  }
}

// ================================================================================================
// backward, pass 1: delta and dQ (one block per 64 query rows)
// ================================================================================================
template <typename T, int D, bool kWindow>
__global__ void __launch_bounds__(kThreads) flash_attn_bwd_dq_kernel(const Params p) {
  using Tag = typename MmaTag<T>::type;
  constexpr int BN = Cfg<D>::kDqKeys, LD = Cfg<D>::LD;
  constexpr int NT = BN / 8, ND = D / 8, kStage = 2 * BN * LD;
  const int b = blockIdx.z, h = blockIdx.y, m0 = blockIdx.x * kRows;
  const int start = p.cu_seqlens[b], len = p.cu_seqlens[b + 1] - start;
  if (m0 >= len) return;
  FB_DYNAMIC_SHARED(T, smem);  // Q, dO: [kRows][LD]; two buffers of [K tile][V tile]
  T *sQ = smem, *sdO = sQ + kRows * LD, *sKV = sdO + kRows * LD;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const float scale2 = p.scale * kLog2e, c = alibi_c(p, b, h);
  const int64_t rs = (int64_t)p.heads * D;  // token stride of the contiguous tensors
  const T* k = static_cast<const T*>(p.k) + start * p.k_st + h * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + start * p.v_st + h * p.v_sh;
  auto load_kv = [&](int stage, int n0) {
    T* dst = sKV + stage * kStage;
    load_tile_async<T, BN, D, LD, kThreads>(dst, k + n0 * p.k_st, p.k_st, len - n0, p.vec);
    load_tile_async<T, BN, D, LD, kThreads>(dst + BN * LD, v + n0 * p.v_st, p.v_st, len - n0, p.vec);
  };
  int lo, hi, tiles = 0;
  reach<kWindow, BN>(m0, min(m0 + kRows, len) - 1, len, p.win_left, p.win_right, lo, hi);
  const int ntiles = (hi - lo + BN - 1) / BN;
  load_tile_async<T, kRows, D, LD, kThreads>(sQ, static_cast<const T*>(p.q) + (start + m0) * p.q_st + h * p.q_sh,
                                             p.q_st, len - m0, p.vec);
  load_tile_async<T, kRows, D, LD, kThreads>(sdO, static_cast<const T*>(p.dout) + (start + m0) * rs + h * D, rs,
                                             len - m0, p.vec);
  load_kv(0, lo);
  cp_async_commit();

  const int r0 = warp * 16, row = m0 + r0;
  const bool live = row < len;
  const float lse2[2] = {lse_log2(p, h, start + row + g, row + g < len),
                         lse_log2(p, h, start + row + g + 8, row + g + 8 < len)};
  // Two sweeps over the key tiles as one pipelined sequence of 2 * ntiles steps: the first forms
  // delta_i = sum_j P_ij dP_ij / sum_j P_ij (not rowsum(dO * O) from the rounded output: see
  // fastbert.reference.flash_attn_bwd), the second dQ += dS K with dS = P (dP - delta).
  float pdp[2] = {0.f, 0.f}, psum[2] = {0.f, 0.f}, delta[2] = {0.f, 0.f};
  float dq[ND][4];
  zero_frags(dq);
  int stage = 0;
  for (int it = 0; it < 2 * ntiles; ++it, stage ^= 1, ++tiles) {
    const int n0 = lo + (it < ntiles ? it : it - ntiles) * BN;
    cp_async_wait<0>();
    __syncthreads();  // tile it is in for every thread, and every warp is done with the other buffer
    if (it + 1 < 2 * ntiles) load_kv(stage ^ 1, lo + (it + 1 < ntiles ? it + 1 : it + 1 - ntiles) * BN);
    cp_async_commit();
    if (!live) continue;
    if (it == ntiles) {
      finish_delta(delta, pdp, psum);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = row + g + 8 * r;
        if (i < len && t == 0) p.delta[h * p.total + start + i] = delta[r];  // for the dK/dV kernel
      }
    }
    const T* sK = sKV + stage * kStage;
    const WarpTile w{row, n0, len, p.win_left, p.win_right};
    float pf[NT][4], dpf[NT][4];
    with_form(tile_form<kWindow, true, BN>(w, p.slopes != nullptr), [&](auto form) {
      zero_frags(pf);
      zero_frags(dpf);
      mma_abt2<Tag, LD, D>(pf, sQ, sK, dpf, sdO, sK + BN * LD, r0, lane);
      probs_rows<kWindow>(pf, form, w, c, scale2, lse2, g, t);
    });
    if (it < ntiles) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          pdp[e >> 1] += pf[nt][e] * dpf[nt][e];
          psum[e >> 1] += pf[nt][e];
        }
      }
    } else {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) pf[nt][e] *= dpf[nt][e] - delta[e >> 1];
      }
      mma_pb<Tag, LD>(dq, pf, sK, lane);
    }
  }

  T* dqp = static_cast<T*>(p.dq);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row + g + 8 * r;
    if (i < len) store_frag_row<T>(dqp + ((start + i) * p.heads + h) * D, dq, r, t, p.scale);
  }
  record_visits(p, tiles);
}

// ================================================================================================
// backward, pass 2: dK and dV (one block per 64 key rows; reads delta written by pass 1)
// ================================================================================================
template <typename T, int D, bool kWindow>
__global__ void __launch_bounds__(kThreads) flash_attn_bwd_dkdv_kernel(const Params p) {
  using Tag = typename MmaTag<T>::type;
  constexpr int BM = Cfg<D>::kDkvQueries, LD = Cfg<D>::LD;
  constexpr int NT = BM / 8, ND = D / 8, kStage = 2 * BM * LD;
  const int b = blockIdx.z, h = blockIdx.y, n0 = blockIdx.x * kRows;
  const int start = p.cu_seqlens[b], len = p.cu_seqlens[b + 1] - start;
  if (n0 >= len) return;
  // K, V: [kRows][LD]; two buffers of [Q tile][dO tile]; two of [-lse2][delta] (BM floats each)
  FB_DYNAMIC_SHARED(T, smem);
  T *sK = smem, *sV = sK + kRows * LD, *sQO = sV + kRows * LD;
  float* sLD = reinterpret_cast<float*>(sQO + 2 * kStage);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const float scale2 = p.scale * kLog2e, c = alibi_c(p, b, h);
  const int64_t rs = (int64_t)p.heads * D;
  const T* q = static_cast<const T*>(p.q) + start * p.q_st + h * p.q_sh;
  const T* dout = static_cast<const T*>(p.dout) + start * rs + h * D;
  // One query tile: Q and dO asynchronously; -lse2 and delta of its rows with plain loads (they are ordered
  // by the same barrier). Query rows past the end: P = exp2(-inf) = 0.
  auto load_tile = [&](int stage, int m0) {
    T* dst = sQO + stage * kStage;
    load_tile_async<T, BM, D, LD, kThreads>(dst, q + m0 * p.q_st, p.q_st, len - m0, p.vec);
    load_tile_async<T, BM, D, LD, kThreads>(dst + BM * LD, dout + m0 * rs, rs, len - m0, p.vec);
    float* ld = sLD + stage * 2 * BM;
#pragma unroll
    for (int pass = 0; pass < (BM + kThreads - 1) / kThreads; ++pass) {
      const int i = threadIdx.x + pass * kThreads;
      if (i >= BM) break;
      const bool ok = m0 + i < len;
      ld[i] = -lse_log2(p, h, start + m0 + i, ok);
      ld[BM + i] = ok ? p.delta[h * p.total + start + m0 + i] : 0.f;
    }
  };
  load_tile_async<T, kRows, D, LD, kThreads>(sK, static_cast<const T*>(p.k) + (start + n0) * p.k_st + h * p.k_sh,
                                             p.k_st, len - n0, p.vec);
  load_tile_async<T, kRows, D, LD, kThreads>(sV, static_cast<const T*>(p.v) + (start + n0) * p.v_st + h * p.v_sh,
                                             p.v_st, len - n0, p.vec);
  // key j is seen by the queries i with i - win_left <= j <= i + win_right: j - win_right .. j + win_left
  int lo, hi, tiles = 0;
  reach<kWindow, BM>(n0, min(n0 + kRows, len) - 1, len, p.win_right, p.win_left, lo, hi);
  load_tile(0, lo);
  cp_async_commit();

  const int r0 = warp * 16, row = n0 + r0;  // this warp's key rows: row + g, row + g + 8
  const bool live = row < len;
  float dk[ND][4], dv[ND][4];
  zero_frags(dk);
  zero_frags(dv);
  int stage = 0;
  for (int m0 = lo; m0 < hi; m0 += BM, stage ^= 1, ++tiles) {
    cp_async_wait<0>();
    __syncthreads();  // tile m0 is in for every thread, and every warp is done with the other buffer
    if (m0 + BM < hi) load_tile(stage ^ 1, m0 + BM);
    cp_async_commit();
    if (!live) continue;
    const T* sQ = sQO + stage * kStage;
    const T* sdO = sQ + BM * LD;
    const float* nl = sLD + stage * 2 * BM;  // -lse2 of the tile's queries, then their delta
    const WarpTile w{row, m0, len, p.win_right, p.win_left};
    float st[NT][4], dpt[NT][4];  // S^T, dP^T: rows = this warp's keys, columns = the tile's queries
    with_form(tile_form<kWindow, false, BM>(w, p.slopes != nullptr), [&](auto form) {
      zero_frags(st);
      zero_frags(dpt);
      mma_abt2<Tag, LD, D>(st, sK, sQ, dpt, sV, sdO, r0, lane);
      float rt[2];
      tile_scores<kWindow, false>(st, rt, form, w, c, g, t);
      constexpr bool kRowTerm = decltype(form)::value == kRight || decltype(form)::value == kLeft;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = nt * 8 + 2 * t + (e & 1);
          const float x = kRowTerm ? fmaf(rt[e >> 1], scale2, nl[col]) : nl[col];
          st[nt][e] = exp2_ftz(fmaf(st[nt][e], scale2, x));                 // P^T
          dpt[nt][e] = st[nt][e] * (dpt[nt][e] - nl[BM + col]);              // dS^T = P^T (dP^T - delta)
        }
      }
    });
    mma_pb2<Tag, LD>(dv, st, sdO, dk, dpt, sQ, lane);  // dV += P^T dO, dK += dS^T Q
  }

  T* dkp = static_cast<T*>(p.dk);
  T* dvp = static_cast<T*>(p.dv);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = row + g + 8 * r;
    if (j >= len) continue;
    const int64_t off = ((start + j) * p.heads + h) * D;
    store_frag_row<T>(dkp + off, dk, r, t, p.scale);
    store_frag_row<T>(dvp + off, dv, r, t, 1.f);  // x * 1.f is exact: folded away
  }
  record_visits(p, tiles);
}

// ================================================================================================
// host side
// ================================================================================================
inline bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) % 16) == 0; }

inline void check_common(int dtype, int head_dim, int batch, int heads, int max_seqlen, int win_left,
                         int win_right, float scale) {
  if (dtype != kF16 && dtype != kBF16)
    throw std::invalid_argument(std::string("flash_attn: dtype code ") + std::to_string(dtype) +
                                " is not supported: the CUDA attention kernels take float16 or bfloat16");
  if (head_dim != 32 && head_dim != 64 && head_dim != 128)
    throw std::invalid_argument("flash_attn: head dim " + std::to_string(head_dim) +
                                " is not supported by the CUDA kernels (32, 64 or 128)");
  if (batch < 0 || heads < 1 || heads > 65535 || batch > 65535 || max_seqlen < 0)
    throw std::invalid_argument("flash_attn: bad sizes (batch " + std::to_string(batch) + ", heads " +
                                std::to_string(heads) + ", max_seqlen " + std::to_string(max_seqlen) + ")");
  if (win_left < -1 || win_right < -1)
    throw std::invalid_argument("flash_attn: window_size: expected each side >= 0 or -1 (unbounded), got (" +
                                std::to_string(win_left) + ", " + std::to_string(win_right) + ")");
  if (!(scale > 0.f) || !std::isfinite(scale))  // the scores are kept in q.k units (flash_attn_tiles.cuh)
    throw std::invalid_argument("flash_attn: softmax_scale must be a finite number > 0 for the CUDA kernels, got " +
                                std::to_string(scale));
}

// Kernels needing more than the default 48 KiB of dynamic shared memory opt in (sm_80: up to 163 KiB,
// sm_90: 227 KiB).
template <typename K>
inline void opt_in_smem(K kern, size_t bytes, const char* what) {
  if (bytes <= 48 * 1024) return;
  const cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
  if (e != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": cannot get " + std::to_string(bytes) +
                             " bytes of shared memory: " + cudaGetErrorString(e));
}

// Params shared by the forward and the backward: q, k, v with their strides, sizes, scale, window. The
// 16-byte vector path needs every strided input aligned with strides a multiple of 8 elements (the
// contiguous tensors are checked by the caller: `extra` is the one it reads through load_tile, or nullptr).
// A window side of -1 becomes kUnbounded, farther than any sequence, so the masks need no special case.
constexpr int kUnbounded = 1 << 30;
inline Params make_params(const void* q, const void* k, const void* v, int64_t q_st, int64_t q_sh, int64_t k_st,
                          int64_t k_sh, int64_t v_st, int64_t v_sh, const void* extra, const int32_t* cu_seqlens,
                          const float* slopes, int batch, int heads, int64_t total, float scale, int win_left,
                          int win_right, int32_t* visits) {
  Params p{};
  p.q = q, p.k = k, p.v = v;
  p.q_st = q_st, p.q_sh = q_sh, p.k_st = k_st, p.k_sh = k_sh, p.v_st = v_st, p.v_sh = v_sh;
  p.cu_seqlens = cu_seqlens, p.slopes = slopes;
  p.batch = batch, p.heads = heads, p.total = total, p.scale = scale;
  p.vec = aligned16(q) && aligned16(k) && aligned16(v) && aligned16(extra) && q_st % 8 == 0 && q_sh % 8 == 0 &&
          k_st % 8 == 0 && k_sh % 8 == 0 && v_st % 8 == 0 && v_sh % 8 == 0;
  p.window = win_left >= 0 || win_right >= 0;
  p.win_left = win_left < 0 ? kUnbounded : std::min(win_left, kUnbounded);
  p.win_right = win_right < 0 ? kUnbounded : std::min(win_right, kUnbounded);
  p.visits = visits;
  return p;
}

struct Fwd {
  template <typename T, int D, bool W>
  static void run(const Params& p, int max_seqlen, cudaStream_t stream) {
    (void)stream;  // unused by the host emulation's FB_LAUNCH
    const dim3 grid(ceil_div(max_seqlen, kRows), p.heads, p.batch);
    auto kern = flash_attn_fwd_kernel<T, D, W>;
    FB_LAUNCH(kern, grid, dim3(kThreads), 0, stream, p);
    check_launch("flash_attn_fwd_kernel");
  }
};

struct Bwd {
  template <typename T, int D, bool W>
  static void run(const Params& p, int max_seqlen, cudaStream_t stream) {
    (void)stream;
    if constexpr (D <= 64) {  // D = 128 would need 204 KiB: more than an A100 block can have
      if (max_seqlen <= kShortRows) {  // a whole sequence per block: 5 matmuls, no second pass
        auto kern = flash_attn_bwd_short_kernel<T, D, W>;
        opt_in_smem(kern, Cfg<D>::kShortSmem, "flash_attn_bwd_short_kernel");
        FB_LAUNCH(kern, dim3(1, p.heads, p.batch), dim3(kShortThreads), Cfg<D>::kShortSmem, stream, p);
        check_launch("flash_attn_bwd_short_kernel");
        return;
      }
    }
    const dim3 grid(ceil_div(max_seqlen, kRows), p.heads, p.batch);
    // dq first: it also writes delta, which dkdv reads (same stream, so ordered)
    auto dq_kern = flash_attn_bwd_dq_kernel<T, D, W>;
    opt_in_smem(dq_kern, Cfg<D>::kDqSmem, "flash_attn_bwd_dq_kernel");
    FB_LAUNCH(dq_kern, grid, dim3(kThreads), Cfg<D>::kDqSmem, stream, p);
    check_launch("flash_attn_bwd_dq_kernel");
    Params p2 = p;  // visit counts of the second kernel go after the first's
    if (p.visits) p2.visits = p.visits + (int64_t)grid.x * grid.y * grid.z;
    auto dkdv_kern = flash_attn_bwd_dkdv_kernel<T, D, W>;
    opt_in_smem(dkdv_kern, Cfg<D>::kDkvSmem, "flash_attn_bwd_dkdv_kernel");
    FB_LAUNCH(dkdv_kern, grid, dim3(kThreads), Cfg<D>::kDkvSmem, stream, p2);
    check_launch("flash_attn_bwd_dkdv_kernel");
  }
};

// Op::run<T, D, window> for the dtype code, head dim (both validated by check_common) and p.window.
template <typename Op, typename T, int D>
void dispatch_window(const Params& p, int max_seqlen, cudaStream_t stream) {
  p.window ? Op::template run<T, D, true>(p, max_seqlen, stream) : Op::template run<T, D, false>(p, max_seqlen, stream);
}
template <typename Op, typename T>
void dispatch_dim(int head_dim, const Params& p, int max_seqlen, cudaStream_t stream) {
  switch (head_dim) {
    case 32: dispatch_window<Op, T, 32>(p, max_seqlen, stream); break;
    case 64: dispatch_window<Op, T, 64>(p, max_seqlen, stream); break;
    default: dispatch_window<Op, T, 128>(p, max_seqlen, stream); break;
  }
}
template <typename Op>
void dispatch(int dtype, int head_dim, const Params& p, int max_seqlen, cudaStream_t stream) {
  dtype == kBF16 ? dispatch_dim<Op, __nv_bfloat16>(head_dim, p, max_seqlen, stream)
                 : dispatch_dim<Op, __half>(head_dim, p, max_seqlen, stream);
}

}  // namespace attn

// Forward. q, k, v: [T, H, D] (unit stride over D, token / head strides as given, in elements);
// out: contiguous [T, H, D] of the same dtype; lse: [H, T] fp32; cu_seqlens: [batch + 1] int32;
// alibi_slopes: [batch, heads] fp32 or nullptr. dtype: fb::kF16 or fb::kBF16; head_dim 32, 64 or 128.
// window_left / window_right: flash-attn's window_size (-1: unbounded). visits: nullptr, or (tests) an
// int32 [heads, batch, blocks] buffer of zeros that receives the tiles each block visited.
void launch_flash_attn_fwd(int dtype, const void* q, const void* k, const void* v, int64_t q_stride_t,
                           int64_t q_stride_h, int64_t k_stride_t, int64_t k_stride_h, int64_t v_stride_t,
                           int64_t v_stride_h, void* out, float* lse, const int32_t* cu_seqlens,
                           const float* alibi_slopes, int batch, int heads, int head_dim, int64_t total_tokens,
                           int max_seqlen, float softmax_scale, int window_left, int window_right,
                           int32_t* visits, cudaStream_t stream) {
  attn::check_common(dtype, head_dim, batch, heads, max_seqlen, window_left, window_right, softmax_scale);
  if (batch == 0 || max_seqlen == 0 || total_tokens == 0) return;
  attn::Params p = attn::make_params(q, k, v, q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h,
                                     nullptr, cu_seqlens, alibi_slopes, batch, heads, total_tokens, softmax_scale,
                                     window_left, window_right, visits);
  p.out = out, p.lse = lse;
  attn::dispatch<attn::Fwd>(dtype, head_dim, p, max_seqlen, stream);
}

// Backward. dout, dq, dk, dv: contiguous [T, H, D]; q, k, v strided as in the forward; lse: [H, T] fp32
// from the forward; delta: an [H, T] fp32 workspace (the two-pass path writes sum_j P dP / sum_j P per row
// there; the short path, max_seqlen <= 128 and head_dim <= 64, needs none). The forward's output is not
// read (delta comes from P and dP). visits: nullptr, or an int32 buffer of 2 * heads * batch * blocks zeros
// (dq kernel's counts, then dkdv's; the short path records none).
void launch_flash_attn_bwd(int dtype, const void* dout, const void* q, const void* k, const void* v,
                           int64_t q_stride_t, int64_t q_stride_h, int64_t k_stride_t, int64_t k_stride_h,
                           int64_t v_stride_t, int64_t v_stride_h, const float* lse, void* dq, void* dk, void* dv,
                           float* delta, const int32_t* cu_seqlens, const float* alibi_slopes, int batch,
                           int heads, int head_dim, int64_t total_tokens, int max_seqlen, float softmax_scale,
                           int window_left, int window_right, int32_t* visits, cudaStream_t stream) {
  attn::check_common(dtype, head_dim, batch, heads, max_seqlen, window_left, window_right, softmax_scale);
  if (batch == 0 || max_seqlen == 0 || total_tokens == 0) return;
  attn::Params p = attn::make_params(q, k, v, q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h,
                                     dout, cu_seqlens, alibi_slopes, batch, heads, total_tokens, softmax_scale,
                                     window_left, window_right, visits);
  p.dout = dout, p.dq = dq, p.dk = dk, p.dv = dv;
  p.lse = const_cast<float*>(lse), p.delta = delta;
  attn::dispatch<attn::Bwd>(dtype, head_dim, p, max_seqlen, stream);
}

}  // namespace fb
