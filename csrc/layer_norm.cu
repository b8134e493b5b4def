// layer_norm.cu: LayerNorm forward/backward over the last dim, optional fused residual add, fp32 statistics.
//
// Layout: a row is handled by TPR threads (a power of two, 32..1024, blockDim.x) and a block holds
// R rows (blockDim.y): the forward R = max(1, 128 / TPR), so small rows (BERT's 768/1024) get one or two
// warps and warp-shuffle reductions, long rows a whole block; the backward R = max(1, 512 / TPR). Each
// thread keeps its share of the row in registers (16 fp32 values: NV 128-bit vectors of VEC elements,
// VEC = 16 bytes / sizeof(T)), so x is read once; that caps N at 16 * 1024 = 16384 (the launchers reject
// larger rows). Weight and bias arrive as fp32 [N] (the callers convert these tiny vectors once) and are
// read as 16-byte vectors like the rows.
//
// The backward's R x N fp32 combine buffer is at most 32 KiB (N = 4096: R = 2):
// fastbert: dynamic-smem: *layer_norm_bwd_kernel*: 32768
// fastbert: cold: *fb::layer_norm_*_kernel<*, 1>*: VEC=1 fallback for rows not 16-byte multiples/aligned; BERT rows take the vector path
// fastbert: spill-ok: only the scalar fallbacks (VEC = 1, rows whose length is not a multiple of 16 bytes,
// e.g. N = 1023) spill a few bytes on some arch/dtype: 16 independently addressed elements per thread
// under the 64-register cap of 1024-thread blocks. BERT widths (multiples of 8) take the 128-bit path,
// which does not spill (see the ptxas report of tests/test_cuda_compile.py).
#include "common.cuh"

namespace fb {

constexpr int kLnValsPerThread = 16;
constexpr int kLnMaxN = kLnValsPerThread * 1024;
constexpr int kLnBwdThreads = 512;  // threads per backward block when a row needs fewer

// Sum of v over the TPR threads of this row; every thread of the block must call it (it may
// __syncthreads). red: shared scratch of at least 32 * blockDim.y floats.
__device__ __forceinline__ float ln_row_sum(float v, float* red) {
  v = warp_sum(v);
  const int tpr = blockDim.x;
  if (tpr <= 32) return v;
  float* r = red + threadIdx.y * 32;
  __syncthreads();  // the previous call's readers are done with `red`
  if ((threadIdx.x & 31) == 0) r[threadIdx.x >> 5] = v;
  __syncthreads();
  float s = 0.f;
  for (int i = 0; i < tpr / 32; ++i) s += r[i];  // same order in every thread: identical results
  return s;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(1024)
layer_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ res, const float* __restrict__ w,
                      const float* __restrict__ b, T* __restrict__ y, T* __restrict__ z,
                      float* __restrict__ mean_out, float* __restrict__ rstd_out, int M, int N, float eps) {
  constexpr int NV = kLnValsPerThread / VEC;
  FB_SHARED(float, red, 32 * 4);
  const int tpr = blockDim.x;
  const int64_t row = (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
  const bool valid = row < M;  // invalid rows still take part in the block's barriers
  const int64_t base = row * N;
  float h[NV][VEC];
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int col = (k * tpr + threadIdx.x) * VEC;
    if (valid && col < N) {
      load_f<T, VEC>(x + base + col, h[k]);
      if (res != nullptr) {
        float r[VEC];
        load_f<T, VEC>(res + base + col, r);
        // z is rounded to T (it is the new residual stream); the statistics are of the rounded z.
#pragma unroll
        for (int i = 0; i < VEC; ++i) h[k][i] = Cvt<T>::to_f(Cvt<T>::from_f(h[k][i] + r[i]));
        store_f<T, VEC>(z + base + col, h[k]);
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum += h[k][i];
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) h[k][i] = 0.f;
    }
  }
  const float mean = ln_row_sum(sum, red) / (float)N;
  float sq = 0.f;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int col = (k * tpr + threadIdx.x) * VEC;
    if (valid && col < N) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        float d = h[k][i] - mean;
        sq += d * d;
      }
    }
  }
  const float var = ln_row_sum(sq, red) / (float)N;
  const float rstd = 1.0f / sqrtf(var + eps);  // IEEE sqrt and division: rstd is an output
  if (!valid) return;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int col = (k * tpr + threadIdx.x) * VEC;
    if (col < N) {
      float o[VEC], wv[VEC], bv[VEC];
      if (w != nullptr) load_f32<VEC>(w + col, wv);
      if (b != nullptr) load_f32<VEC>(b + col, bv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        float v = (h[k][i] - mean) * rstd;
        if (w != nullptr) v *= wv[i];
        if (b != nullptr) v += bv[i];
        o[i] = v;
      }
      store_f<T, VEC>(y + base + col, o);
    }
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// Backward. Block g handles rows g*R + ty, g*R + ty + G*R, ...; each thread accumulates dweight/dbias
// for its fixed columns in registers (no shared-memory traffic per element), reading z and dy twice per
// row (the second time from L1: keeping xhat in registers too would spill under the 64-register cap).
// At the end the block's R row-groups are combined through shared memory in a fixed order and the block
// writes one partial row (part_dw/part_db [G, N], G ~ 1-2 per SM) that launch_reduce_partials sums
// (deterministic, no atomics).
template <typename T, int VEC>
__device__ __forceinline__ void ln_bwd_load(const T* __restrict__ dy, const T* __restrict__ z,
                                            const float* __restrict__ w, int64_t off, int col, float mu, float rs,
                                            float (&d)[VEC], float (&xh)[VEC], float (&g)[VEC]) {
  load_f<T, VEC>(z + off, xh);
  load_f<T, VEC>(dy + off, d);
  if (w != nullptr) load_f32<VEC>(w + col, g);
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    xh[i] = (xh[i] - mu) * rs;
    g[i] = w != nullptr ? d[i] * g[i] : d[i];
  }
}

