// bindings.cpp: the one file of fastbert._C that sees torch. For each backend primitive (signatures:
// fastbert/reference.py) it checks the inputs with the same messages as the Python layer
// (fastbert/ops/_checks.py), allocates the outputs, and calls the torch-free launchers of csrc/*.cu
// on the current CUDA stream. fastbert/cuda_backend.py exposes these as the `cuda` backend.
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <optional>
#include <string>
#include <tuple>

#include "launchers.h"

namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;

std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kDouble: return "torch.float64";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// A shape as Python prints a tuple: (), (4,), (4, 8).
std::string shape_str(const Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + (t.dim() == 1 ? ",)" : ")");
}

// Input checks, with the messages of the Python layer (fastbert/ops/_checks.py). `name` is the argument.
void check_cuda(const char* name, const Tensor& t) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor (fastbert._C runs on the GPU; use the torch or triton "
              "backend for CPU tensors), got a tensor on ", t.device());
}
void check_device(const char* name, const Tensor& t, const Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected a tensor on ", ref.device(),
              " (the device of the other inputs), got ", t.device());
}
void check_dim(const char* name, const Tensor& t, int64_t d) {
  TORCH_CHECK(t.dim() == d, name, ": expected a ", d, "-D tensor, got shape ", shape_str(t));
}
void check_dtype(const char* name, const Tensor& t, at::ScalarType want) {  // one allowed dtype
  TORCH_CHECK(t.scalar_type() == want, name, ": expected dtype in ['", py_dtype(want), "'], got ",
              py_dtype(t.scalar_type()));
}
void check_dtype_like(const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", py_dtype(ref.scalar_type()),
              " (the dtype of ", ref_name, "), got ", py_dtype(t.scalar_type()));
}
void check_shape_like(const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) {
  TORCH_CHECK(t.sizes() == ref.sizes(), name, ": expected shape ", shape_str(ref), " (the shape of ", ref_name,
              "), got ", shape_str(t));
}
// Same device, shape and dtype as `ref` (in that order).
void check_like(const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) {
  check_device(name, t, ref);
  check_shape_like(name, t, ref_name, ref);
  check_dtype_like(name, t, ref_name, ref);
}

int dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return fb::kF32;
    case at::kHalf: return fb::kF16;
    case at::kBFloat16: return fb::kBF16;
    default: TORCH_CHECK(false, "unsupported dtype ", py_dtype(t.scalar_type()));
  }
  return -1;
}

// A 2-D contiguous floating input on the GPU.
void check_matrix(const char* name, const Tensor& t) {
  check_cuda(name, t);
  check_dim(name, t, 2);
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              name, ": expected dtype in ['torch.float16', 'torch.bfloat16', 'torch.float32'], got ",
              py_dtype(t.scalar_type()));
  TORCH_CHECK(t.size(0) < INT_MAX && t.size(1) < INT_MAX, name, ": dimensions must be below 2^31, got shape ",
              shape_str(t));
}

// An optional [n] parameter vector, returned as fp32 contiguous (what the kernels take) or undefined.
Tensor param_f32(const char* name, const OptT& t, int64_t n, const Tensor& ref) {
  if (!t.has_value() || !t->defined()) return Tensor();
  const Tensor& v = *t;
  check_device(name, v, ref);
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n, name, ": expected shape (", n,
              ",) to match the last dim of the input, got ", shape_str(v));
  TORCH_CHECK(v.is_floating_point(), name, ": expected a floating tensor, got ", py_dtype(v.scalar_type()));
  return v.to(at::kFloat).contiguous();
}

// An optional tensor that must match `ref` in device, shape and dtype: contiguous, or undefined if absent.
Tensor optional_like(const char* name, const OptT& t, const char* ref_name, const Tensor& ref) {
  if (!t.has_value() || !t->defined()) return Tensor();
  check_like(name, *t, ref_name, ref);
  return t->contiguous();
}

