// geglu.cu: gated GELU (MosaicBERT layout): x [M, 2N] (+ bias [2N]) split into a = x[:, :N] and
// g = x[:, N:]; y = gelu(a) * g [M, N]; backward gives dx [M, 2N] and the bias gradient [2N].
// Same tiling as bias_gelu.cu: block (32, 8), threadIdx.x over 128-bit column vectors of the output
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
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    ba[i] = bias != nullptr ? bias[col + i] : 0.f;
    bg[i] = bias != nullptr ? bias[N + col + i] : 0.f;
  }
  const int64_t r0 = (int64_t)blockIdx.y * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < M ? r0 + rows_per_chunk : M;
  for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) {
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
  FB_SHARED(float, comb, 2 * 8 * 32 * (16 / sizeof(T)));
  const int col = (blockIdx.x * 32 + threadIdx.x) * VEC;
  const bool active = col < N;
  float ba[VEC], bg[VEC], acc_a[VEC], acc_g[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    ba[i] = (active && bias != nullptr) ? bias[col + i] : 0.f;
    bg[i] = (active && bias != nullptr) ? bias[N + col + i] : 0.f;
    acc_a[i] = acc_g[i] = 0.f;
  }
  const int64_t r0 = (int64_t)blockIdx.y * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < M ? r0 + rows_per_chunk : M;
  if (active) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) {
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
  constexpr int W = 8 * 32 * VEC;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    comb[(threadIdx.y * 32 + threadIdx.x) * VEC + i] = acc_a[i];
    comb[W + (threadIdx.y * 32 + threadIdx.x) * VEC + i] = acc_g[i];
  }
  __syncthreads();
  if (threadIdx.y == 0 && active) {
    float* prow = part_db + (int64_t)blockIdx.y * 2 * N;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float sa = 0.f, sg = 0.f;
      for (int r = 0; r < 8; ++r) {
        sa += comb[(r * 32 + threadIdx.x) * VEC + i];
        sg += comb[W + (r * 32 + threadIdx.x) * VEC + i];
      }
      prow[col + i] = sa;
      prow[N + col + i] = sg;
    }
  }
}

template <typename T>
static void geglu_typed(bool bwd, const void* dy, const void* x, const float* bias, void* out, float* part_db,
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
      auto kern = geglu_fwd_kernel<T, V>;
      FB_LAUNCH(kern, grid, block, 0, stream, xt, bias, ot, M, N, rows_per_chunk, tanh_approx);
    } else {
      auto kern = geglu_fwd_kernel<T, 1>;
      FB_LAUNCH(kern, grid, block, 0, stream, xt, bias, ot, M, N, rows_per_chunk, tanh_approx);
    }
    check_launch("geglu_fwd_kernel");
    return;
  }
  if (vec == V) {
    auto kern = geglu_bwd_kernel<T, V>;
    FB_LAUNCH(kern, grid, block, 0, stream, dyt, xt, bias, ot, part_db, M, N, rows_per_chunk, tanh_approx);
  } else {
    auto kern = geglu_bwd_kernel<T, 1>;
    FB_LAUNCH(kern, grid, block, 0, stream, dyt, xt, bias, ot, part_db, M, N, rows_per_chunk, tanh_approx);
  }
  check_launch("geglu_bwd_kernel");
  if (dbias != nullptr) launch_reduce_partials(part_db, dbias, G, 2 * N, stream);
}

// y [M, N] = gelu(x[:, :N] + bias[:N]) * (x[:, N:] + bias[N:]); x [M, 2N]; bias fp32 [2N] or null.
void launch_geglu_fwd(int dtype, const void* x, const float* bias, void* y, int M, int N, bool tanh_approx,
                      cudaStream_t stream) {
  if (M <= 0 || N <= 0) return;
  switch (dtype) {
    case kF32: geglu_typed<float>(false, nullptr, x, bias, y, nullptr, nullptr, M, N, tanh_approx, stream); break;
    case kF16: geglu_typed<__half>(false, nullptr, x, bias, y, nullptr, nullptr, M, N, tanh_approx, stream); break;
    case kBF16: geglu_typed<__nv_bfloat16>(false, nullptr, x, bias, y, nullptr, nullptr, M, N, tanh_approx, stream); break;
    default: throw std::invalid_argument("geglu: unsupported dtype code " + std::to_string(dtype));
  }
}

// dx [M, 2N]; dbias fp32 [2N] or null via part_db (pointwise_partials(M) * 2N floats).
void launch_geglu_bwd(int dtype, const void* dy, const void* x, const float* bias, void* dx, float* part_db,
                      float* dbias, int M, int N, bool tanh_approx, cudaStream_t stream) {
  if (N <= 0) return;
  if (M <= 0) {
    if (dbias != nullptr) cudaMemsetAsync(dbias, 0, sizeof(float) * 2 * (size_t)N, stream);
    return;
  }
  switch (dtype) {
    case kF32: geglu_typed<float>(true, dy, x, bias, dx, part_db, dbias, M, N, tanh_approx, stream); break;
    case kF16: geglu_typed<__half>(true, dy, x, bias, dx, part_db, dbias, M, N, tanh_approx, stream); break;
    case kBF16: geglu_typed<__nv_bfloat16>(true, dy, x, bias, dx, part_db, dbias, M, N, tanh_approx, stream); break;
    default: throw std::invalid_argument("geglu: unsupported dtype code " + std::to_string(dtype));
  }
}

}  // namespace fb
