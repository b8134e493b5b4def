// flash_attn_tiles.cuh: the tile-level pieces of csrc/flash_attn.cu (one kernel family, split for size):
// parameters, asynchronous tile loads, tensor-core fragment loads and warp products, and the score
// transform of one warp's tile (ALiBi form, edge mask, exp2). Same source for nvcc and the host emulation.
//
// Scores in "q.k units". The kernels never form score = q.k * scale - slope * |i - j| per element. They
// keep y with score = (y + rt) * scale, where rt is a per-row term, and c = -slope / scale (clamped to a
// finite float) carries the bias:
//   kPlain  (no ALiBi, every element visible)          y = q.k                              rt = 0
//   kRight  (every column at or after every row)        y = q.k + c * k                      rt = c * (col - i)
//   kLeft   (every column at or before every row)       y = q.k + c * (N - 7 - k)            rt = c * (i - col - N + 7)
//   kDiag   (the diagonal crosses the warp's tile)      y = q.k + c * |(i - col) - k|        rt = 0
//   kEdge   (some element invisible: key tail, window)  kDiag, then y = -inf where masked    rt = 0
// with col = this lane's first column (tile start + 2t), k = nt * 8 + (e & 1) its compile-time offset and
// N the tile width. The linear forms cost one FMA per element with k an immediate (no int -> float
// conversion of i - j, no abs), and rt folds into the one FMA that feeds exp2:
//   p = exp2(y * scale2 + (rt * scale2 - base))     (scale2 = scale * log2(e); base: row max or lse, log2)
// Both parts of |i - j| are >= 0 in every form, so a slope large enough to overflow the bias gives -inf,
// never inf - inf. The row max is taken over y (scale > 0: the order is the same) plus rt. The forms need
// softmax_scale > 0 (fastbert._cuda_common.attn_unsupported sends other scales to another backend).
// Masks run only on kEdge tiles; a tile's form is uniform over its warp (a branch per tile, not per element).
//
// exp2 is ex2.approx.ftz.f32 (one MUFU.EX2; exp2f adds a range fix-up for subnormal results: 4
// instructions). The two differ only where the result is below 2^-126 (flushed to 0), against a row sum
// that is at least 1, and in the approximation itself (max 2 ulp, the same hardware unit exp2f uses).
// The host build computes exp2f and flushes the same way; the approximation error is what only a GPU shows.
#pragma once

#include <cfloat>
#include <climits>
#include <cstring>
#include <type_traits>

#include "common.cuh"
#include "cp_async.cuh"
#include "mma.cuh"