// Null for an undefined (absent) tensor. Only for tensors this file allocated or made contiguous.
float* fptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }
void* vptr(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// A gradient computed in fp32, returned in the parameter's dtype (or absent).
OptT grad_as(const Tensor& g, at::ScalarType dtype) {
  OptT out;
  if (g.defined()) out = g.to(dtype);
  return out;
}

// The dbias of a pointwise backward over [M, n] columns: the fp32 partial rows the kernel writes
// (pointwise_partials(M) * n) and the fp32 result [n]; both undefined when there is no bias.
struct DbiasWorkspace {
  Tensor part, db;
};
DbiasWorkspace dbias_workspace(const Tensor& b, int M, int64_t n, const Tensor& x) {
  DbiasWorkspace w;
  if (b.defined()) {
    w.part = at::empty({(int64_t)fb::pointwise_partials(M) * n}, x.options().dtype(at::kFloat));
    w.db = at::empty({n}, x.options().dtype(at::kFloat));
  }
  return w;
}

void check_approximate(const std::string& a) {
  TORCH_CHECK(a == "none" || a == "tanh", "approximate: expected 'none' (erf GELU) or 'tanh', got '", a, "'");
}

void check_indices(const Tensor& idx, const Tensor& ref) {
  check_device("indices", idx, ref);
  check_dtype("indices", idx, at::kLong);
  check_dim("indices", idx, 1);
}

// ---- padding -----------------------------------------------------------------------------------
Tensor index_gather_fwd(const Tensor& x_, const Tensor& indices) {
  check_cuda("x", x_);
  check_indices(indices, x_);
  TORCH_CHECK(x_.dim() >= 1, "x: expected at least 1 dims, got shape ", shape_str(x_));
  const c10::cuda::CUDAGuard guard(x_.device());
  Tensor x = x_.contiguous(), idx = indices.contiguous();
  auto sizes = x.sizes().vec();
  const int64_t R = sizes[0];
  sizes[0] = idx.size(0);
  Tensor out = at::empty(sizes, x.options());
  const int64_t row_bytes = R ? x.numel() / R * x.element_size() : 0;
  fb::launch_index_gather(x.data_ptr(), out.data_ptr(), idx.data_ptr<int64_t>(), idx.size(0), R, row_bytes,
                          at::cuda::getCurrentCUDAStream());
  return out;
}

Tensor index_scatter_fwd(const Tensor& x_, const Tensor& indices, int64_t num_rows) {
  check_cuda("x", x_);
  check_indices(indices, x_);
  TORCH_CHECK(x_.dim() >= 1 && x_.size(0) == indices.size(0), "x: expected ", indices.size(0),
              " rows (one per index), got shape ", shape_str(x_));
  TORCH_CHECK(num_rows >= 0, "num_rows: expected a non-negative int, got ", num_rows);
  const c10::cuda::CUDAGuard guard(x_.device());
  Tensor x = x_.contiguous(), idx = indices.contiguous();
  auto sizes = x.sizes().vec();
  sizes[0] = num_rows;
  Tensor out = at::empty(sizes, x.options());
  const int64_t row_bytes = num_rows ? out.numel() / num_rows * out.element_size() : 0;
  fb::launch_index_scatter(x.data_ptr(), out.data_ptr(), idx.data_ptr<int64_t>(), idx.size(0), num_rows, row_bytes,
                           at::cuda::getCurrentCUDAStream());
  return out;
}

// ---- bias + GELU, GeGLU ------------------------------------------------------------------------
Tensor bias_gelu_fwd(const Tensor& x, const OptT& bias, const std::string& approximate) {
  check_matrix("x", x);
  check_approximate(approximate);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor b = param_f32("bias", bias, x.size(1), x);
  Tensor y = at::empty_like(x);
  fb::launch_bias_gelu_fwd(dtype_code(x), x.data_ptr(), fptr(b), y.data_ptr(), x.size(0), x.size(1),
                           approximate == "tanh", at::cuda::getCurrentCUDAStream());
  return y;
}

std::tuple<Tensor, OptT> bias_gelu_bwd(const Tensor& dy, const Tensor& x, const OptT& bias,
                                       const std::string& approximate) {
  check_matrix("x", x);
  check_matrix("dy", dy);
  check_like("dy", dy, "x", x);
  check_approximate(approximate);
  const c10::cuda::CUDAGuard guard(x.device());
  const int M = x.size(0), N = x.size(1);
  Tensor b = param_f32("bias", bias, N, x);
  Tensor dx = at::empty_like(x);
  DbiasWorkspace ws = dbias_workspace(b, M, N, x);
  fb::launch_bias_gelu_bwd(dtype_code(x), dy.data_ptr(), x.data_ptr(), fptr(b), dx.data_ptr(), fptr(ws.part),
                           fptr(ws.db), M, N, approximate == "tanh", at::cuda::getCurrentCUDAStream());
  return {dx, grad_as(ws.db, b.defined() ? bias->scalar_type() : x.scalar_type())};
}

Tensor geglu_fwd(const Tensor& x, const OptT& bias, const std::string& approximate) {
  check_matrix("x", x);
  TORCH_CHECK(x.size(1) % 2 == 0, "x: expected an even last dim (two halves), got shape ", shape_str(x));
  check_approximate(approximate);
  const c10::cuda::CUDAGuard guard(x.device());
  const int M = x.size(0), N = x.size(1) / 2;
  Tensor b = param_f32("bias", bias, x.size(1), x);
  Tensor y = at::empty({M, N}, x.options());
  fb::launch_geglu_fwd(dtype_code(x), x.data_ptr(), fptr(b), y.data_ptr(), M, N, approximate == "tanh",
                       at::cuda::getCurrentCUDAStream());
  return y;
}

std::tuple<Tensor, OptT> geglu_bwd(const Tensor& dy, const Tensor& x, const OptT& bias,
                                   const std::string& approximate) {
  check_matrix("x", x);
  check_matrix("dy", dy);
  check_device("dy", dy, x);
  check_dtype_like("dy", dy, "x", x);
  TORCH_CHECK(x.size(1) % 2 == 0, "x: expected an even last dim (two halves), got shape ", shape_str(x));
  TORCH_CHECK(dy.size(0) == x.size(0) && dy.size(1) * 2 == x.size(1), "dy: expected shape (", x.size(0), ", ",
              x.size(1) / 2, ") (half the last dim of x), got ", shape_str(dy));
  check_approximate(approximate);
  const c10::cuda::CUDAGuard guard(x.device());
  const int M = x.size(0), N = x.size(1) / 2;
  Tensor b = param_f32("bias", bias, x.size(1), x);
  Tensor dx = at::empty_like(x);
  DbiasWorkspace ws = dbias_workspace(b, M, 2 * (int64_t)N, x);
  fb::launch_geglu_bwd(dtype_code(x), dy.data_ptr(), x.data_ptr(), fptr(b), dx.data_ptr(), fptr(ws.part),
                       fptr(ws.db), M, N, approximate == "tanh", at::cuda::getCurrentCUDAStream());
  return {dx, grad_as(ws.db, b.defined() ? bias->scalar_type() : x.scalar_type())};
}

// ---- LayerNorm ---------------------------------------------------------------------------------
std::tuple<Tensor, OptT, Tensor, Tensor> layer_norm_fwd(const Tensor& x, const OptT& weight, const OptT& bias,
                                                        const OptT& residual, double eps) {
  check_matrix("x", x);
  const int M = x.size(0), N = x.size(1);
  TORCH_CHECK(N <= fb::layer_norm_max_n(), "x: the CUDA LayerNorm keeps a row in registers: N <= ",
              fb::layer_norm_max_n(), ", got shape ", shape_str(x));
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor w = param_f32("weight", weight, N, x);
  Tensor b = param_f32("bias", bias, N, x);
  Tensor res = optional_like("residual", residual, "x", x);
  Tensor y = at::empty_like(x);
  Tensor z = res.defined() ? at::empty_like(x) : Tensor();
  Tensor mean = at::empty({M}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({M}, x.options().dtype(at::kFloat));
  fb::launch_layer_norm_fwd(dtype_code(x), x.data_ptr(), vptr(res), fptr(w), fptr(b), y.data_ptr(), vptr(z),
                            mean.data_ptr<float>(), rstd.data_ptr<float>(), M, N, (float)eps,
                            at::cuda::getCurrentCUDAStream());
  OptT zo;
  if (z.defined()) zo = z;
  return {y, zo, mean, rstd};
}

std::tuple<Tensor, OptT, OptT> layer_norm_bwd(const Tensor& dy, const Tensor& z, const OptT& weight, bool has_bias,
                                              const Tensor& mean, const Tensor& rstd, const OptT& dz_extra) {
  check_matrix("z", z);
  check_matrix("dy", dy);
  check_like("dy", dy, "z", z);
  const int M = z.size(0), N = z.size(1);
  TORCH_CHECK(N <= fb::layer_norm_max_n(), "z: the CUDA LayerNorm keeps a row in registers: N <= ",
              fb::layer_norm_max_n(), ", got shape ", shape_str(z));
  for (auto* p : {&mean, &rstd}) {
    const char* name = p == &mean ? "mean" : "rstd";
    check_device(name, *p, z);
    TORCH_CHECK(p->dim() == 1 && p->size(0) == M, name, ": expected shape (", M, ",), got ", shape_str(*p));
  }
  const c10::cuda::CUDAGuard guard(z.device());
  Tensor w = param_f32("weight", weight, N, z);
  Tensor mean32 = mean.to(at::kFloat).contiguous(), rstd32 = rstd.to(at::kFloat).contiguous();
  Tensor dze = optional_like("dz_extra", dz_extra, "z", z);
  const int G = fb::layer_norm_bwd_num_partials(M, N);
  auto f32 = z.options().dtype(at::kFloat);
  Tensor dz = at::empty_like(z);
  Tensor part_dw = w.defined() ? at::empty({(int64_t)G * N}, f32) : Tensor();
  Tensor part_db = has_bias ? at::empty({(int64_t)G * N}, f32) : Tensor();
  Tensor dw = w.defined() ? at::empty({N}, f32) : Tensor();
  Tensor db = has_bias ? at::empty({N}, f32) : Tensor();
  fb::launch_layer_norm_bwd(dtype_code(z), dy.data_ptr(), z.data_ptr(), fptr(w), mean32.data_ptr<float>(),
                            rstd32.data_ptr<float>(), vptr(dze), dz.data_ptr(), fptr(part_dw), fptr(part_db),
                            fptr(dw), fptr(db), M, N, G, at::cuda::getCurrentCUDAStream());
  const at::ScalarType param_dtype = w.defined() ? weight->scalar_type() : dy.scalar_type();
  return {dz, grad_as(dw, param_dtype), grad_as(db, param_dtype)};
}

// ---- MLM loss row kernel -----------------------------------------------------------------------
// logits [n, V] fp32 contiguous (without the bias), targets [n] int64, bias [V] fp32 or None, grad [n, V]
// contiguous fp32/bf16/fp16 or None (written with grad_scale * (softmax - onehot); may be logits itself)
// -> loss [n] fp32. A negative target is a padding row (loss 0, zero gradient); a target >= V gives NaN.
Tensor cross_entropy_rows(const Tensor& logits, const Tensor& targets, const OptT& bias, const OptT& grad,
                          double grad_scale) {
  check_matrix("logits", logits);
  check_dtype("logits", logits, at::kFloat);
  check_device("targets", targets, logits);
  check_dtype("targets", targets, at::kLong);
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0), "targets: expected shape (", logits.size(0),
              ",), got ", shape_str(targets));
  const int64_t V = logits.size(1);
  Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = *bias;
    check_device("bias", b, logits);
    check_dtype("bias", b, at::kFloat);
    TORCH_CHECK(b.dim() == 1 && b.size(0) == V && b.is_contiguous(), "bias: expected a contiguous (", V,
                ",) tensor, got ", shape_str(b));
  }
  Tensor g;
  if (grad.has_value() && grad->defined()) {
    g = *grad;
    check_matrix("grad", g);
    check_device("grad", g, logits);
    check_shape_like("grad", g, "logits", logits);
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  Tensor tgt = targets.contiguous();
  Tensor loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  fb::launch_cross_entropy_rows(logits.data_ptr<float>(), fptr(b), tgt.data_ptr<int64_t>(), loss.data_ptr<float>(),
                                g.defined() ? dtype_code(g) : fb::kF32, vptr(g), logits.size(0), V,
                                (float)grad_scale, at::cuda::getCurrentCUDAStream());
  return loss;
}

