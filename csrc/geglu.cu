// geglu.cu: gated GELU (MosaicBERT layout): x [M, 2N] (+ bias [2N]) split into a = x[:, :N] and
// g = x[:, N:]; y = gelu(a) * g [M, N]; backward gives dx [M, 2N] and the bias gradient [2N].
// Same tiling as bias_gelu.cu (helpers in common.cuh): block (32, 8), threadIdx.x over 128-bit column vectors of the output
// half, threadIdx.y over rows, gridDim.y row chunks, fp32 partial rows [G, 2N] for dbias reduced after.
#include "common.cuh"

namespace fb {

template <typename T, int VEC>
__global__ void __launch_bounds__(256)
geglu_fwd_kernel(const T* __restrict__ x, const float* __restrict__ bias, T* __restrict__ y, int M, int N,
                 int rows_per_chunk, bool tanh_approx) {
  const int col = (blockIdx.x * 32 + threadIdx.x) * VEC;
  if (col >= N) return;
  float ba[VEC], bg[VEC];
  load_bias(bias, col, true, ba);
  load_bias(bias, (int64_t)N + col, true, bg);
  int64_t r0, r1;
  chunk_rows(M, rows_per_chunk, r0, r1);
  for (int64_t r = r0 + threadIdx.y; r < r1; r += kPwRows) {
    float a[VEC], g[VEC];
    const T* xr = x + r * 2 * N;
    load_f<T, VEC>(xr + col, a);
    load_f<T, VEC>(xr + N + col, g);
#pragma unroll
    for (int i = 0; i < VEC; ++i) a[i] = gelu(a[i] + ba[i], tanh_approx) * (g[i] + bg[i]);
    store_f<T, VEC>(y + r * N + col, a);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(256)
geglu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ bias,
                 T* __restrict__ dx, float* __restrict__ part_db, int M, int N, int rows_per_chunk,
                 bool tanh_approx) {
  constexpr int W = kPwRows * 32 * VEC;  // comb: the a half's sums, then the g half's
  FB_SHARED(float, comb, 2 * kPwRows * 32 * (16 / sizeof(T)));
  const int col = (blockIdx.x * 32 + threadIdx.x) * VEC;
  const bool active = col < N;
  float ba[VEC], bg[VEC], acc_a[VEC] = {}, acc_g[VEC] = {};
  load_bias(bias, col, active, ba);
  load_bias(bias, (int64_t)N + col, active, bg);
  int64_t r0, r1;
  chunk_rows(M, rows_per_chunk, r0, r1);
  if (active) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kPwRows) {
      float a[VEC], g[VEC], d[VEC];
      const T* xr = x + r * 2 * N;
      T* dxr = dx + r * 2 * N;
      load_f<T, VEC>(xr + col, a);
      load_f<T, VEC>(xr + N + col, g);
      load_f<T, VEC>(dy + r * N + col, d);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        float ga, dga;
        gelu_and_grad(a[i] + ba[i], tanh_approx, ga, dga);
        const float gate = g[i] + bg[i];
        a[i] = d[i] * gate * dga;  // d/da
        g[i] = d[i] * ga;          // d/dg
        acc_a[i] += a[i];
        acc_g[i] += g[i];
      }
      store_f<T, VEC>(dxr + col, a);
      store_f<T, VEC>(dxr + N + col, g);
    }
  }
  if (part_db == nullptr) return;  // uniform across the grid
  stash_column_sums(comb, acc_a);
  stash_column_sums(comb + W, acc_g);
  __syncthreads();
  if (threadIdx.y == 0 && active) {
    float* prow = part_db + (int64_t)blockIdx.y * 2 * N;
    sum_column_sums<VEC>(comb, prow + col);
    sum_column_sums<VEC>(comb + W, prow + N + col);
  }
}

struct GegluOp {
  static constexpr const char* kName = "geglu";
  static constexpr const char* kFwdName = "geglu_fwd_kernel";
  static constexpr const char* kBwdName = "geglu_bwd_kernel";
  static constexpr int kXCols = 2;  // x and bias have kXCols * N columns
  template <typename T, int VEC>
  static auto fwd() { return geglu_fwd_kernel<T, VEC>; }
  template <typename T, int VEC>
  static auto bwd() { return geglu_bwd_kernel<T, VEC>; }
};

// y [M, N] = gelu(x[:, :N] + bias[:N]) * (x[:, N:] + bias[N:]); x [M, 2N]; bias fp32 [2N] or null.
void launch_geglu_fwd(int dtype, const void* x, const float* bias, void* y, int M, int N, bool tanh_approx,
                      cudaStream_t stream) {
  pointwise_fwd<GegluOp>(dtype, x, bias, y, M, N, tanh_approx, stream);
}

// dx [M, 2N]; dbias fp32 [2N] or null via part_db (pointwise_partials(M) * 2N floats).
void launch_geglu_bwd(int dtype, const void* dy, const void* x, const float* bias, void* dx, float* part_db,
                      float* dbias, int M, int N, bool tanh_approx, cudaStream_t stream) {
  pointwise_bwd<GegluOp>(dtype, dy, x, bias, dx, part_db, dbias, M, N, tanh_approx, stream);
}

}  // namespace fb
