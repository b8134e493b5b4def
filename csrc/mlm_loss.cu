// mlm_loss.cu: the cross-entropy row kernel of the sparse MLM loss (fastbert/ops/mlm_chunked.py drives it).
// The decoder matmul (labelled hidden rows @ weight.T) stays in cuBLAS through torch and writes fp32
// logits without the bias; per row r with x = logits[r] + bias and t = targets[r] this kernel computes
//   loss[r] = logsumexp(x) - x[t]      and      grad[r] = grad_scale * (softmax(x) - onehot(t))
// with grad in the GEMM dtype (fp32/bf16/fp16, rounded once; it may alias the logits when fp32).
// t < 0 marks a padding slot (loss 0, zero gradient row); t >= V gives NaN (never an out-of-bounds read).
//
// One block per row. Rows up to kCeResident * 1024 = 32768 columns (BERT's 30528) are read once: each
// thread keeps its VALS values in registers, the block reduces the max, then the sum of exponentials,
// and writes the gradient from the same registers (4 B read + 2 B written per logit for a bf16 gradient).
// Wider rows stream the vocabulary twice (online logsumexp, then the gradient, mostly from L2).
//
// fastbert: kind: *cross_entropy_rows_kernel*: bandwidth
// fastbert: cold: *cross_entropy_rows_kernel<*, 1, *>*: scalar path for V not a multiple of 4 (padded vocabularies are multiples of 64)
#include <cmath>

#include "common.cuh"

namespace fb {

constexpr int kCeResident = 32;  // most fp32 values a thread keeps (1024 threads: 64 registers each)

// Block-wide reduction (max or sum) of one float per thread; every thread gets the result.
// red: kMaxWarps floats of shared memory, not in use by the caller.
template <bool kMax>
__device__ __forceinline__ float ce_block_reduce(float v, float* red) {
  v = kMax ? warp_max(v) : warp_sum(v);
  const int warps = blockDim.x >> 5;
  __syncthreads();  // a previous call's readers are done with red
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float r = red[0];
  for (int w = 1; w < warps; ++w) r = kMax ? fmaxf(r, red[w]) : r + red[w];  // fixed order: deterministic
  return r;
}

// Combine two (max, sum of exp relative to max) pairs; an empty pair has max -inf.
__device__ __forceinline__ void lse_combine(float& m, float& s, float m2, float s2) {
  const float mm = fmaxf(m, m2);
  if (mm == -INFINITY) return;  // both empty (so far)
  s = s * expf(m - mm) + s2 * expf(m2 - mm);
  m = mm;
}

// Add one logit x to a running (max, sum): a -inf x adds nothing, so an all -inf prefix stays empty.
__device__ __forceinline__ void lse_add(float& m, float& s, float x) {
  if (x > m) {
    s = s * expf(m - x) + 1.f;
    m = x;
  } else if (x != -INFINITY) {
    s += expf(x - m);
  }
}

// VEC consecutive columns c..c+VEC-1 of x = logits + bias (fp32), -inf past V.
template <int VEC>
__device__ __forceinline__ void ce_load(const float* __restrict__ row, const float* __restrict__ bias, int c, int V,
                                        float (&v)[VEC]) {
  if (c < V) {  // V % VEC == 0 on the vector path, so a vector is all in or all out
    load_f<float, VEC>(row + c, v);
    if (bias != nullptr) {
      float b[VEC];
      load_f<float, VEC>(bias + c, b);
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[i] += b[i];
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = -INFINITY;
  }
}

// VALS > 0: the row stays in registers (VALS / VEC vectors per thread). VALS == 0: streamed twice.
template <typename G, int VEC, int VALS>
__global__ void __launch_bounds__(1024)
cross_entropy_rows_kernel(const float* __restrict__ logits, const float* __restrict__ bias,
                          const int64_t* __restrict__ targets, float* __restrict__ loss, G* grad, int V,
                          float grad_scale) {
  FB_SHARED(float, red, 32);
  const int64_t r = blockIdx.x;
  const float* row = logits + r * V;
  G* grow = grad != nullptr ? grad + r * V : nullptr;
  const int64_t tgt = targets[r];
  const int step = blockDim.x * VEC;
  if (tgt < 0) {  // padding slot (uniform across the block: no barrier is skipped by some threads only)
    if (threadIdx.x == 0) loss[r] = 0.f;
    if (grow != nullptr) {
      float z[VEC] = {};
      for (int c = threadIdx.x * VEC; c < V; c += step) store_f<G, VEC>(grow + c, z);
    }
    return;
  }
  const bool bad = tgt >= V;
  // x[t] before any gradient store (grad may alias logits); ordered by the reductions' barriers
  const float x_t = bad ? NAN : row[tgt] + (bias != nullptr ? bias[tgt] : 0.f);
  float lse;
  if constexpr (VALS > 0) {
    constexpr int NV = VALS / VEC;
    float x[NV][VEC];
    float m = -INFINITY;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      ce_load<VEC>(row, bias, (k * blockDim.x + threadIdx.x) * VEC, V, x[k]);
#pragma unroll
      for (int i = 0; i < VEC; ++i) m = fmaxf(m, x[k][i]);
    }
    m = ce_block_reduce<true>(m, red);  // -inf only if the whole row is -inf (NaN below, as the reference)
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        x[k][i] = expf(x[k][i] - m);  // 0 for the -inf padding past V
        s += x[k][i];
      }
    }
    s = ce_block_reduce<false>(s, red);
    lse = m + logf(s);
    if (grow != nullptr) {
      const float scale = grad_scale / s;
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int c = (k * blockDim.x + threadIdx.x) * VEC;
        if (c < V) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const float g = x[k][i] * scale;
            x[k][i] = bad ? NAN : (c + i == tgt ? g - grad_scale : g);
          }
          store_f<G, VEC>(grow + c, x[k]);
        }
      }
    }
  } else {
    float m = -INFINITY, s = 0.f;
    for (int c = threadIdx.x * VEC; c < V; c += step) {
      float v[VEC];
      ce_load<VEC>(row, bias, c, V, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) lse_add(m, s, v[i]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
      const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
      lse_combine(m, s, m2, s2);
    }
    // the block's (max, sum) pairs: reduce the max, then rescale each warp's sum to it
    const float mb = ce_block_reduce<true>(m, red);
    const float sw = (m == -INFINITY) ? 0.f : s * expf(m - mb);
    s = ce_block_reduce<false>((threadIdx.x & 31) == 0 ? sw : 0.f, red);
    lse = mb + logf(s);
    if (grow != nullptr) {
      for (int c = threadIdx.x * VEC; c < V; c += step) {
        float v[VEC];
        ce_load<VEC>(row, bias, c, V, v);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float p = expf(v[i] - lse) * grad_scale;
          v[i] = bad ? NAN : (c + i == tgt ? p - grad_scale : p);
        }
        store_f<G, VEC>(grow + c, v);
      }
    }
  }
  if (threadIdx.x == 0) loss[r] = lse - x_t;
}

