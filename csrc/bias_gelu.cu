// bias_gelu.cu: y = gelu(x + bias) (erf or tanh GELU) and its backward with the bias gradient.
//
// Layout (shared with geglu.cu, helpers in common.cuh): block (32, 8); threadIdx.x walks 128-bit column
// vectors of a row (a warp reads 32 * 16 contiguous bytes), threadIdx.y rows. Block (bx, by) owns column
// vectors [bx * 32, bx * 32 + 32) and the rows of chunk `by` (gridDim.y chunks). The backward accumulates
// the bias gradient of its columns in registers, combines the 8 row-threads through shared memory in a
// fixed order and writes one fp32 partial row per chunk; launch_reduce_partials sums the chunks.
// bias is fp32 [N] or null (callers convert it once).
#include "common.cuh"

namespace fb {

template <typename T, int VEC>
__global__ void __launch_bounds__(256)
bias_gelu_fwd_kernel(const T* __restrict__ x, const float* __restrict__ bias, T* __restrict__ y, int M, int N,
                     int rows_per_chunk, bool tanh_approx) {
  const int col = (blockIdx.x * 32 + threadIdx.x) * VEC;
  if (col >= N) return;
  float bv[VEC];
  load_bias(bias, col, true, bv);
  int64_t r0, r1;
  chunk_rows(M, rows_per_chunk, r0, r1);
  for (int64_t r = r0 + threadIdx.y; r < r1; r += kPwRows) {
    float v[VEC];
    load_f<T, VEC>(x + r * N + col, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = gelu(v[i] + bv[i], tanh_approx);
    store_f<T, VEC>(y + r * N + col, v);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(256)
bias_gelu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ bias,
                     T* __restrict__ dx, float* __restrict__ part_db, int M, int N, int rows_per_chunk,
                     bool tanh_approx) {
  FB_SHARED(float, comb, kPwRows * 32 * (16 / sizeof(T)));
  const int col = (blockIdx.x * 32 + threadIdx.x) * VEC;
  const bool active = col < N;
  float bv[VEC], acc[VEC] = {};
  load_bias(bias, col, active, bv);
  int64_t r0, r1;
  chunk_rows(M, rows_per_chunk, r0, r1);
  if (active) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kPwRows) {
      float v[VEC], d[VEC];
      load_f<T, VEC>(x + r * N + col, v);
      load_f<T, VEC>(dy + r * N + col, d);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        float g, dg;
        gelu_and_grad(v[i] + bv[i], tanh_approx, g, dg);
        v[i] = d[i] * dg;
        acc[i] += v[i];  // dbias sums the unrounded fp32 gradient
      }
      store_f<T, VEC>(dx + r * N + col, v);
    }
  }
  if (part_db == nullptr) return;  // uniform across the grid
  stash_column_sums(comb, acc);
  __syncthreads();
  if (threadIdx.y == 0 && active) sum_column_sums<VEC>(comb, part_db + (int64_t)blockIdx.y * N + col);
}

struct BiasGeluOp {
  static constexpr const char* kName = "bias_gelu";
  static constexpr const char* kFwdName = "bias_gelu_fwd_kernel";
  static constexpr const char* kBwdName = "bias_gelu_bwd_kernel";
  static constexpr int kXCols = 1;  // x and bias have kXCols * N columns
  template <typename T, int VEC>
  static auto fwd() { return bias_gelu_fwd_kernel<T, VEC>; }
  template <typename T, int VEC>
  static auto bwd() { return bias_gelu_bwd_kernel<T, VEC>; }
};

// y = gelu(x + bias): x, y [M, N] contiguous of `dtype`; bias fp32 [N] or null.
void launch_bias_gelu_fwd(int dtype, const void* x, const float* bias, void* y, int M, int N, bool tanh_approx,
                          cudaStream_t stream) {
  pointwise_fwd<BiasGeluOp>(dtype, x, bias, y, M, N, tanh_approx, stream);
}

// dx = dy * gelu'(x + bias); dbias (fp32 [N] or null) = column sums of dx, through part_db
// (fp32 workspace of pointwise_partials(M) * N floats, null when dbias is null).
void launch_bias_gelu_bwd(int dtype, const void* dy, const void* x, const float* bias, void* dx, float* part_db,
                          float* dbias, int M, int N, bool tanh_approx, cudaStream_t stream) {
  pointwise_bwd<BiasGeluOp>(dtype, dy, x, bias, dx, part_db, dbias, M, N, tanh_approx, stream);
}

}  // namespace fb
