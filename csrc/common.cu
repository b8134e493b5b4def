// common.cu: the shared non-template pieces of common.cuh (one definition for the whole extension).
#include "common.cuh"

namespace fb {

__global__ void reduce_partials_kernel(const float* __restrict__ partial, float* __restrict__ out, int G, int N) {
  int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  float s = 0.f;
  for (int g = 0; g < G; ++g) s += partial[(int64_t)g * N + n];  // fixed order: deterministic
  out[n] = s;
}

void launch_reduce_partials(const float* partial, float* out, int G, int N, cudaStream_t stream) {
  if (N <= 0) return;
  if (G <= 0) {
    cudaMemsetAsync(out, 0, sizeof(float) * (size_t)N, stream);
    return;
  }
  auto kern = reduce_partials_kernel;
  FB_LAUNCH(kern, dim3(ceil_div(N, 256)), dim3(256), 0, stream, partial, out, G, N);
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