// ---- attention (csrc/flash_attn.cu) ------------------------------------------------------------
// Metadata checks only (messages as fastbert/ops/_checks.py); the values of cu_seqlens are checked by
// the Python layer, since reading them here would cost a host sync per call.
void check_attn_qkv(const Tensor& q, const Tensor& k, const Tensor& v) {
  check_cuda("q", q);
  check_dim("q", q, 3);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "q: the CUDA attention kernels take torch.float16 or torch.bfloat16 (tensor cores), got ",
              py_dtype(q.scalar_type()), "; use the triton or torch backend for it");
  const int64_t D = q.size(2);
  TORCH_CHECK(D == 32 || D == 64 || D == 128, "q: head dim ", D, " is not supported; expected one of (32, 64, 128)");
  TORCH_CHECK(q.size(0) < INT_MAX && q.size(1) <= 65535, "q: expected fewer than 2^31 tokens and at most 65535 heads, "
              "got shape ", shape_str(q));
  const char* names[2] = {"k", "v"};
  const Tensor* ts[2] = {&k, &v};
  for (int i = 0; i < 2; ++i) {
    check_device(names[i], *ts[i], q);
    check_dim(names[i], *ts[i], 3);
    check_dtype_like(names[i], *ts[i], "q", q);
    check_shape_like(names[i], *ts[i], "q", q);
  }
  const char* all[3] = {"q", "k", "v"};
  const Tensor* ats[3] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i)
    TORCH_CHECK(ats[i]->stride(2) == 1, all[i], ": expected the last dim to be contiguous (stride 1), got strides ",
                ats[i]->strides());
}

