// launchers.h: the host-callable launchers of csrc/*.cu (raw pointers, sizes, a stream; no torch).
// Included by bindings.cpp (the torch extension) and host_entry.cpp (the cuda_host emulation build).
// dtype codes: fb::kF32 / kF16 / kBF16 (common.cuh). Tensors are contiguous unless a stride is given.
#pragma once
#include <cstdint>

#include "dtypes.h"

namespace fb {

// common.cu
void launch_reduce_partials(const float* partial, float* out, int G, int N, cudaStream_t stream);

// padding.cu
void launch_index_gather(const void* x, void* out, const int64_t* indices, int64_t T, int64_t R, int64_t row_bytes,
                         cudaStream_t stream);
void launch_index_scatter(const void* x, void* out, const int64_t* indices, int64_t T, int64_t num_rows,
                          int64_t row_bytes, cudaStream_t stream);

// bias_gelu.cu / geglu.cu (bias fp32; part_db: fp32 workspace of pointwise_partials(M) * N (geglu: 2N) floats)
int pointwise_partials(int64_t M);
void launch_bias_gelu_fwd(int dtype, const void* x, const float* bias, void* y, int M, int N, bool tanh_approx,
                          cudaStream_t stream);
void launch_bias_gelu_bwd(int dtype, const void* dy, const void* x, const float* bias, void* dx, float* part_db,
                          float* dbias, int M, int N, bool tanh_approx, cudaStream_t stream);
void launch_geglu_fwd(int dtype, const void* x, const float* bias, void* y, int M, int N, bool tanh_approx,
                      cudaStream_t stream);
void launch_geglu_bwd(int dtype, const void* dy, const void* x, const float* bias, void* dx, float* part_db,
                      float* dbias, int M, int N, bool tanh_approx, cudaStream_t stream);

// layer_norm.cu (weight/bias fp32; part_dw/part_db: G * N floats, G = layer_norm_bwd_num_partials(M, N))
int layer_norm_max_n();
int layer_norm_bwd_num_partials(int M, int N);
void launch_layer_norm_fwd(int dtype, const void* x, const void* res, const float* w, const float* b, void* y,
                           void* z, float* mean, float* rstd, int M, int N, float eps, cudaStream_t stream);
void launch_layer_norm_bwd(int dtype, const void* dy, const void* z, const float* w, const float* mean,
                           const float* rstd, const void* dz_extra, void* dz, float* part_dw, float* part_db,
                           float* dw, float* db, int M, int N, int G, cudaStream_t stream);

// mlm_loss.cu (logits [n, V] fp32 without the bias, bias [V] fp32 or null, grad [n, V] of grad_dtype or null:
// grad_scale * (softmax - onehot), may alias logits when fp32; targets < 0: padding rows, >= V: NaN)
void launch_cross_entropy_rows(const float* logits, const float* bias, const int64_t* targets, float* loss,
                               int grad_dtype, void* grad, int n, int V, float grad_scale, cudaStream_t stream);

// flash_attn.cu (dtype kF16 / kBF16 only; head_dim 32, 64 or 128). q, k, v: [T, H, D] with unit stride over
// D and the given token / head strides (elements); out, dout, dq, dk, dv: contiguous [T, H, D]; lse, delta:
// [H, T] fp32 (delta: workspace of the backward); cu_seqlens [batch + 1] int32; alibi_slopes [batch, heads]
// fp32 or nullptr; window_left / window_right: flash-attn's window_size (-1: unbounded on that side);
// visits: nullptr, or (tests) a zeroed int32 buffer receiving the tiles each block visited ([heads, batch,
// blocks] for the forward, twice that for the backward: dq kernel then dkdv kernel). Throws
// std::invalid_argument for an unsupported dtype / head dim / window.
void launch_flash_attn_fwd(int dtype, const void* q, const void* k, const void* v, int64_t q_stride_t,
                           int64_t q_stride_h, int64_t k_stride_t, int64_t k_stride_h, int64_t v_stride_t,
                           int64_t v_stride_h, void* out, float* lse, const int32_t* cu_seqlens,
                           const float* alibi_slopes, int batch, int heads, int head_dim, int64_t total_tokens,
                           int max_seqlen, float softmax_scale, int window_left, int window_right,
                           int32_t* visits, cudaStream_t stream);
void launch_flash_attn_bwd(int dtype, const void* dout, const void* q, const void* k, const void* v,
                           int64_t q_stride_t, int64_t q_stride_h, int64_t k_stride_t, int64_t k_stride_h,
                           int64_t v_stride_t, int64_t v_stride_h, const float* lse, void* dq, void* dk, void* dv,
                           float* delta, const int32_t* cu_seqlens, const float* alibi_slopes, int batch,
                           int heads, int head_dim, int64_t total_tokens, int max_seqlen, float softmax_scale,
                           int window_left, int window_right, int32_t* visits, cudaStream_t stream);

}  // namespace fb
