// host_entry.cpp: the cuda_host test backend. Compiles the CUDA kernel sources of csrc/ as host C++
// through cuda_host_emu.h (one translation unit) and exposes their launchers as extern "C" functions
// for ctypes (fastbert/cuda_host_backend.py). Every entry returns nullptr on success or an error
// message (valid until the next call on this thread); exceptions never cross into Python.
#include "cuda_host_emu.h"
#include "common.cuh"

#include "common.cu"
#include "padding.cu"
#include "bias_gelu.cu"
#include "geglu.cu"
#include "layer_norm.cu"
#include "mlm_loss.cu"
#include "flash_attn.cu"

namespace {
thread_local std::string g_error;

template <typename F>
const char* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    g_error = e.what();
  } catch (...) {
    g_error = "unknown C++ exception";
  }
  return g_error.c_str();
}
}  // namespace

#define FBH_API extern "C" __attribute__((visibility("default")))

FBH_API void fbh_reload_config() { emu::reload_config(); }
// Guard zones for the checking build (n >= 0 sets them, n = 0 clears); returns whether this is a checking build.
FBH_API int fbh_memcheck_set(const uint64_t* lo_hi, const int* after, const char* const* what, int n) {
#ifdef FB_EMU_CHECK
  if (n >= 0) emu::check::set_guards(lo_hi, after, what, n);
  return 1;
#else
  (void)lo_hi, (void)after, (void)what, (void)n;
  return 0;
#endif
}
FBH_API int fbh_pointwise_partials(int64_t M) { return fb::pointwise_partials(M); }
FBH_API int fbh_layer_norm_max_n() { return fb::layer_norm_max_n(); }
FBH_API int fbh_layer_norm_bwd_num_partials(int M, int N) { return fb::layer_norm_bwd_num_partials(M, N); }

FBH_API const char* fbh_index_gather(const void* x, void* out, const int64_t* idx, int64_t T, int64_t R,
                                     int64_t row_bytes) {
  return guarded([&] { fb::launch_index_gather(x, out, idx, T, R, row_bytes, nullptr); });
}
FBH_API const char* fbh_index_scatter(const void* x, void* out, const int64_t* idx, int64_t T, int64_t num_rows,
                                      int64_t row_bytes) {
  return guarded([&] { fb::launch_index_scatter(x, out, idx, T, num_rows, row_bytes, nullptr); });
}
FBH_API const char* fbh_bias_gelu_fwd(int dtype, const void* x, const float* bias, void* y, int M, int N, int tanh) {
  return guarded([&] { fb::launch_bias_gelu_fwd(dtype, x, bias, y, M, N, tanh != 0, nullptr); });
}
FBH_API const char* fbh_bias_gelu_bwd(int dtype, const void* dy, const void* x, const float* bias, void* dx,
                                      float* part, float* dbias, int M, int N, int tanh) {
  return guarded([&] { fb::launch_bias_gelu_bwd(dtype, dy, x, bias, dx, part, dbias, M, N, tanh != 0, nullptr); });
}
FBH_API const char* fbh_geglu_fwd(int dtype, const void* x, const float* bias, void* y, int M, int N, int tanh) {
  return guarded([&] { fb::launch_geglu_fwd(dtype, x, bias, y, M, N, tanh != 0, nullptr); });
}
FBH_API const char* fbh_geglu_bwd(int dtype, const void* dy, const void* x, const float* bias, void* dx, float* part,
                                  float* dbias, int M, int N, int tanh) {
  return guarded([&] { fb::launch_geglu_bwd(dtype, dy, x, bias, dx, part, dbias, M, N, tanh != 0, nullptr); });
}
FBH_API const char* fbh_layer_norm_fwd(int dtype, const void* x, const void* res, const float* w, const float* b,
                                       void* y, void* z, float* mean, float* rstd, int M, int N, float eps) {
  return guarded([&] { fb::launch_layer_norm_fwd(dtype, x, res, w, b, y, z, mean, rstd, M, N, eps, nullptr); });
}
FBH_API const char* fbh_layer_norm_bwd(int dtype, const void* dy, const void* z, const float* w, const float* mean,
                                       const float* rstd, const void* dz_extra, void* dz, float* part_dw,
                                       float* part_db, float* dw, float* db, int M, int N, int G) {
  return guarded([&] {
    fb::launch_layer_norm_bwd(dtype, dy, z, w, mean, rstd, dz_extra, dz, part_dw, part_db, dw, db, M, N, G, nullptr);
  });
}
FBH_API const char* fbh_cross_entropy_rows(const float* logits, const float* bias, const int64_t* targets,
                                           float* loss, int grad_dtype, void* grad, int n, int V, float grad_scale) {
  return guarded([&] {
    fb::launch_cross_entropy_rows(logits, bias, targets, loss, grad_dtype, grad, n, V, grad_scale, nullptr);
  });
}
FBH_API const char* fbh_flash_attn_fwd(int dtype, const void* q, const void* k, const void* v, int64_t q_st,
                                       int64_t q_sh, int64_t k_st, int64_t k_sh, int64_t v_st, int64_t v_sh, void* out,
                                       float* lse, const int32_t* cu_seqlens, const float* slopes, int batch,
                                       int heads, int head_dim, int64_t total, int max_seqlen, float scale,
                                       int win_left, int win_right, int32_t* visits) {
  return guarded([&] {
    fb::launch_flash_attn_fwd(dtype, q, k, v, q_st, q_sh, k_st, k_sh, v_st, v_sh, out, lse, cu_seqlens, slopes, batch,
                              heads, head_dim, total, max_seqlen, scale, win_left, win_right, visits, nullptr);
  });
}
FBH_API const char* fbh_flash_attn_bwd(int dtype, const void* dout, const void* q, const void* k, const void* v,
                                       int64_t q_st, int64_t q_sh, int64_t k_st, int64_t k_sh, int64_t v_st,
                                       int64_t v_sh, const float* lse, void* dq, void* dk, void* dv, float* delta,
                                       const int32_t* cu_seqlens, const float* slopes, int batch, int heads,
                                       int head_dim, int64_t total, int max_seqlen, float scale, int win_left,
                                       int win_right, int32_t* visits) {
  return guarded([&] {
    fb::launch_flash_attn_bwd(dtype, dout, q, k, v, q_st, q_sh, k_st, k_sh, v_st, v_sh, lse, dq, dk, dv, delta,
                              cu_seqlens, slopes, batch, heads, head_dim, total, max_seqlen, scale, win_left,
                              win_right, visits, nullptr);
  });
}
