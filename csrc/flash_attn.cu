// flash_attn.cu: bidirectional ALiBi attention over packed variable-length sequences, global or local
// (sliding window), forward and backward, on tensor cores (mma.sync m16n8k16, fp32 accumulation),
// FlashAttention-2 structure.
//
// Semantics (fastbert.reference.flash_attn_fwd / flash_attn_bwd): for the tokens of one sequence b,
//   score[i, j] = q_i . k_j * scale - slope[b, h] * |i - j|     (i, j positions inside sequence b)
//   out_i = sum_j softmax_j(score[i, :]) v_j,   lse[h, t] = logsumexp_j score[i, j]  (natural log, fp32)
// with j restricted to i - win_left <= j <= i + win_right under a window (flash-attn's window_size).
// No token ever attends across sequences; empty sequences produce nothing.
//
// Layout: q, k, v are [T, H, D] with unit stride over D and any token / head strides (views of a fused
// [T, 3, H, D] QKV projection work without a copy). out, dout, dq, dk, dv are contiguous [T, H, D];
// lse and the backward's delta workspace are [H, T] fp32.
//
// Kernels (4 warps per block, each warp owns 16 rows of a 64-row tile), each one template with the
// window as a compile-time switch (kWindow = false is the global kernel, with no window code in it):
//   fwd   grid (query blocks, H, B): Q tile in shared memory, K/V tiles streamed through shared memory,
//         S = Q K^T and O += P V on tensor cores, online softmax in fp32 in the log2 domain (log2(e)
//         folded into the scale and the slopes, exp2 only), the ALiBi bias from the row / column
//         positions in registers, key tails (and window edges) masked to -inf.
//   dq    grid (query blocks, H, B): over key tiles twice: first delta = sum_j P dP / sum_j P for its
//         rows (written to the workspace for the next kernel), then P from lse, dP = dO V^T,
//         dS = P (dP - delta), dQ += dS K.
//   dkdv  grid (key blocks, H, B): over query tiles: S^T = K Q^T, P^T, dP^T = V dO^T, dS^T,
//         dV += P^T dO, dK += dS^T Q. Working transposed keeps P^T / dS^T in the C-fragment layout,
//         which is directly the A-fragment layout of the next mma (no shuffles, no shared memory).
// With a window every loop's bounds come from reach(): tiles wholly outside the window are skipped, so
// the work per row is proportional to the window; tiles cut by its edge are masked element by element.
// dQ is computed by its own pass instead of fp32 atomics from the dK/dV pass. Why: the result is
// deterministic (bitwise reproducible gradients, so a resumed run repeats itself), there is no
// [T, H, D] fp32 accumulator to allocate, zero and convert, and the host emulation needs no atomics.
// The price is recomputing S and dP in the dq pass (9 tile matmuls per tile pair in the backward,
// with the delta loop, instead of 5). delta is formed from P and dP rather than rowsum(dO * O) of the
// output rounded to fp16/bf16: fastbert.reference.flash_attn_bwd explains the measured difference.
//
// Fragments are read from shared memory with ldmatrix.x4 (.trans for the operands whose reduction dim
// runs down the tile's rows); rows are padded by 8 elements (16 bytes) so those loads are free of bank
// conflicts. Global -> shared copies are 16-byte vector loads (element-wise when strides forbid it).
#include "common.cuh"
#include "mma.cuh"

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
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T>
struct MmaTag;
template <>
struct MmaTag<__nv_bfloat16> {
  using type = mma_bf16;
};
template <>
struct MmaTag<__half> {
  using type = mma_f16;
};

// Tile widths per head dim, chosen so every kernel stays under 48 KiB of static shared memory and
// (for D = 64, the BERT case) under the register budget of 4 warps without spills.
template <int D>
struct Cfg {
  static constexpr int kFwdKeys = D <= 64 ? 64 : 32;   // key tile of the forward
  static constexpr int kDqKeys = D <= 64 ? 64 : 16;    // key tile of the dq pass
  static constexpr int kDkvQueries = D <= 64 ? 64 : 16;  // query tile of the dk/dv pass
};