// One partial row (the sum over the block's R row-groups, fixed order) of acc into part[blockIdx.x, :].
// comb: R * N floats of shared memory (unused when R == 1).
template <int VEC, int NV>
__device__ __forceinline__ void ln_write_partial(const float (&acc)[NV][VEC], float* comb, float* __restrict__ part,
                                                 int N) {
  const int tpr = blockDim.x, R = blockDim.y;
  float* out = part + (int64_t)blockIdx.x * N;
  if (R == 1) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int col = (k * tpr + threadIdx.x) * VEC;
      if (col < N) store_f32<VEC>(out + col, acc[k]);
    }
    return;
  }
  __syncthreads();  // a previous call's readers are done with comb
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int col = (k * tpr + threadIdx.x) * VEC;
    if (col >= N) continue;
    if constexpr (VEC == 8) {
      // 32 bytes per lane: lanes 4-7 of each 8-lane phase of a 16-byte store would hit the banks of lanes
      // 0-3 (2-way conflict); they store their two halves in the other order, which fills the other banks.
      const int sw = (threadIdx.x >> 2) & 1;
      Pack<float, 4> lo, hi;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        lo.v[i] = sw ? acc[k][4 + i] : acc[k][i];
        hi.v[i] = sw ? acc[k][i] : acc[k][4 + i];
      }
      Pack<float, 4>* dst = reinterpret_cast<Pack<float, 4>*>(comb + threadIdx.y * N + col);
      dst[sw] = lo;
      dst[sw ^ 1] = hi;
    } else {
      store_f32<VEC>(comb + threadIdx.y * N + col, acc[k]);
    }
  }
  __syncthreads();
  for (int c = threadIdx.y * tpr + threadIdx.x; c < N; c += R * tpr) {
    float s = 0.f;
    for (int r = 0; r < R; ++r) s += comb[r * N + c];  // fixed order: deterministic
    out[c] = s;
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(1024)
layer_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ z, const float* __restrict__ w,
                      const float* __restrict__ mean, const float* __restrict__ rstd,
                      const T* __restrict__ dz_extra, T* __restrict__ dz, float* __restrict__ part_dw,
                      float* __restrict__ part_db, int M, int N) {
  constexpr int NV = kLnValsPerThread / VEC;
  FB_SHARED(float, red, 32 * kLnBwdThreads / 64);  // ln_row_sum: 32 floats per row of >= 2 warps
  FB_DYNAMIC_SHARED(float, comb);  // [R][N] (R > 1 only)
  const int tpr = blockDim.x;
  const int R = blockDim.y;
  float acc_w[NV][VEC], acc_b[NV][VEC];
#pragma unroll
  for (int k = 0; k < NV; ++k) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc_w[k][i] = acc_b[k][i] = 0.f;
  }
  const int64_t stride = (int64_t)gridDim.x * R;
  // Every thread of the block runs the same number of iterations (barriers inside ln_row_sum).
  for (int64_t row0 = (int64_t)blockIdx.x * R; row0 < M; row0 += stride) {
    const int64_t row = row0 + threadIdx.y;
    const bool valid = row < M;
    const int64_t base = row * N;
    const float mu = valid ? mean[row] : 0.f;
    const float rs = valid ? rstd[row] : 0.f;
    float s1 = 0.f, s2 = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int col = (k * tpr + threadIdx.x) * VEC;
      if (valid && col < N) {
        float d[VEC], xh[VEC], g[VEC];
        ln_bwd_load<T, VEC>(dy, z, w, base + col, col, mu, rs, d, xh, g);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          acc_w[k][i] += d[i] * xh[i];
          acc_b[k][i] += d[i];
          s1 += g[i] * xh[i];
          s2 += g[i];
        }
      }
    }
    const float c1 = ln_row_sum(s1, red) / (float)N;
    const float c2 = ln_row_sum(s2, red) / (float)N;
    if (valid) {
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int col = (k * tpr + threadIdx.x) * VEC;
        if (col < N) {
          float d[VEC], xh[VEC], g[VEC], o[VEC];
          ln_bwd_load<T, VEC>(dy, z, w, base + col, col, mu, rs, d, xh, g);
          if (dz_extra != nullptr) load_f<T, VEC>(dz_extra + base + col, o);
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const float v = (g[i] - xh[i] * c1 - c2) * rs;
            o[i] = dz_extra != nullptr ? v + o[i] : v;
          }
          store_f<T, VEC>(dz + base + col, o);
        }
      }
    }
  }
  if (part_dw != nullptr) ln_write_partial<VEC, NV>(acc_w, comb, part_dw, N);
  if (part_db != nullptr) ln_write_partial<VEC, NV>(acc_b, comb, part_db, N);
}

