// common.cu: the shared non-template pieces of common.cuh (one definition for the whole extension).
#include "common.cuh"

namespace fb {

// Column sums of G partial rows: a block of (32, kRedRows) threads owns 32 columns (one 128-byte segment
// per partial row for each warp); each threadIdx.y sums every kRedRows-th row, then the kRedRows sums are
// added in a fixed order. ceil(N / 32) blocks (24 for N = 768, each reading G / kRedRows rows per thread)
// instead of ceil(N / 256) blocks each walking all G rows alone.
constexpr int kRedRows = 16;

__global__ void __launch_bounds__(32 * kRedRows)
reduce_partials_kernel(const float* __restrict__ partial, float* __restrict__ out, int G, int N) {
  FB_SHARED(float, sums, kRedRows * 33);  // [kRedRows][32] (+1 pad: column reads hit distinct banks)
  const int n = blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (n < N)
    for (int g = threadIdx.y; g < G; g += kRedRows) s += partial[(int64_t)g * N + n];  // fixed order
  sums[threadIdx.y * 33 + threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && n < N) {
    float t = 0.f;
    for (int r = 0; r < kRedRows; ++r) t += sums[r * 33 + threadIdx.x];  // fixed order: deterministic
    out[n] = t;
  }
}

void launch_reduce_partials(const float* partial, float* out, int G, int N, cudaStream_t stream) {
  if (N <= 0) return;
  if (G <= 0) {
    cudaMemsetAsync(out, 0, sizeof(float) * (size_t)N, stream);
    return;
  }
  auto kern = reduce_partials_kernel;
  FB_LAUNCH(kern, dim3(ceil_div(N, 32)), dim3(32, kRedRows), 0, stream, partial, out, G, N);
  check_launch("reduce_partials_kernel");
}

int pointwise_partials(int64_t M) {
  int64_t g = (M + 31) / 32;
  return (int)(g < 1 ? 1 : (g > 256 ? 256 : g));
}

void check_launch(const char* what) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("fastbert: CUDA launch of ") + what + " failed: " + cudaGetErrorString(e));
#ifdef FASTBERT_CUDA_DEBUG
  e = cudaDeviceSynchronize();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("fastbert: CUDA kernel ") + what + " failed: " + cudaGetErrorString(e));
#endif
}

}  // namespace fb