struct Params {
  const void *q, *k, *v;
  int64_t q_st, q_sh, k_st, k_sh, v_st, v_sh;  // token and head strides, in elements
  const void* out;     // fwd: written
  const void* dout;    // bwd
  void *dq, *dk, *dv;  // bwd
  float* lse;          // [H, T]; fwd writes it, bwd reads it
  float* delta;        // [H, T] workspace of the backward
  const int32_t* cu_seqlens;
  const float* slopes;  // [B, H] or nullptr
  int batch, heads;
  int64_t total;
  float scale;  // softmax scale (natural)
  bool vec;     // 16-byte global loads are legal (aligned pointers, strides multiple of 8 elements)
  bool window;  // local attention: picks the kernels' kWindow instance
  int win_left, win_right;  // query i sees keys i - win_left .. i + win_right (kUnbounded for -1)
  int32_t* visits;          // nullptr, or per-block tile counts (tests: the work is bounded by the window)
};

// ---- small helpers. A 32-bit store of two 16-bit elements: the callers guarantee 4-byte alignment (even
// element offsets from aligned bases). The host build goes through memcpy to keep the punning legal.
__device__ __forceinline__ void st32(void* p, uint32_t u) {
#ifdef FB_HOST_EMU
  memcpy(p, &u, 4);
#else
  *reinterpret_cast<uint32_t*>(p) = u;
#endif
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {  // lo in the low half (smaller index)
  T h[2] = {Cvt<T>::from_f(lo), Cvt<T>::from_f(hi)};
  uint32_t u;
  memcpy(&u, h, 4);
  return u;
}

// Copy `rows` x D elements (row r at src + r * stride) into a shared tile with row pitch LD; rows at or
// past `valid` are zero-filled (they are masked later, and zeros keep them finite).
template <typename T, int ROWS, int D, int LD>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t stride, int valid, bool vec) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < ROWS * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    Pack<T, 8> v;
    if (r < valid) {
      const T* s = src + r * stride + col;
      if (vec) {
        v = *reinterpret_cast<const Pack<T, 8>*>(s);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v.v[e] = s[e];
      }
    } else {
      memset(&v, 0, sizeof(v));
    }
    *reinterpret_cast<Pack<T, 8>*>(dst + r * LD + col) = v;
  }
}

// Fragment loads from shared tiles (row pitch LD elements), one ldmatrix.x4 each. Every row address is
// 16-byte aligned (LD * 2 and the column offsets are multiples of 16 bytes) and, with LD = D + 8, the
// eight rows of each 8x8 matrix fall in distinct 16-byte bank groups: conflict-free.
//
// A fragment (16 x 16) of rows r0.., columns c0.. of a row-major tile.
template <int LD, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* s, int r0, int c0, int lane) {
  ldmatrix_x4<false>(a, s + (r0 + (lane & 15)) * LD + c0 + (lane >> 4) * 8);
}
// B fragments of two adjacent n-tiles (n0 and n0 + 8) over k0..k0+15, for B[k][n] = tile[n][k] (the
// tile's rows are B's columns: the "K^T" case). Matrices: (n0, k0), (n0, k0+8), (n0+8, k0), (n0+8, k0+8).
template <int LD, typename T>
__device__ __forceinline__ void load_b_rows(uint32_t (&b0)[2], uint32_t (&b1)[2], const T* s, int n0, int k0,
                                            int lane) {
  uint32_t r[4];
  ldmatrix_x4<false>(r, s + (n0 + (lane & 7) + ((lane >> 4) << 3)) * LD + k0 + ((lane >> 3) & 1) * 8);
  b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
}
// B fragments of two adjacent n-tiles over k0..k0+15, for B[k][n] = tile[k][n] (the tile's rows are B's
// rows: the "V" case), transposed by ldmatrix. Matrices: (k0, n0), (k0+8, n0), (k0, n0+8), (k0+8, n0+8).
template <int LD, typename T>
__device__ __forceinline__ void load_b_cols(uint32_t (&b0)[2], uint32_t (&b1)[2], const T* s, int k0, int n0,
                                            int lane) {
  uint32_t r[4];
  ldmatrix_x4<true>(r, s + (k0 + (lane & 15)) * LD + n0 + (lane >> 4) * 8);
  b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
}
// C fragments of two adjacent n-tiles (16 x 16 of fp32) as one A fragment in T: the FA2 register reuse.
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