// The block size and per-thread values for a row of V columns: the whole row in registers when it fits.
struct CeShape {
  int threads, vals;  // vals == 0: streaming
};
inline CeShape ce_shape(int V, int vec) {
  for (int vals : {8, kCeResident}) {
    if (vals % vec) continue;
    int threads = 128;
    while (threads < 1024 && threads * vals < V) threads *= 2;
    if (threads * vals >= V) return {threads, vals};
  }
  return {1024, 0};
}

template <typename G, int VEC>
static void ce_rows_vec(const float* logits, const float* bias, const int64_t* targets, float* loss, G* grad, int n,
                        int V, float grad_scale, cudaStream_t stream) {
  const CeShape sh = ce_shape(V, VEC);
  auto go = [&](auto kern) {
    FB_LAUNCH(kern, dim3(n), dim3(sh.threads), 0, stream, logits, bias, targets, loss, grad, V, grad_scale);
  };
  if (sh.vals == 8)
    go(cross_entropy_rows_kernel<G, VEC, 8>);
  else if (sh.vals == kCeResident)
    go(cross_entropy_rows_kernel<G, VEC, kCeResident>);
  else
    go(cross_entropy_rows_kernel<G, VEC, 0>);
  check_launch("cross_entropy_rows_kernel");
}

template <typename G>
static void ce_rows_typed(const float* logits, const float* bias, const int64_t* targets, float* loss, void* grad,
                          int n, int V, float grad_scale, cudaStream_t stream) {
  G* g = static_cast<G*>(grad);
  // fp32 logits and bias in 16-byte vectors; the gradient then moves 4 elements (8 bytes for bf16) at once
  if (vec_width<float>(V, {logits, bias}) == 4 && (reinterpret_cast<uintptr_t>(grad) % (4 * sizeof(G))) == 0)
    ce_rows_vec<G, 4>(logits, bias, targets, loss, g, n, V, grad_scale, stream);
  else
    ce_rows_vec<G, 1>(logits, bias, targets, loss, g, n, V, grad_scale, stream);
}

// logits [n, V] fp32 contiguous (without the bias), bias [V] fp32 or null, targets [n] int64, loss [n] fp32
// output; grad [n, V] of grad_dtype (may be logits itself when fp32) or null for the loss only.
void launch_cross_entropy_rows(const float* logits, const float* bias, const int64_t* targets, float* loss,
                               int grad_dtype, void* grad, int n, int V, float grad_scale, cudaStream_t stream) {
  if (n <= 0) return;
  if (V <= 0) throw std::invalid_argument("cross_entropy_rows: V must be positive");
  with_float_dtype(grad == nullptr ? kF32 : grad_dtype, "cross_entropy_rows", [&](auto tag) {
    ce_rows_typed<decltype(tag)>(logits, bias, targets, loss, grad, n, V, grad_scale, stream);
  });
}

}  // namespace fb
