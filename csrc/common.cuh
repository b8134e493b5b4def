// common.cuh: what every fastbert kernel file shares, with one definition for nvcc and one for the
// host emulation (cuda_host_emu.h, selected by FB_HOST_EMU), so the same kernel source builds both ways.
//   * dtype traits: load/store between T (float, __half, __nv_bfloat16) and fp32
//   * Pack<T, VEC>: an aligned vector of VEC elements, so a load of 16 bytes is one 128-bit access
//   * warp / block reductions
//   * FB_SHARED / FB_DYNAMIC_SHARED: shared-memory declarations (per-block arena in the emulation)
//   * FB_LAUNCH / fb_check_launch: kernel launch and error check
// No torch header here or in any kernel file: kernels take raw pointers, sizes and a stream.
#pragma once

#ifdef FB_HOST_EMU
#include "cuda_host_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "dtypes.h"
#include <stdexcept>
#include <string>

// Shared memory and launches (defined before the templates below that launch kernels).
#ifdef FB_HOST_EMU
#define FB_SHARED(T, name, count) T* name = ::emu::shared_array<T>(count, #name)
#define FB_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::emu::dynamic_shared(sizeof(T), #name))
#define FB_LAUNCH(kernel, grid, block, smem, stream, ...) ::emu::launch(kernel, grid, block, smem, __VA_ARGS__)
#else
#define FB_SHARED(T, name, count)         \
  __shared__ __align__(16) T name##_smem_[count]; \
  T* name = name##_smem_
#define FB_DYNAMIC_SHARED(T, name)                            \
  extern __shared__ __align__(16) unsigned char fb_dyn_smem_[]; \
  T* name = reinterpret_cast<T*>(fb_dyn_smem_)
#define FB_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

namespace fb {

// ---- dtypes (codes: dtypes.h) -------------------------------------------------------------------

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to_f(float x) { return x; }
  static __device__ __forceinline__ float from_f(float x) { return x; }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_f(float x) { return __float2half_rn(x); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
};

// VEC elements of T in one aligned access (16 bytes for VEC = 16 / sizeof(T)).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_f(const T* __restrict__ p, float (&out)[VEC]) {
  Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = Cvt<T>::to_f(pk.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_f(T* __restrict__ p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pk.v[i] = Cvt<T>::from_f(in[i]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// VEC fp32 values at p (16-byte aligned when VEC % 4 == 0): float4 accesses, else scalar. For fp32
// parameter vectors read alongside VEC-wide rows of a narrower T (VEC = 8 for bf16: two float4).
template <int VEC>
__device__ __forceinline__ void load_f32(const float* __restrict__ p, float (&out)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      const Pack<float, 4> pk = *reinterpret_cast<const Pack<float, 4>*>(p + j);
#pragma unroll
      for (int i = 0; i < 4; ++i) out[j + i] = pk.v[i];
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = p[i];
  }
}
template <int VEC>
__device__ __forceinline__ void store_f32(float* p, const float (&in)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      Pack<float, 4> pk;
#pragma unroll
      for (int i = 0; i < 4; ++i) pk.v[i] = in[j + i];
      *reinterpret_cast<Pack<float, 4>*>(p + j) = pk;
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] = in[i];
  }
}

// Elements per 16-byte vector, or 1 when the pointers or the row length do not allow it.
template <typename T>
inline int vec_width(int64_t row_len, std::initializer_list<const void*> ptrs) {
  int vec = 16 / (int)sizeof(T);
  if (row_len % vec != 0) return 1;
  for (const void* p : ptrs)
    if (p && (reinterpret_cast<uintptr_t>(p) % 16) != 0) return 1;
  return vec;
}

// ---- launch -------------------------------------------------------------------------------------
// Throws std::runtime_error naming `what` when the last launch failed; in FASTBERT_CUDA_DEBUG builds it
// also synchronises so that faults inside the kernel are reported at their launch. Defined in common.cu.
void check_launch(const char* what);

inline int ceil_div(int64_t a, int64_t b) { return (int)((a + b - 1) / b); }

// ---- reductions ---------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ---- GELU ---------------------------------------------------------------------------------------
// erf GELU (exact) or the tanh approximation, and the derivative; fp32 in, fp32 out. No fast-math
// approximations here: the tolerance rule compares against PyTorch's own rounding error.
__device__ __forceinline__ void gelu_and_grad(float x, bool tanh_approx, float& y, float& dy) {
  if (tanh_approx) {
    const float k = 0.7978845608028654f;  // sqrt(2/pi)
    const float c = 0.044715f;
    float inner = k * (x + c * x * x * x);
    float t = tanhf(inner);
    y = 0.5f * x * (1.0f + t);
    dy = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * k * (1.0f + 3.0f * c * x * x);
  } else {
    float cdf = 0.5f * (1.0f + erff(x * 0.7071067811865476f));
    float pdf = expf(-0.5f * x * x) * 0.3989422804014327f;  // 1/sqrt(2 pi)
    y = x * cdf;
    dy = cdf + x * pdf;
  }
}
__device__ __forceinline__ float gelu(float x, bool tanh_approx) {
  if (tanh_approx) {
    const float k = 0.7978845608028654f;
    float inner = k * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.0f + tanhf(inner));
  }
  return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
}