__device__ __forceinline__ float quad_sum(float x) {  // over the 4 lanes sharing a fragment row
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}

// ---- warp-level tile products. Accumulators are arrays of C fragments: c[n][4] covers columns n*8..n*8+7
// of this warp's 16 rows. Everything unrolls completely (N, K are compile-time), so these are the same
// instructions as the loops written out in each kernel.
template <int N>
__device__ __forceinline__ void zero_frags(float (&c)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.f;
}

// One 16-deep step of a warp product, c[n] += a (16 x 16) times B's 16 x (N * 8) slice at k0, for the two
// layouts of B in shared memory (row pitch LD):
//   step_bt: B[k][n] = tile[n][k], the tile's rows are B's columns (S = Q K^T, dP = dO V^T, ...)
//   step_b:  B[k][n] = tile[k][n], the tile's rows are B's rows (O += P V, dQ += dS K, ...)
template <typename Tag, int LD, int N, typename T>
__device__ __forceinline__ void step_bt(float (&c)[N][4], const uint32_t (&a)[4], const T* sB, int k0, int lane) {
#pragma unroll
  for (int nt = 0; nt < N; nt += 2) {
    uint32_t b0[2], b1[2];
    load_b_rows<LD>(b0, b1, sB, nt * 8, k0, lane);
    mma_m16n8k16<Tag>(c[nt], a, b0);
    mma_m16n8k16<Tag>(c[nt + 1], a, b1);
  }
}
template <typename Tag, int LD, int N, typename T>
__device__ __forceinline__ void step_b(float (&c)[N][4], const uint32_t (&a)[4], const T* sB, int k0, int lane) {
#pragma unroll
  for (int nd = 0; nd < N; nd += 2) {
    uint32_t b0[2], b1[2];
    load_b_cols<LD>(b0, b1, sB, k0, nd * 8, lane);
    mma_m16n8k16<Tag>(c[nd], a, b0);
    mma_m16n8k16<Tag>(c[nd + 1], a, b1);
  }
}

// c += A B^T, A = rows r0..r0+15 of the row-major tile sA, B^T's rows = the N * 8 rows of the tile sB; the
// reduction runs over the K columns of both tiles (S = Q K^T).
template <typename Tag, int LD, int K, int N, typename T>
__device__ __forceinline__ void mma_abt(float (&c)[N][4], const T* sA, int r0, const T* sB, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    load_a<LD>(a, sA, r0, kk * 16, lane);
    step_bt<Tag, LD>(c, a, sB, kk * 16, lane);
  }
}
// The backward's two such products over tiles of the same shape, in one loop (c1 += A1 B1^T, c2 += A2 B2^T).
template <typename Tag, int LD, int K, int N, typename T>
__device__ __forceinline__ void mma_abt2(float (&c1)[N][4], const T* sA1, const T* sB1, float (&c2)[N][4],
                                         const T* sA2, const T* sB2, int r0, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a1[4], a2[4];
    load_a<LD>(a1, sA1, r0, kk * 16, lane);
    load_a<LD>(a2, sA2, r0, kk * 16, lane);
    step_bt<Tag, LD>(c1, a1, sB1, kk * 16, lane);
    step_bt<Tag, LD>(c2, a2, sB2, kk * 16, lane);
  }
}