// ---- launchers ----------------------------------------------------------------------------------
struct LnShape {
  int tpr, rows;  // threads per row, rows per block
};

inline int ln_tpr(int N) {
  int tpr = 32;
  while (tpr * kLnValsPerThread < N) tpr *= 2;
  return tpr;
}
inline LnShape ln_shape(int N) {
  const int tpr = ln_tpr(N);
  return {tpr, tpr >= 128 ? 1 : 128 / tpr};
}
// The backward's blocks are bigger (kLnBwdThreads threads when the row is narrower): with ~2 blocks per
// SM each holding one partial row, fewer partial rows still keep ~1024 threads per SM streaming.
inline LnShape ln_bwd_shape(int N) {
  const int tpr = ln_tpr(N);
  return {tpr, tpr >= kLnBwdThreads ? 1 : kLnBwdThreads / tpr};
}

// Dynamic shared memory of the backward: the [rows per block][N] fp32 combine buffer (none for one row).
inline size_t ln_bwd_smem_bytes(int N) {
  const LnShape s = ln_bwd_shape(N);
  return s.rows > 1 ? sizeof(float) * (size_t)s.rows * (size_t)N : 0;
}

// Kernels needing more than the default 48 KiB of dynamic shared memory must opt in (sm_80: up to
// 163 KiB, sm_90: 227 KiB); the backward's combine buffer is at most 32 KiB (R * N <= 512 * 16).
template <typename K>
inline void allow_smem(K kern, size_t bytes) {
  if (bytes > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (e != cudaSuccess)
      throw std::runtime_error(std::string("layer_norm: cannot get ") + std::to_string(bytes) +
                               " bytes of shared memory: " + cudaGetErrorString(e));
  }
}

// Largest supported row length (the kernels keep a row in registers).
int layer_norm_max_n() { return kLnMaxN; }

// Number of partial rows G the backward writes: part_dw / part_db must hold G * N floats each.
int layer_norm_bwd_num_partials(int M, int N) {
  const LnShape s = ln_bwd_shape(N);
  int dev = 0, sms = 1;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int want = ceil_div(M, s.rows);
  // one wave of resident blocks: 64 registers per thread (launch bounds 1024) fit 1024 threads per SM
  const int per_sm = 1024 / (s.tpr * s.rows) > 1 ? 1024 / (s.tpr * s.rows) : 1;
  const int cap = sms * per_sm;
  return want < 1 ? 1 : (want < cap ? want : cap);
}

template <typename T>
static void ln_fwd_typed(const void* x, const void* res, const float* w, const float* b, void* y, void* z,
                         float* mean, float* rstd, int M, int N, float eps, cudaStream_t stream) {
  LnShape s = ln_shape(N);
  dim3 grid(ceil_div(M, s.rows)), block(s.tpr, s.rows);
  int vec = vec_width<T>(N, {x, res, y, z, w, b});  // w, b: fp32, read as 16-byte vectors too
  const T* xt = static_cast<const T*>(x);
  const T* rt = static_cast<const T*>(res);
  T* yt = static_cast<T*>(y);
  T* zt = static_cast<T*>(z);
  if (vec == 16 / (int)sizeof(T)) {
    auto kern = layer_norm_fwd_kernel<T, 16 / sizeof(T)>;
    FB_LAUNCH(kern, grid, block, 0, stream, xt, rt, w, b, yt, zt, mean, rstd, M, N, eps);
  } else {
    auto kern = layer_norm_fwd_kernel<T, 1>;
    FB_LAUNCH(kern, grid, block, 0, stream, xt, rt, w, b, yt, zt, mean, rstd, M, N, eps);
  }
  check_launch("layer_norm_fwd_kernel");
}