// cu_seqlens [B+1] int32 contiguous; slopes [H] or [B, H] -> [B, H] fp32 contiguous (undefined if absent).
Tensor attn_meta(const Tensor& q, const Tensor& cu, int64_t max_seqlen, const OptT& slopes) {
  check_device("cu_seqlens", cu, q);
  check_dtype("cu_seqlens", cu, at::kInt);
  check_dim("cu_seqlens", cu, 1);
  TORCH_CHECK(cu.size(0) >= 2 && cu.size(0) - 1 <= 65535, "cu_seqlens: expected shape [batch + 1] with 1 <= batch "
              "<= 65535, got ", shape_str(cu));
  TORCH_CHECK(cu.is_contiguous(), "cu_seqlens: expected a contiguous tensor");
  TORCH_CHECK(max_seqlen >= 0 && max_seqlen < INT_MAX, "max_seqlen: expected a non-negative int, got ", max_seqlen);
  if (!slopes.has_value() || !slopes->defined()) return Tensor();
  const Tensor& s = *slopes;
  const int64_t B = cu.size(0) - 1, H = q.size(1);
  check_device("alibi_slopes", s, q);
  check_dtype("alibi_slopes", s, at::kFloat);
  TORCH_CHECK((s.dim() == 1 && s.size(0) == H) || (s.dim() == 2 && s.size(0) == B && s.size(1) == H),
              "alibi_slopes: expected shape (", H, ",) or (", B, ", ", H, "), got ", shape_str(s));
  return s.expand({B, H}).contiguous();
}