// c += P B, P = the C fragments pf[KN][4] (this warp's 16 rows x KN * 8 columns, packed to T on the fly:
// the FA2 register reuse), B = the first KN * 8 rows of the row-major tile sB (O += P V, dQ += dS K).
template <typename Tag, int LD, int KN, int N, typename T>
__device__ __forceinline__ void mma_pb(float (&c)[N][4], const float (&pf)[KN][4], const T* sB, int lane) {
#pragma unroll
  for (int kk = 0; kk < KN / 2; ++kk) {
    uint32_t a[4];
    c_to_a<T>(a, pf[2 * kk], pf[2 * kk + 1]);
    step_b<Tag, LD>(c, a, sB, kk * 16, lane);
  }
}
// Two such products in one loop (dV += P^T dO, dK += dS^T Q).
template <typename Tag, int LD, int KN, int N, typename T>
__device__ __forceinline__ void mma_pb2(float (&c1)[N][4], const float (&p1)[KN][4], const T* sB1, float (&c2)[N][4],
                                        const float (&p2)[KN][4], const T* sB2, int lane) {
#pragma unroll
  for (int kk = 0; kk < KN / 2; ++kk) {
    uint32_t a1[4], a2[4];
    c_to_a<T>(a1, p1[2 * kk], p1[2 * kk + 1]);
    c_to_a<T>(a2, p2[2 * kk], p2[2 * kk + 1]);
    step_b<Tag, LD>(c1, a1, sB1, kk * 16, lane);
    step_b<Tag, LD>(c2, a2, sB2, kk * 16, lane);
  }
}

// Score in the log2 domain for query position i and key position j (same sequence):
// (q . k) * scale * log2(e) - slope * log2(e) * |i - j|.
__device__ __forceinline__ float alibi_score2(float qk, float scale2, float slope2, int i, int j) {
  return qk * scale2 - slope2 * fabsf((float)(i - j));
}

// The ALiBi slope of (sequence b, head h) times log2(e); 0 without ALiBi.
__device__ __forceinline__ float slope_log2(const Params& p, int b, int h) {
  return p.slopes ? p.slopes[b * p.heads + h] * kLog2e : 0.f;
}

// [lo, hi): the positions of the other axis that the rows first..last of a block can see, a row at x
// seeing x - before .. x + after; lo rounded down to a multiple of BLOCK (the tile width). Every tile loop
// takes its bounds from here, so tiles wholly outside the window are never loaded or computed (the work
// per row grows with the window, not the sequence); without a window it is the whole sequence.
template <bool kWindow, int BLOCK>
__device__ __forceinline__ void reach(int first, int last, int len, int before, int after, int& lo, int& hi) {
  lo = kWindow ? max(first - before, 0) / BLOCK * BLOCK : 0;
  hi = kWindow ? min(last + after + 1, len) : len;
}

// Whether query position i sees key position j: j inside the sequence and, with a window,
// i - win_left <= j <= i + win_right. Masks the tiles that the window's edge cuts.
template <bool kWindow>
__device__ __forceinline__ bool visible(const Params& p, int i, int j, int len) {
  return j < len && (!kWindow || (j >= i - p.win_left && j <= i + p.win_right));
}

// lse in log2 units for the backward: +inf for rows past the sequence and for rows whose every score
// was -inf (lse = -inf), so that their P is exactly 0 instead of nan.
__device__ __forceinline__ float lse_log2(const Params& p, int h, int64_t tok, bool valid) {
  const float x = valid ? p.lse[h * p.total + tok] * kLog2e : INFINITY;
  return x == -INFINITY ? INFINITY : x;
}

// Test instrumentation: with p.visits set, each block records how many tiles its loops ran
// (index [h][b][blockIdx.x]); one store per block, nothing when p.visits is null.
__device__ __forceinline__ void record_visits(const Params& p, int tiles) {
  if (p.visits != nullptr && threadIdx.x == 0)
    p.visits[((int64_t)blockIdx.y * p.batch + blockIdx.z) * gridDim.x + blockIdx.x] = tiles;
}

// Row `r` (0: g, 1: g + 8) of this lane's C fragments c[N][4], times mul, to the D = N * 8 contiguous
// elements at row (32-bit stores of column pairs 2t, 2t + 1 of every n-tile).
template <typename T, int N>
__device__ __forceinline__ void store_frag_row(T* row, const float (&c)[N][4], int r, int t, float mul) {
#pragma unroll
  for (int nd = 0; nd < N; ++nd) st32(row + nd * 8 + 2 * t, pack2<T>(c[nd][2 * r] * mul, c[nd][2 * r + 1] * mul));
}