// ---- column partial sums (dbias, dweight) --------------------------------------------------------
// out[n] = sum_g partial[g * N + n] over G partial rows, in a fixed order (deterministic), fp32.
// Defined in common.cu.
void launch_reduce_partials(const float* partial, float* out, int G, int N, cudaStream_t stream);

// Partial rows for the column sums of a pointwise backward over M rows (bias_gelu, geglu): each of
// the G row-blocks writes one fp32 row of partial sums; a second kernel adds them in a fixed order.
// Defined in common.cu.
int pointwise_partials(int64_t M);

// ---- pointwise kernels over [M, N] row-major (bias_gelu.cu, geglu.cu) ------------------------------
// Block (32, 8): threadIdx.x walks VEC-wide column vectors, threadIdx.y rows; gridDim.y row chunks of
// rows_per_chunk rows each (the chunks are the partial rows of the column sums).
constexpr int kPwRows = 8;  // blockDim.y

// The rows [r0, r1) of this block's chunk.
__device__ __forceinline__ void chunk_rows(int M, int rows_per_chunk, int64_t& r0, int64_t& r1) {
  r0 = (int64_t)blockIdx.y * rows_per_chunk;
  r1 = r0 + rows_per_chunk < M ? r0 + rows_per_chunk : M;
}

// VEC bias values from bias[off..] (fp32), zeros when there is no bias or the thread is past the end.
template <int VEC>
__device__ __forceinline__ void load_bias(const float* __restrict__ bias, int64_t off, bool active,
                                          float (&out)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = (active && bias != nullptr) ? bias[off + i] : 0.f;
}

// Column sums of the block's kPwRows row-threads, in a fixed order (deterministic): every thread stashes
// its VEC running sums in comb (kPwRows * 32 * VEC floats of shared memory), then, after a __syncthreads()
// by the caller, threads with threadIdx.y == 0 add the rows up in order r = 0, 1, ...
// comb holds 16-byte pieces (4 sums, fewer when VEC < 4) in planes: piece q of row-thread y, lane x at
// ((q * kPwRows + y) * 32 + x) * piece. Lanes of a warp then touch consecutive 16-byte words, so each
// 8-lane phase of a 16-byte access covers all 32 banks once; one 32-byte vector per lane (VEC 8: bf16/fp16)
// would put lanes 4-7 of a phase on the banks of lanes 0-3 (2-way conflict).
template <int VEC>
__device__ __forceinline__ int comb_index(int y, int i) {
  constexpr int kPiece = VEC < 4 ? VEC : 4;
  return (((i / kPiece) * kPwRows + y) * 32 + (int)threadIdx.x) * kPiece + i % kPiece;
}
template <int VEC>
__device__ __forceinline__ void stash_column_sums(float* comb, const float (&acc)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) comb[comb_index<VEC>(threadIdx.y, i)] = acc[i];
}
template <int VEC>
__device__ __forceinline__ void sum_column_sums(const float* comb, float* __restrict__ out) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    float s = 0.f;
    for (int r = 0; r < kPwRows; ++r) s += comb[comb_index<VEC>(r, i)];
    out[i] = s;
  }
}

