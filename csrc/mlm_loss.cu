// mlm_loss.cu: the cross-entropy row kernel of the sparse MLM loss. The decoder matmul (hidden rows
// with a label @ weight.T + bias) stays in cuBLAS through torch; this kernel takes the logits of a
// chunk of labelled rows and, per row, computes
//   loss[r] = logsumexp(logits[r, :]) - logits[r, target[r]]
// and overwrites the logits with the gradient  grad_scale * (softmax(logits[r, :]) - onehot(target[r])),
// so the chunk needs no second [n, V] buffer. One block (256 threads) per row: pass 1 keeps a running
// (max, sum of exp) per thread (online softmax), combined across the block; pass 2 writes the gradient.
// A target outside [0, V) gives a NaN loss for that row (visible, never an out-of-bounds read).
#include <cmath>

#include "common.cuh"

namespace fb {

constexpr int kCeThreads = 256;

// Combine two (max, sum of exp relative to max) pairs.
__device__ __forceinline__ void lse_combine(float& m, float& s, float m2, float s2) {
  const float mm = fmaxf(m, m2);
  if (mm == -INFINITY) return;  // both empty
  s = s * expf(m - mm) + s2 * expf(m2 - mm);
  m = mm;
}

// Add one logit x to a running (max, sum): one exp per element.
__device__ __forceinline__ void lse_add(float& m, float& s, float x) {
  if (x > m) {
    s = s * expf(m - x) + 1.f;
    m = x;
  } else if (x != -INFINITY) {
    s += expf(x - m);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kCeThreads)
cross_entropy_rows_kernel(T* __restrict__ logits, const int64_t* __restrict__ targets, float* __restrict__ loss,
                          int V, float grad_scale, bool write_grad) {
  FB_SHARED(float, red_m, kCeThreads / 32);
  FB_SHARED(float, red_s, kCeThreads / 32);
  FB_SHARED(float, tgt_logit, 1);
  T* row = logits + (int64_t)blockIdx.x * V;
  const int64_t tgt = targets[blockIdx.x];
  const bool tgt_ok = tgt >= 0 && tgt < V;
  if (threadIdx.x == 0) tgt_logit[0] = tgt_ok ? Cvt<T>::to_f(row[tgt]) : NAN;  // read before any overwrite
  float m = -INFINITY, s = 0.f;
  for (int c = threadIdx.x * VEC; c < V; c += kCeThreads * VEC) {
    float v[VEC];
    load_f<T, VEC>(row + c, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) lse_add(m, s, v[i]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
    lse_combine(m, s, m2, s2);
  }
  if ((threadIdx.x & 31) == 0) {
    red_m[threadIdx.x >> 5] = m;
    red_s[threadIdx.x >> 5] = s;
  }
  __syncthreads();  // also orders thread 0's read of the target logit before the writes below
  m = red_m[0];
  s = red_s[0];
  for (int w = 1; w < kCeThreads / 32; ++w) lse_combine(m, s, red_m[w], red_s[w]);
  const float lse = m + logf(s);
  if (threadIdx.x == 0) loss[blockIdx.x] = lse - tgt_logit[0];
  if (!write_grad) return;
  for (int c = threadIdx.x * VEC; c < V; c += kCeThreads * VEC) {
    float v[VEC];
    load_f<T, VEC>(row + c, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float p = expf(v[i] - lse);
      v[i] = grad_scale * (c + i == tgt ? p - 1.f : p);
    }
    store_f<T, VEC>(row + c, v);
  }
}

template <typename T>
static void ce_rows_typed(void* logits, const int64_t* targets, float* loss, int n, int V, float grad_scale,
                          bool write_grad, cudaStream_t stream) {
  T* lt = static_cast<T*>(logits);
  constexpr int VV = 16 / sizeof(T);
  if (vec_width<T>(V, {logits}) == VV) {
    auto kern = cross_entropy_rows_kernel<T, VV>;
    FB_LAUNCH(kern, dim3(n), dim3(kCeThreads), 0, stream, lt, targets, loss, V, grad_scale, write_grad);
  } else {
    auto kern = cross_entropy_rows_kernel<T, 1>;
    FB_LAUNCH(kern, dim3(n), dim3(kCeThreads), 0, stream, lt, targets, loss, V, grad_scale, write_grad);
  }
  check_launch("cross_entropy_rows_kernel");
}

// logits [n, V] contiguous of `dtype` (overwritten with the scaled gradient), targets [n] int64,
// loss [n] fp32 output; with write_grad false the logits are left untouched.
void launch_cross_entropy_rows(int dtype, void* logits, const int64_t* targets, float* loss, int n, int V,
                               float grad_scale, bool write_grad, cudaStream_t stream) {
  if (n <= 0) return;
  if (V <= 0) throw std::invalid_argument("cross_entropy_rows: V must be positive");
  switch (dtype) {
    case kF32: ce_rows_typed<float>(logits, targets, loss, n, V, grad_scale, write_grad, stream); break;
    case kF16: ce_rows_typed<__half>(logits, targets, loss, n, V, grad_scale, write_grad, stream); break;
    case kBF16: ce_rows_typed<__nv_bfloat16>(logits, targets, loss, n, V, grad_scale, write_grad, stream); break;
    default: throw std::invalid_argument("cross_entropy_rows: unsupported dtype code " + std::to_string(dtype));
  }
}

}  // namespace fb