// ================================================================================================
// forward
// ================================================================================================
template <typename T, int D, bool kWindow>
__global__ void __launch_bounds__(kThreads) flash_attn_fwd_kernel(const Params p) {
  using Tag = typename MmaTag<T>::type;
  constexpr int BN = Cfg<D>::kFwdKeys, LD = D + 8;
  constexpr int NT = BN / 8, ND = D / 8;
  const int b = blockIdx.z, h = blockIdx.y, m0 = blockIdx.x * kRows;
  const int start = p.cu_seqlens[b], len = p.cu_seqlens[b + 1] - start;
  if (m0 >= len) return;  // whole block: grid.x covers the longest sequence
  FB_SHARED(T, sQ, kRows * LD);
  FB_SHARED(T, sK, BN * LD);
  FB_SHARED(T, sV, BN * LD);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const float scale2 = p.scale * kLog2e;
  const float slope2 = slope_log2(p, b, h);
  const T* k = static_cast<const T*>(p.k) + start * p.k_st + h * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + start * p.v_st + h * p.v_sh;
  load_tile<T, kRows, D, LD>(sQ, static_cast<const T*>(p.q) + (start + m0) * p.q_st + h * p.q_sh,
                             p.q_st, len - m0, p.vec);

  const int r0 = warp * 16;                  // this warp's first row in the tile
  const int pos0 = m0 + r0 + g;  // positions of this lane's two rows: pos0 and pos0 + 8
  float o[ND][4];
  zero_frags(o);
  float m[2] = {-INFINITY, -INFINITY};  // running max (log2 domain)
  float l[2] = {0.f, 0.f};              // running sum of this lane's columns (quad-reduced at the end)

  int lo, hi, tiles = 0;
  reach<kWindow, BN>(m0, min(m0 + kRows, len) - 1, len, p.win_left, p.win_right, lo, hi);
  for (int n0 = lo; n0 < hi; n0 += BN, ++tiles) {
    __syncthreads();  // the previous tile's readers are done with sK / sV
    load_tile<T, BN, D, LD>(sK, k + n0 * p.k_st, p.k_st, len - n0, p.vec);
    load_tile<T, BN, D, LD>(sV, v + n0 * p.v_st, p.v_st, len - n0, p.vec);
    __syncthreads();

    float s[NT][4];  // S = Q K^T
    zero_frags(s);
    mma_abt<Tag, LD, D>(s, sQ, r0, sK, lane);
    // scale, ALiBi bias, key and window mask; new row maxima
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = pos0 + 8 * (e >> 1), j = n0 + nt * 8 + 2 * t + (e & 1);
        const float x = alibi_score2(s[nt][e], scale2, slope2, i, j);
        s[nt][e] = visible<kWindow>(p, i, j, len) ? x : -INFINITY;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
      }
    }
    // A row can meet a tile with no finite score (cut off by the window's edge, or an ALiBi bias that
    // overflowed to -inf): its max stays -inf and exp2(-inf - -inf) would be nan, so it subtracts 0.
    float alpha[2], base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = quad_max(mx[r]);
      base[r] = mx[r] == -INFINITY ? 0.f : mx[r];
      alpha[r] = exp2f(m[r] - base[r]);
      m[r] = mx[r];
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - base[e >> 1]);
        l[e >> 1] += s[nt][e];
      }
    }
#pragma unroll
    for (int nd = 0; nd < ND; ++nd) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[nd][e] *= alpha[e >> 1];
    }
    mma_pb<Tag, LD>(o, s, sV, lane);  // O += P V, P taken straight from the score registers
  }

  T* out = static_cast<T*>(const_cast<void*>(p.out));
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float lsum = quad_sum(l[r]);  // warp collective: before the early continue
    const int i = pos0 + 8 * r;
    if (i >= len) continue;
    const float inv = lsum > 0.f ? 1.f / lsum : 0.f;  // 0 only when every score was -inf: out 0, lse -inf
    const int64_t tok = start + i;
    store_frag_row<T>(out + (tok * p.heads + h) * D, o, r, t, inv);
    if (t == 0) p.lse[h * p.total + tok] = (m[r] + log2f(lsum)) * kLn2;
  }
  record_visits(p, tiles);
}