// Host side of the pointwise launches: the chunking, the grid, and the one vector-width switch.
struct PointwiseLaunch {
  int G, rows_per_chunk, vec;
  dim3 block, grid;
};
template <typename T>
inline PointwiseLaunch pointwise_launch(int M, int N, std::initializer_list<const void*> ptrs) {
  PointwiseLaunch l;
  l.G = pointwise_partials(M);
  l.rows_per_chunk = ceil_div(M, l.G);
  l.vec = vec_width<T>(N, ptrs);
  l.block = dim3(32, kPwRows);
  l.grid = dim3(ceil_div(N, 32 * l.vec), l.G);
  return l;
}
// f(std::integral_constant<int, VEC>{}) with VEC = 16 / sizeof(T) (a 128-bit vector) when vec allows it,
// else VEC = 1: both kernel variants are instantiated, the launch picks one.
template <typename T, typename F>
inline void with_vec(int vec, F&& f) {
  constexpr int V = 16 / sizeof(T);
  if (vec == V)
    f(std::integral_constant<int, V>{});
  else
    f(std::integral_constant<int, 1>{});
}

// f(T{}) for the dtype code (float, __half, __nv_bfloat16); `op` names the caller in the error.
template <typename F>
inline void with_float_dtype(int dtype, const char* op, F&& f) {
  switch (dtype) {
    case kF32: f(float{}); break;
    case kF16: f(__half{}); break;
    case kBF16: f(__nv_bfloat16{}); break;
    default: throw std::invalid_argument(std::string(op) + ": unsupported dtype code " + std::to_string(dtype));
  }
}

// The launchers of a pointwise op over x [M, kXCols * N] -> y [M, N] with a bias of kXCols * N columns,
// for an Op struct (bias_gelu.cu, geglu.cu) that names its kernels:
//   kName, kFwdName, kBwdName (error messages), kXCols,
//   template <typename T, int VEC> static auto fwd() / bwd(): the kernel functions, with the signatures
//   (x, bias, y, M, N, rows_per_chunk, tanh_approx) and (dy, x, bias, dx, part_db, M, N, rows_per_chunk,
//   tanh_approx).
template <typename Op, typename T>
void pointwise_typed(bool bwd, const void* dy, const void* x, const float* bias, void* out, float* part_db,
                     float* dbias, int M, int N, bool tanh_approx, cudaStream_t stream) {
  const PointwiseLaunch l = pointwise_launch<T>(M, N, {dy, x, out});
  const T* xt = static_cast<const T*>(x);
  const T* dyt = static_cast<const T*>(dy);
  T* ot = static_cast<T*>(out);
  if (!bwd) {
    with_vec<T>(l.vec, [&](auto V) {
      auto kern = Op::template fwd<T, decltype(V)::value>();
      FB_LAUNCH(kern, l.grid, l.block, 0, stream, xt, bias, ot, M, N, l.rows_per_chunk, tanh_approx);
    });
    check_launch(Op::kFwdName);
    return;
  }
  with_vec<T>(l.vec, [&](auto V) {
    auto kern = Op::template bwd<T, decltype(V)::value>();
    FB_LAUNCH(kern, l.grid, l.block, 0, stream, dyt, xt, bias, ot, part_db, M, N, l.rows_per_chunk, tanh_approx);
  });
  check_launch(Op::kBwdName);
  if (dbias != nullptr) launch_reduce_partials(part_db, dbias, l.G, Op::kXCols * N, stream);
}

template <typename Op>
void pointwise_fwd(int dtype, const void* x, const float* bias, void* y, int M, int N, bool tanh_approx,
                   cudaStream_t stream) {
  if (M <= 0 || N <= 0) return;
  with_float_dtype(dtype, Op::kName, [&](auto tag) {
    pointwise_typed<Op, decltype(tag)>(false, nullptr, x, bias, y, nullptr, nullptr, M, N, tanh_approx, stream);
  });
}

template <typename Op>
void pointwise_bwd(int dtype, const void* dy, const void* x, const float* bias, void* dx, float* part_db,
                   float* dbias, int M, int N, bool tanh_approx, cudaStream_t stream) {
  if (N <= 0) return;
  if (M <= 0) {
    if (dbias != nullptr) cudaMemsetAsync(dbias, 0, sizeof(float) * Op::kXCols * (size_t)N, stream);
    return;
  }
  with_float_dtype(dtype, Op::kName, [&](auto tag) {
    pointwise_typed<Op, decltype(tag)>(true, dy, x, bias, dx, part_db, dbias, M, N, tanh_approx, stream);
  });
}

}  // namespace fb