namespace fb {
namespace attn {

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

struct Params {
  const void *q, *k, *v;
  int64_t q_st, q_sh, k_st, k_sh, v_st, v_sh;  // token and head strides, in elements
  const void* out;     // fwd: written
  const void* dout;    // bwd
  void *dq, *dk, *dv;  // bwd
  float* lse;          // [H, T]; fwd writes it, bwd reads it
  float* delta;        // [H, T] workspace of the two-pass backward
  const int32_t* cu_seqlens;
  const float* slopes;  // [B, H] or nullptr
  int batch, heads;
  int64_t total;
  float scale;  // softmax scale (natural), > 0
  bool vec;     // 16-byte copies are legal (aligned pointers, strides multiple of 8 elements)
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

__device__ __forceinline__ float exp2_ftz(float x) {
#ifdef FB_HOST_EMU
  const float r = exp2f(x);
  return r < FLT_MIN ? 0.f : r;  // the flush to zero of the hardware instruction (nan stays nan)
#else
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#endif
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

// ---- global -> shared copies ----------------------------------------------------------------------
// Strides that forbid 16-byte copies (an odd fused layout): element by element, synchronously. Kept out of
// line: it is the cold path, and the pipelined loops stay small.
template <typename T, int ROWS, int D, int LD, int NTHR>
__device__ __noinline__ void copy_rows_scalar(T* dst, const T* src, int64_t stride, int valid) {
  for (int c = threadIdx.x; c < ROWS * D; c += NTHR) {
    const int r = c / D, col = c % D;
    dst[r * LD + col] = r < valid ? src[r * stride + col] : Cvt<T>::from_f(0.f);
  }
}

// Start copying rows 0..ROWS-1 of a [*, D] tile (row r at src + r * stride) into shared memory with row
// pitch LD (cp.async, 16 bytes per copy; the caller commits and waits). Rows at or past `valid` are
// zero-filled by the copy itself (0 source bytes: nothing is read, the source address is the tile's first
// row, which exists). Without `vec` the rows are copied synchronously instead.
template <typename T, int ROWS, int D, int LD, int NTHR>
__device__ __forceinline__ void load_tile_async(T* dst, const T* src, int64_t stride, int valid, bool vec) {
  if (!vec) {
    copy_rows_scalar<T, ROWS, D, LD, NTHR>(dst, src, stride, valid);
    return;
  }
  constexpr int kChunks = D / 8;                 // 16-byte chunks per row
  constexpr int kRowStep = NTHR / kChunks;        // rows covered by one pass of the block
  static_assert(NTHR % kChunks == 0 && ROWS % kRowStep == 0, "whole rows per pass, whole passes per tile");
  const int r0 = threadIdx.x / kChunks, col = (threadIdx.x % kChunks) * 8;
  const T* s = src + r0 * stride + col;
#pragma unroll
  for (int i = 0; i < ROWS / kRowStep; ++i) {
    const int r = r0 + i * kRowStep;
    const bool in = r < valid;
    cp_async_16(dst + r * LD + col, in ? s + i * kRowStep * stride : src, in ? 16 : 0);
  }
}

// ---- fragments ----------------------------------------------------------------------------------
// Fragment loads from shared tiles (row pitch LD elements), one ldmatrix.x4 each. Every row address is
// 16-byte aligned (LD * 2 and the column offsets are multiples of 16 bytes) and, with LD = width + 8, the
// eight rows of each 8x8 matrix fall in distinct 16-byte bank groups: conflict-free.
//
// A fragment (16 x 16) of rows r0.., columns c0.. of a row-major tile.
template <int LD, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* s, int r0, int c0, int lane) {
  ldmatrix_x4<false>(a, s + (r0 + (lane & 15)) * LD + c0 + (lane >> 4) * 8);
}
// A fragment (16 x 16) of the transpose of a row-major tile: A[r][k] = tile[k0 + k][r0 + r] (dV = P^T dO
// with P stored row-major). Matrices: tile rows k0.., columns r0 / r0 + 8, then rows k0 + 8...
template <int LD, typename T>
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], const T* s, int r0, int k0, int lane) {
  ldmatrix_x4<true>(a, s + (k0 + (lane & 7) + ((lane >> 4) << 3)) * LD + r0 + ((lane >> 3) & 1) * 8);
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

// ---- warp-level tile products. Accumulators are arrays of C fragments: c[n][4] covers columns n*8..n*8+7
// of this warp's 16 rows. Everything unrolls completely (N, K are compile-time).
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

// ---- positions, windows, lse ------------------------------------------------------------------------
// [lo, hi): the positions of the other axis that the rows first..last of a block can see, a row at x
// seeing x - before .. x + after; lo rounded down to a multiple of BLOCK (the tile width). Every tile loop
// takes its bounds from here, so tiles wholly outside the window are never loaded or computed (the work
// per row grows with the window, not the sequence); without a window it is the whole sequence.
template <bool kWindow, int BLOCK>
__device__ __forceinline__ void reach(int first, int last, int len, int before, int after, int& lo, int& hi) {
  lo = kWindow ? max(first - before, 0) / BLOCK * BLOCK : 0;
  hi = kWindow ? min(last + after + 1, len) : len;
}

// c = -slope / scale for (sequence b, head h), 0 without ALiBi, clamped to a finite float so that c * 0 is
// never nan (a slope of 1e38 still makes every other score -inf).
__device__ __forceinline__ float alibi_c(const Params& p, int b, int h) {
  return p.slopes ? fmaxf(-p.slopes[b * p.heads + h] / p.scale, -FLT_MAX) : 0.f;
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

// ---- the score transform of one warp's tile (see the top of this file) -----------------------------------
enum Form : int { kPlain, kRight, kLeft, kDiag, kEdge };
template <int F>
using FormT = std::integral_constant<int, F>;

// One warp's tile: its rows are positions row..row+15 (this lane: row + g, row + g + 8), its columns
// col0..col0+NCOLS-1 (this lane: col0 + 2t + nt * 8 + (e & 1)). Orientation: kKeysInColumns (rows are
// queries: fwd, dq, the short backward) or keys in the rows (dkdv). A query i sees key j when j < len and,
// with a window, i - win_left <= j <= i + win_right: in row terms, a column is visible from row x when it is
// within x - before .. x + after, with (before, after) = (left, right), or (right, left) for keys in rows.
struct WarpTile {
  int row, col0, len, before, after;
};

// The form of a warp tile (uniform over the warp, so the branch on it costs nothing per element).
template <bool kWindow, bool kKeysInColumns, int NCOLS>
__device__ __forceinline__ int tile_form(const WarpTile& w, bool alibi) {
  const int first = w.row, last = w.row + 15, end = w.col0 + NCOLS - 1;
  const bool tail = kKeysInColumns ? end >= w.len : last >= w.len;
  if (tail || (kWindow && (w.col0 < last - w.before || end > first + w.after))) return kEdge;
  if (!alibi) return kPlain;
  if (w.col0 >= last) return kRight;
  if (end <= first) return kLeft;
  return kDiag;
}

// s: the raw q.k of the tile -> y, and rt (per row), as in the table at the top; kEdge also masks to -inf.
template <bool kWindow, bool kKeysInColumns, int F, int NT>
__device__ __forceinline__ void tile_scores(float (&s)[NT][4], float (&rt)[2], FormT<F>, const WarpTile& w, float c,
                                            int g, int t) {
  const int col = w.col0 + 2 * t;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = w.row + g + 8 * r;
    if (F == kRight) rt[r] = c * (float)(col - i);
    else if (F == kLeft) rt[r] = c * (float)(i - col - NT * 8 + 7);
    else rt[r] = 0.f;
    const float di = (float)(i - col);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 2 * r; e < 2 * r + 2; ++e) {
        const int k = nt * 8 + (e & 1);
        if (F == kRight && k != 0) s[nt][e] = fmaf((float)k, c, s[nt][e]);  // c is finite: c * 0 adds 0
        else if (F == kLeft) s[nt][e] = fmaf((float)(NT * 8 - 7 - k), c, s[nt][e]);
        else if (F == kDiag || F == kEdge) s[nt][e] = fmaf(fabsf(di - (float)k), c, s[nt][e]);
      }
    }
    if (F == kEdge) {
      // visible columns of row i: lo..hi (offsets from col)
      int lo = kWindow ? i - w.before - col : INT_MIN / 2, hi = kWindow ? i + w.after - col : INT_MAX / 2;
      if (kKeysInColumns) hi = min(hi, w.len - 1 - col);
      else if (i >= w.len) hi = -1, lo = 0;  // a key row past the end: nothing (never stored anyway)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          const int k = nt * 8 + (e & 1);
          if (k < lo || k > hi) s[nt][e] = -INFINITY;
        }
      }
    }
  }
}

// f(FormT<form>{}) for a form known at run time: one copy of f's code per form.
template <typename F>
__device__ __forceinline__ void with_form(int form, F&& f) {
  switch (form) {
    case kPlain: f(FormT<kPlain>{}); break;
    case kRight: f(FormT<kRight>{}); break;
    case kLeft: f(FormT<kLeft>{}); break;
    case kDiag: f(FormT<kDiag>{}); break;
    default: f(FormT<kEdge>{}); break;
  }
}

}  // namespace attn
}  // namespace fb