// ================================================================================================
// backward, pass 1: delta and dQ (one block per 64 query rows)
// ================================================================================================
template <typename T, int D, bool kWindow>
__global__ void __launch_bounds__(kThreads) flash_attn_bwd_dq_kernel(const Params p) {
  using Tag = typename MmaTag<T>::type;
  constexpr int BN = Cfg<D>::kDqKeys, LD = D + 8;
  constexpr int NT = BN / 8, ND = D / 8;
  const int b = blockIdx.z, h = blockIdx.y, m0 = blockIdx.x * kRows;
  const int start = p.cu_seqlens[b], len = p.cu_seqlens[b + 1] - start;
  if (m0 >= len) return;
  FB_SHARED(T, sQ, kRows * LD);
  FB_SHARED(T, sdO, kRows * LD);
  FB_SHARED(T, sK, BN * LD);
  FB_SHARED(T, sV, BN * LD);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const float scale2 = p.scale * kLog2e;
  const float slope2 = slope_log2(p, b, h);
  const int64_t rs = (int64_t)p.heads * D;  // token stride of the contiguous tensors
  const T* k = static_cast<const T*>(p.k) + start * p.k_st + h * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + start * p.v_st + h * p.v_sh;
  load_tile<T, kRows, D, LD>(sQ, static_cast<const T*>(p.q) + (start + m0) * p.q_st + h * p.q_sh,
                             p.q_st, len - m0, p.vec);
  load_tile<T, kRows, D, LD>(sdO, static_cast<const T*>(p.dout) + (start + m0) * rs + h * D, rs, len - m0, p.vec);

  const int r0 = warp * 16;
  const int pos0 = m0 + r0 + g;  // this lane's rows: pos0 and pos0 + 8
  const float lse2[2] = {lse_log2(p, h, start + pos0, pos0 < len), lse_log2(p, h, start + pos0 + 8, pos0 + 8 < len)};
  int lo, hi, tiles = 0;
  reach<kWindow, BN>(m0, min(m0 + kRows, len) - 1, len, p.win_left, p.win_right, lo, hi);

  // One key tile (rows n0..): K and V to shared memory, then this warp's P = exp2(S - lse2) (0 where the
  // key is not visible) into pf and dP = dO V^T into dpf.
  auto tile = [&](int n0, float (&pf)[NT][4], float (&dpf)[NT][4]) {
    __syncthreads();  // the previous tile's readers are done with sK / sV
    load_tile<T, BN, D, LD>(sK, k + n0 * p.k_st, p.k_st, len - n0, p.vec);
    load_tile<T, BN, D, LD>(sV, v + n0 * p.v_st, p.v_st, len - n0, p.vec);
    __syncthreads();
    zero_frags(pf);
    zero_frags(dpf);
    mma_abt2<Tag, LD, D>(pf, sQ, sK, dpf, sdO, sV, r0, lane);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = pos0 + 8 * (e >> 1), j = n0 + nt * 8 + 2 * t + (e & 1);
        const float x = alibi_score2(pf[nt][e], scale2, slope2, i, j) - lse2[e >> 1];
        pf[nt][e] = visible<kWindow>(p, i, j, len) ? exp2f(x) : 0.f;
      }
    }
  };

  // Loop 1: delta_i = sum_j P_ij dP_ij / sum_j P_ij, from the same P and dP that form dS below, not
  // rowsum(dO * O) from the output rounded to T (see fastbert.reference.flash_attn_bwd for why).
  float pdp[2] = {0.f, 0.f}, psum[2] = {0.f, 0.f};
  for (int n0 = lo; n0 < hi; n0 += BN, ++tiles) {
    float pf[NT][4], dpf[NT][4];
    tile(n0, pf, dpf);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        pdp[e >> 1] += pf[nt][e] * dpf[nt][e];
        psum[e >> 1] += pf[nt][e];
      }
    }
  }
  float delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float ps = quad_sum(psum[r]), pd = quad_sum(pdp[r]);
    delta[r] = ps > 0.f ? pd / ps : 0.f;  // rows past the end (or all -inf) have no P: delta 0
    const int i = pos0 + 8 * r;
    if (i < len && t == 0) p.delta[h * p.total + start + i] = delta[r];  // for the dK/dV kernel
  }

  // Loop 2: dQ += dS K with dS = P (dP - delta)
  float dq[ND][4];
  zero_frags(dq);
  for (int n0 = lo; n0 < hi; n0 += BN, ++tiles) {
    float pf[NT][4], dpf[NT][4];
    tile(n0, pf, dpf);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) pf[nt][e] *= dpf[nt][e] - delta[e >> 1];
    }
    mma_pb<Tag, LD>(dq, pf, sK, lane);
  }

  T* dqp = static_cast<T*>(p.dq);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = pos0 + 8 * r;
    if (i >= len) continue;
    store_frag_row<T>(dqp + ((start + i) * p.heads + h) * D, dq, r, t, p.scale);
  }
  record_visits(p, tiles);
}

