// bias_gelu.cu: y = gelu(x + bias) (erf or tanh GELU) and its backward with the bias gradient.
//
// Layout (shared with geglu.cu): block (32, 8); threadIdx.x walks 128-bit column vectors of a row (a
// warp reads 32 * 16 contiguous bytes), threadIdx.y rows. Block (bx, by) owns column vectors
// [bx * 32, bx * 32 + 32) and the rows of chunk `by` (gridDim.y chunks). The backward accumulates the
// bias gradient of its columns in registers, combines the 8 row-threads through shared memory in a
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
#pragma unroll
  for (int i = 0; i < VEC; ++i) bv[i] = bias != nullptr ? bias[col + i] : 0.f;
  const int64_t r0 = (int64_t)blockIdx.y * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < M ? r0 + rows_per_chunk : M;
  for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) {
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
  FB_SHARED(float, comb, 8 * 32 * (16 / sizeof(T)));
  const int col = (blockIdx.x * 32 + threadIdx.x) * VEC;
  const bool active = col < N;
  float bv[VEC], acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    bv[i] = (active && bias != nullptr) ? bias[col + i] : 0.f;
    acc[i] = 0.f;
  }
  const int64_t r0 = (int64_t)blockIdx.y * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < M ? r0 + rows_per_chunk : M;
  if (active) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) {
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
#pragma unroll
  for (int i = 0; i < VEC; ++i) comb[(threadIdx.y * 32 + threadIdx.x) * VEC + i] = acc[i];
  __syncthreads();
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float s = 0.f;
      for (int r = 0; r < 8; ++r) s += comb[(r * 32 + threadIdx.x) * VEC + i];
      part_db[(int64_t)blockIdx.y * N + col + i] = s;
    }
  }
}

template <typename T>
static void bias_gelu_typed(bool bwd, const void* dy, const void* x, const float* bias, void* out, float* part_db,
                            float* dbias, int M, int N, bool tanh_approx, cudaStream_t stream) {
  const int G = pointwise_partials(M);
  const int rows_per_chunk = ceil_div(M, G);
  const int vec = vec_width<T>(N, {dy, x, out});
  dim3 block(32, 8), grid(ceil_div(N, 32 * vec), G);
  const T* xt = static_cast<const T*>(x);
  const T* dyt = static_cast<const T*>(dy);
  T* ot = static_cast<T*>(out);
  constexpr int V = 16 / sizeof(T);
  if (!bwd) {
    if (vec == V) {
      auto kern = bias_gelu_fwd_kernel<T, V>;
      FB_LAUNCH(kern, grid, block, 0, stream, xt, bias, ot, M, N, rows_per_chunk, tanh_approx);
    } else {
      auto kern = bias_gelu_fwd_kernel<T, 1>;
      FB_LAUNCH(kern, grid, block, 0, stream, xt, bias, ot, M, N, rows_per_chunk, tanh_approx);
    }
    check_launch("bias_gelu_fwd_kernel");
    return;
  }
  if (vec == V) {
    auto kern = bias_gelu_bwd_kernel<T, V>;
    FB_LAUNCH(kern, grid, block, 0, stream, dyt, xt, bias, ot, part_db, M, N, rows_per_chunk, tanh_approx);
  } else {
    auto kern = bias_gelu_bwd_kernel<T, 1>;
    FB_LAUNCH(kern, grid, block, 0, stream, dyt, xt, bias, ot, part_db, M, N, rows_per_chunk, tanh_approx);
  }
  check_launch("bias_gelu_bwd_kernel");
  if (dbias != nullptr) launch_reduce_partials(part_db, dbias, G, N, stream);
}

// y = gelu(x + bias): x, y [M, N] contiguous of `dtype`; bias fp32 [N] or null.
void launch_bias_gelu_fwd(int dtype, const void* x, const float* bias, void* y, int M, int N, bool tanh_approx,
                          cudaStream_t stream) {
  if (M <= 0 || N <= 0) return;
  switch (dtype) {
    case kF32: bias_gelu_typed<float>(false, nullptr, x, bias, y, nullptr, nullptr, M, N, tanh_approx, stream); break;
    case kF16: bias_gelu_typed<__half>(false, nullptr, x, bias, y, nullptr, nullptr, M, N, tanh_approx, stream); break;
    case kBF16: bias_gelu_typed<__nv_bfloat16>(false, nullptr, x, bias, y, nullptr, nullptr, M, N, tanh_approx, stream); break;
    default: throw std::invalid_argument("bias_gelu: unsupported dtype code " + std::to_string(dtype));
  }
}

// dx = dy * gelu'(x + bias); dbias (fp32 [N] or null) = column sums of dx, through part_db
// (fp32 workspace of pointwise_partials(M) * N floats, null when dbias is null).
void launch_bias_gelu_bwd(int dtype, const void* dy, const void* x, const float* bias, void* dx, float* part_db,
                          float* dbias, int M, int N, bool tanh_approx, cudaStream_t stream) {
  if (N <= 0) return;
  if (M <= 0) {
    if (dbias != nullptr) cudaMemsetAsync(dbias, 0, sizeof(float) * (size_t)N, stream);
    return;
  }
  switch (dtype) {
    case kF32: bias_gelu_typed<float>(true, dy, x, bias, dx, part_db, dbias, M, N, tanh_approx, stream); break;
    case kF16: bias_gelu_typed<__half>(true, dy, x, bias, dx, part_db, dbias, M, N, tanh_approx, stream); break;
    case kBF16: bias_gelu_typed<__nv_bfloat16>(true, dy, x, bias, dx, part_db, dbias, M, N, tanh_approx, stream); break;
    default: throw std::invalid_argument("bias_gelu: unsupported dtype code " + std::to_string(dtype));
  }
}

}  // namespace fb