// The softmax scale: as given, else 1 / sqrt(head dim).
double attn_scale(const std::optional<double>& softmax_scale, int64_t D) {
  return softmax_scale.has_value() ? *softmax_scale : 1.0 / std::sqrt((double)D);
}

// window_size (left, right) as flash-attn takes it: each side -1 (unbounded) or >= 0. A side longer than
// any sequence is clamped to 2^30 (the launcher's kUnbounded), which fits the kernels' int arithmetic.
void check_window(int64_t& left, int64_t& right) {
  TORCH_CHECK(left >= -1 && right >= -1, "window_size: expected each side >= 0, or -1 for no limit on that side, "
              "got (", left, ", ", right, ")");
  left = std::min<int64_t>(left, 1 << 30);
  right = std::min<int64_t>(right, 1 << 30);
}

std::tuple<Tensor, Tensor> flash_attn_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                                          int64_t max_seqlen, const OptT& alibi_slopes,
                                          std::optional<double> softmax_scale, int64_t window_left,
                                          int64_t window_right) {
  check_attn_qkv(q, k, v);
  check_window(window_left, window_right);
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor slopes = attn_meta(q, cu_seqlens, max_seqlen, alibi_slopes);
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const double scale = attn_scale(softmax_scale, D);
  Tensor out = at::empty({T, H, D}, q.options());
  Tensor lse = at::empty({H, T}, q.options().dtype(at::kFloat));
  fb::launch_flash_attn_fwd(dtype_code(q), q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0), q.stride(1),
                            k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.data_ptr(), lse.data_ptr<float>(),
                            cu_seqlens.data_ptr<int32_t>(), fptr(slopes), (int)(cu_seqlens.size(0) - 1), (int)H,
                            (int)D, T, (int)max_seqlen, (float)scale, (int)window_left, (int)window_right, nullptr,
                            at::cuda::getCurrentCUDAStream());
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> flash_attn_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                  const Tensor& v, const Tensor& out, const Tensor& lse,
                                                  const Tensor& cu_seqlens, int64_t max_seqlen,
                                                  const OptT& alibi_slopes, std::optional<double> softmax_scale,
                                                  int64_t window_left, int64_t window_right) {
  check_attn_qkv(q, k, v);
  check_window(window_left, window_right);
  const char* names[2] = {"dout", "out"};
  const Tensor* ts[2] = {&dout, &out};
  for (int i = 0; i < 2; ++i) {
    check_device(names[i], *ts[i], q);
    check_dtype_like(names[i], *ts[i], "q", q);
    check_shape_like(names[i], *ts[i], "q", q);
  }
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  check_device("lse", lse, q);
  check_dtype("lse", lse, at::kFloat);
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == H && lse.size(1) == T, "lse: expected shape (", H, ", ", T,
              "), got ", shape_str(lse));
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor slopes = attn_meta(q, cu_seqlens, max_seqlen, alibi_slopes);
  const double scale = attn_scale(softmax_scale, D);
  Tensor doc = dout.contiguous(), lsec = lse.contiguous();  // out is checked, not read: delta comes from P, dP
  Tensor dq = at::empty({T, H, D}, q.options());
  Tensor dk = at::empty({T, H, D}, q.options());
  Tensor dv = at::empty({T, H, D}, q.options());
  Tensor delta = at::empty({H, T}, q.options().dtype(at::kFloat));  // workspace: sum_j P dP / sum_j P
  fb::launch_flash_attn_bwd(dtype_code(q), doc.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0),
                            q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), lsec.data_ptr<float>(),
                            dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), delta.data_ptr<float>(),
                            cu_seqlens.data_ptr<int32_t>(), fptr(slopes), (int)(cu_seqlens.size(0) - 1), (int)H,
                            (int)D, T, (int)max_seqlen, (float)scale, (int)window_left, (int)window_right, nullptr,
                            at::cuda::getCurrentCUDAStream());
  return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastbert CUDA kernels (csrc/); the Python side is fastbert.cuda_backend";
  m.def("index_gather_fwd", &index_gather_fwd, "out[t] = x[indices[t]]");
  m.def("index_scatter_fwd", &index_scatter_fwd, "out[indices[t]] = x[t], zeros elsewhere");
  m.def("bias_gelu_fwd", &bias_gelu_fwd, "gelu(x + bias)");
  m.def("bias_gelu_bwd", &bias_gelu_bwd, "(dx, dbias) of bias_gelu_fwd");
  m.def("geglu_fwd", &geglu_fwd, "gelu(a + ba) * (g + bg)");
  m.def("geglu_bwd", &geglu_bwd, "(dx, dbias) of geglu_fwd");
  m.def("layer_norm_fwd", &layer_norm_fwd, "(y, z, mean, rstd)");
  m.def("layer_norm_bwd", &layer_norm_bwd, "(dz, dweight, dbias)");
  m.def("cross_entropy_rows", &cross_entropy_rows, "per-row CE loss of logits + bias; writes the scaled gradient");
  m.attr("layer_norm_max_n") = fb::layer_norm_max_n();
  m.def("flash_attn_fwd", &flash_attn_fwd, "(out [T,H,D], lse [H,T] fp32) of ALiBi varlen flash attention");
  m.def("flash_attn_bwd", &flash_attn_bwd, "(dq, dk, dv) of flash_attn_fwd");
}
