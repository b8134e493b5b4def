// layer_norm.cu: LayerNorm forward/backward over the last dim, optional fused residual add, fp32 statistics.
//
// Layout: a row is handled by TPR threads (a power of two, 32..1024, blockDim.x) and a block holds
// R = max(1, 128 / TPR) rows (blockDim.y), so small rows (BERT's 768/1024) get one or two warps and
// warp-shuffle reductions, long rows a whole block. Each thread keeps its share of the row in
// registers (16 fp32 values: NV 128-bit vectors of VEC elements, VEC = 16 bytes / sizeof(T)), so x
// is read once; that caps N at 16 * 1024 = 16384 (the launchers reject larger rows).
// Weight and bias arrive as fp32 [N] (the callers convert these tiny vectors once).
//
// fastbert: cold: *fb::layer_norm_*_kernel<*, 1>*: VEC=1 fallback for rows not 16-byte multiples/aligned; BERT rows take the vector path
// fastbert: spill-ok: only the scalar fallbacks (VEC = 1, rows whose length is not a multiple of 16 bytes,
// e.g. N = 1023) spill 8 bytes on some arch/dtype: 16 independently addressed elements per thread under
// the 64-register cap of 1024-thread blocks. BERT widths (multiples of 8) take the 128-bit path, which
// does not spill (see the ptxas report of tests/test_cuda_compile.py).
#include "common.cuh"

namespace fb {

constexpr int kLnValsPerThread = 16;
constexpr int kLnMaxN = kLnValsPerThread * 1024;

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
      float o[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        float v = (h[k][i] - mean) * rstd;
        if (w != nullptr) v *= w[col + i];
        if (b != nullptr) v += b[col + i];
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
// for its fixed columns in dynamic shared memory (acc_w / acc_b [R][N] fp32: slots owned by one thread
// each, so no atomics; keeping them in registers would spill under the 64-register cap of 1024-thread
// blocks). At the end the R rows of the block are combined in a fixed order and the block writes one
// partial row (part_dw/part_db [G, N]) that launch_reduce_partials sums (deterministic).
template <typename T, int VEC>
__global__ void __launch_bounds__(1024)
layer_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ z, const float* __restrict__ w,
                      const float* __restrict__ mean, const float* __restrict__ rstd,
                      const T* __restrict__ dz_extra, T* __restrict__ dz, float* __restrict__ part_dw,
                      float* __restrict__ part_db, int M, int N) {
  constexpr int NV = kLnValsPerThread / VEC;
  FB_SHARED(float, red, 32 * 4);
  FB_DYNAMIC_SHARED(float, acc_w);  // [R][N], then acc_b [R][N]
  const int tpr = blockDim.x;
  const int R = blockDim.y;
  float* my_w = acc_w + threadIdx.y * N;
  float* my_b = acc_w + (R + threadIdx.y) * N;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int col = (k * tpr + threadIdx.x) * VEC;
    if (col < N) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) my_w[col + i] = my_b[col + i] = 0.f;
    }
  }

  const int64_t stride = (int64_t)gridDim.x * R;
  const int64_t first = (int64_t)blockIdx.x * R;
  // Every thread of the block runs the same number of iterations (barriers inside ln_row_sum).
  for (int64_t row0 = first; row0 < M; row0 += stride) {
    const int64_t row = row0 + threadIdx.y;
    const bool valid = row < M;
    const int64_t base = row * N;
    const float mu = valid ? mean[row] : 0.f;
    const float rs = valid ? rstd[row] : 0.f;
    // Only xhat stays in registers; the second pass reloads dy (an L1/L2 hit: this thread just read
    // it), which keeps the 1024-thread variant within 64 registers without spilling.
    float xh[NV][VEC];
    float s1 = 0.f, s2 = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int col = (k * tpr + threadIdx.x) * VEC;
      if (valid && col < N) {
        float d[VEC];
        load_f<T, VEC>(z + base + col, xh[k]);
        load_f<T, VEC>(dy + base + col, d);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          xh[k][i] = (xh[k][i] - mu) * rs;
          my_w[col + i] += d[i] * xh[k][i];
          my_b[col + i] += d[i];
          const float g = w != nullptr ? d[i] * w[col + i] : d[i];
          s1 += g * xh[k][i];
          s2 += g;
        }
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) xh[k][i] = 0.f;
      }
    }
    const float c1 = ln_row_sum(s1, red) / (float)N;
    const float c2 = ln_row_sum(s2, red) / (float)N;
    if (valid) {
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int col = (k * tpr + threadIdx.x) * VEC;
        if (col < N) {
          float o[VEC], d[VEC];
          load_f<T, VEC>(dy + base + col, d);
          if (dz_extra != nullptr) load_f<T, VEC>(dz_extra + base + col, o);
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const float g = w != nullptr ? d[i] * w[col + i] : d[i];
            float v = (g - xh[k][i] * c1 - c2) * rs;
            o[i] = dz_extra != nullptr ? v + o[i] : v;
          }
          store_f<T, VEC>(dz + base + col, o);
        }
      }
    }
  }
  __syncthreads();
  const int64_t prow = (int64_t)blockIdx.x * N;
  for (int c = threadIdx.y * tpr + threadIdx.x; c < N; c += R * tpr) {
    float sw = 0.f, sb = 0.f;
    for (int r = 0; r < R; ++r) {  // fixed order: deterministic
      sw += acc_w[r * N + c];
      sb += acc_w[(R + r) * N + c];
    }
    if (part_dw != nullptr) part_dw[prow + c] = sw;
    if (part_db != nullptr) part_db[prow + c] = sb;
  }
}

// ---- launchers ----------------------------------------------------------------------------------
struct LnShape {
  int tpr, rows;  // threads per row, rows per block
};

inline LnShape ln_shape(int N) {
  int tpr = 32;
  while (tpr * kLnValsPerThread < N) tpr *= 2;
  return {tpr, tpr >= 128 ? 1 : 128 / tpr};
}

// Dynamic shared memory of the backward: acc_w and acc_b, [rows per block][N] fp32 each.
inline size_t ln_bwd_smem_bytes(int N) { return 2 * sizeof(float) * (size_t)ln_shape(N).rows * (size_t)N; }

// Kernels needing more than the default 48 KiB of dynamic shared memory must opt in (sm_80: up to
// 163 KiB, sm_90: 227 KiB); the backward needs 128 KiB at N = 16384.
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
  LnShape s = ln_shape(N);
  int dev = 0, sms = 1;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  int want = ceil_div(M, s.rows);
  int cap = sms * (2048 / (s.tpr * s.rows));  // about one wave of resident blocks
  return want < 1 ? 1 : (want < cap ? want : cap);
}

template <typename T>
static void ln_fwd_typed(const void* x, const void* res, const float* w, const float* b, void* y, void* z,
                         float* mean, float* rstd, int M, int N, float eps, cudaStream_t stream) {
  LnShape s = ln_shape(N);
  dim3 grid(ceil_div(M, s.rows)), block(s.tpr, s.rows);
  int vec = vec_width<T>(N, {x, res, y, z});
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
  LnShape s = ln_shape(N);
  dim3 grid(G), block(s.tpr, s.rows);
  const size_t smem = ln_bwd_smem_bytes(N);
  int vec = vec_width<T>(N, {dy, z, dz_extra, dz});
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