// ================================================================================================
// backward, pass 2: dK and dV (one block per 64 key rows; reads delta written by pass 1)
// ================================================================================================
template <typename T, int D, bool kWindow>
__global__ void __launch_bounds__(kThreads) flash_attn_bwd_dkdv_kernel(const Params p) {
  using Tag = typename MmaTag<T>::type;
  constexpr int BM = Cfg<D>::kDkvQueries, LD = D + 8;
  constexpr int NT = BM / 8, ND = D / 8;
  const int b = blockIdx.z, h = blockIdx.y, n0 = blockIdx.x * kRows;
  const int start = p.cu_seqlens[b], len = p.cu_seqlens[b + 1] - start;
  if (n0 >= len) return;
  FB_SHARED(T, sK, kRows * LD);
  FB_SHARED(T, sV, kRows * LD);
  FB_SHARED(T, sQ, BM * LD);
  FB_SHARED(T, sdO, BM * LD);
  FB_SHARED(float, sLse2, BM);
  FB_SHARED(float, sDelta, BM);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const float scale2 = p.scale * kLog2e;
  const float slope2 = slope_log2(p, b, h);
  const int64_t rs = (int64_t)p.heads * D;
  load_tile<T, kRows, D, LD>(sK, static_cast<const T*>(p.k) + (start + n0) * p.k_st + h * p.k_sh,
                             p.k_st, len - n0, p.vec);
  load_tile<T, kRows, D, LD>(sV, static_cast<const T*>(p.v) + (start + n0) * p.v_st + h * p.v_sh,
                             p.v_st, len - n0, p.vec);
  const T* q = static_cast<const T*>(p.q) + start * p.q_st + h * p.q_sh;
  const T* dout = static_cast<const T*>(p.dout) + start * rs + h * D;

  const int r0 = warp * 16;
  const int pos0 = n0 + r0 + g;  // key positions of this lane's two rows: pos0 and pos0 + 8
  float dk[ND][4], dv[ND][4];
  zero_frags(dk);
  zero_frags(dv);

  // key j is seen by the queries i with i - win_left <= j <= i + win_right: j - win_right .. j + win_left
  int lo, hi, tiles = 0;
  reach<kWindow, BM>(n0, min(n0 + kRows, len) - 1, len, p.win_right, p.win_left, lo, hi);
  for (int m0 = lo; m0 < hi; m0 += BM, ++tiles) {
    __syncthreads();
    load_tile<T, BM, D, LD>(sQ, q + m0 * p.q_st, p.q_st, len - m0, p.vec);
    load_tile<T, BM, D, LD>(sdO, dout + m0 * rs, rs, len - m0, p.vec);
    for (int i = threadIdx.x; i < BM; i += kThreads) {
      const bool ok = m0 + i < len;  // query rows past the end: P = exp2(-inf) = 0
      sLse2[i] = lse_log2(p, h, start + m0 + i, ok);
      sDelta[i] = ok ? p.delta[h * p.total + start + m0 + i] : 0.f;
    }
    __syncthreads();

    // S^T = K Q^T and dP^T = V dO^T: rows = this warp's keys, columns = the tile's queries
    float st[NT][4], dpt[NT][4];
    zero_frags(st);
    zero_frags(dpt);
    mma_abt2<Tag, LD, D>(st, sK, sQ, dpt, sV, sdO, r0, lane);
    // P^T and dS^T = P^T (dP^T - delta); key rows past the end are zeroed (never stored anyway)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = nt * 8 + 2 * t + (e & 1), j = pos0 + 8 * (e >> 1);
        const float x = alibi_score2(st[nt][e], scale2, slope2, m0 + c, j) - sLse2[c];
        const float pv = visible<kWindow>(p, m0 + c, j, len) ? exp2f(x) : 0.f;
        st[nt][e] = pv;
        dpt[nt][e] = pv * (dpt[nt][e] - sDelta[c]);
      }
    }
    mma_pb2<Tag, LD>(dv, st, sdO, dk, dpt, sQ, lane);  // dV += P^T dO, dK += dS^T Q
  }

  T* dkp = static_cast<T*>(p.dk);
  T* dvp = static_cast<T*>(p.dv);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = pos0 + 8 * r;
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
                         int win_right) {
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
    const dim3 grid(ceil_div(max_seqlen, kRows), p.heads, p.batch);
    // dq first: it also writes delta, which dkdv reads (same stream, so ordered)
    auto dq_kern = flash_attn_bwd_dq_kernel<T, D, W>;
    FB_LAUNCH(dq_kern, grid, dim3(kThreads), 0, stream, p);
    check_launch("flash_attn_bwd_dq_kernel");
    Params p2 = p;  // visit counts of the second kernel go after the first's
    if (p.visits) p2.visits = p.visits + (int64_t)grid.x * grid.y * grid.z;
    auto dkdv_kern = flash_attn_bwd_dkdv_kernel<T, D, W>;
    FB_LAUNCH(dkdv_kern, grid, dim3(kThreads), 0, stream, p2);
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
  attn::check_common(dtype, head_dim, batch, heads, max_seqlen, window_left, window_right);
  if (batch == 0 || max_seqlen == 0 || total_tokens == 0) return;
  attn::Params p = attn::make_params(q, k, v, q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h,
                                     nullptr, cu_seqlens, alibi_slopes, batch, heads, total_tokens, softmax_scale,
                                     window_left, window_right, visits);
  p.out = out, p.lse = lse;
  attn::dispatch<attn::Fwd>(dtype, head_dim, p, max_seqlen, stream);
}