template <typename T>
static void ln_bwd_typed(const void* dy, const void* z, const float* w, const float* mean, const float* rstd,
                         const void* dz_extra, void* dz, float* part_dw, float* part_db, float* dw, float* db,
                         int M, int N, int G, cudaStream_t stream) {
  const LnShape s = ln_bwd_shape(N);
  dim3 grid(G), block(s.tpr, s.rows);
  const size_t smem = ln_bwd_smem_bytes(N);
  int vec = vec_width<T>(N, {dy, z, dz_extra, dz, w});
  const T* dyt = static_cast<const T*>(dy);
  const T* zt = static_cast<const T*>(z);
  const T* dzx = static_cast<const T*>(dz_extra);
  T* dzt = static_cast<T*>(dz);
  if (vec == 16 / (int)sizeof(T)) {
    auto kern = layer_norm_bwd_kernel<T, 16 / sizeof(T)>;
    allow_smem(kern, smem);
    FB_LAUNCH(kern, grid, block, smem, stream, dyt, zt, w, mean, rstd, dzx, dzt, part_dw, part_db, M, N);
  } else {
    auto kern = layer_norm_bwd_kernel<T, 1>;
    allow_smem(kern, smem);
    FB_LAUNCH(kern, grid, block, smem, stream, dyt, zt, w, mean, rstd, dzx, dzt, part_dw, part_db, M, N);
  }
  check_launch("layer_norm_bwd_kernel");
  if (dw != nullptr) launch_reduce_partials(part_dw, dw, G, N, stream);
  if (db != nullptr) launch_reduce_partials(part_db, db, G, N, stream);
}

// y, z (only with res), mean, rstd: outputs. x, res, y, z: [M, N] contiguous of `dtype`; w, b: fp32 [N] or null.
void launch_layer_norm_fwd(int dtype, const void* x, const void* res, const float* w, const float* b, void* y,
                           void* z, float* mean, float* rstd, int M, int N, float eps, cudaStream_t stream) {
  if (M <= 0) return;
  if (N < 1 || N > kLnMaxN) throw std::invalid_argument("layer_norm: N must be in [1, " + std::to_string(kLnMaxN) + "]");
  switch (dtype) {
    case kF32: ln_fwd_typed<float>(x, res, w, b, y, z, mean, rstd, M, N, eps, stream); break;
    case kF16: ln_fwd_typed<__half>(x, res, w, b, y, z, mean, rstd, M, N, eps, stream); break;
    case kBF16: ln_fwd_typed<__nv_bfloat16>(x, res, w, b, y, z, mean, rstd, M, N, eps, stream); break;
    default: throw std::invalid_argument("layer_norm: unsupported dtype code " + std::to_string(dtype));
  }
}

// dz: output [M, N]; dw, db: fp32 [N] outputs or null; part_dw/part_db: fp32 workspaces of
// G * N floats (G = layer_norm_bwd_num_partials(M, N)), null when the matching output is null.
void launch_layer_norm_bwd(int dtype, const void* dy, const void* z, const float* w, const float* mean,
                           const float* rstd, const void* dz_extra, void* dz, float* part_dw, float* part_db,
                           float* dw, float* db, int M, int N, int G, cudaStream_t stream) {
  if (N < 1 || N > kLnMaxN) throw std::invalid_argument("layer_norm: N must be in [1, " + std::to_string(kLnMaxN) + "]");
  if (M <= 0) {  // empty batch: the parameter gradients are zero
    if (dw != nullptr) cudaMemsetAsync(dw, 0, sizeof(float) * (size_t)N, stream);
    if (db != nullptr) cudaMemsetAsync(db, 0, sizeof(float) * (size_t)N, stream);
    return;
  }
  switch (dtype) {
    case kF32: ln_bwd_typed<float>(dy, z, w, mean, rstd, dz_extra, dz, part_dw, part_db, dw, db, M, N, G, stream); break;
    case kF16: ln_bwd_typed<__half>(dy, z, w, mean, rstd, dz_extra, dz, part_dw, part_db, dw, db, M, N, G, stream); break;
    case kBF16: ln_bwd_typed<__nv_bfloat16>(dy, z, w, mean, rstd, dz_extra, dz, part_dw, part_db, dw, db, M, N, G, stream); break;
    default: throw std::invalid_argument("layer_norm: unsupported dtype code " + std::to_string(dtype));
  }
}

}  // namespace fb