// Backward. dout, dq, dk, dv: contiguous [T, H, D]; q, k, v strided as in the forward; lse: [H, T] fp32
// from the forward; delta: an [H, T] fp32 workspace (written here: sum_j P dP / sum_j P per row). The
// forward's output is not read (delta comes from P and dP). visits: nullptr, or an int32 buffer of
// 2 * heads * batch * blocks zeros (dq kernel's counts, then dkdv's).
void launch_flash_attn_bwd(int dtype, const void* dout, const void* q, const void* k, const void* v,
                           int64_t q_stride_t, int64_t q_stride_h, int64_t k_stride_t, int64_t k_stride_h,
                           int64_t v_stride_t, int64_t v_stride_h, const float* lse, void* dq, void* dk, void* dv,
                           float* delta, const int32_t* cu_seqlens, const float* alibi_slopes, int batch,
                           int heads, int head_dim, int64_t total_tokens, int max_seqlen, float softmax_scale,
                           int window_left, int window_right, int32_t* visits, cudaStream_t stream) {
  attn::check_common(dtype, head_dim, batch, heads, max_seqlen, window_left, window_right);
  if (batch == 0 || max_seqlen == 0 || total_tokens == 0) return;
  attn::Params p = attn::make_params(q, k, v, q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h,
                                     dout, cu_seqlens, alibi_slopes, batch, heads, total_tokens, softmax_scale,
                                     window_left, window_right, visits);
  p.dout = dout, p.dq = dq, p.dk = dk, p.dv = dv;
  p.lse = const_cast<float*>(lse), p.delta = delta;
  attn::dispatch<attn::Bwd>(dtype, head_dim, p, max_seqlen, stream);
}

}  // namespace fb
