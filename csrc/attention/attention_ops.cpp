// fusedformer_C::attention_fwd / attention_bwd: schemas and the entry points.
// Argument checks, allocation and launch only; the math lives in attention_cpu.cpp and
// attention_cuda.cuh.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <optional>

#include "attention/attention.h"
#include "common/checks.h"

namespace ff::attention {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

Strided4 strided(const Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

// A (B, H, S, D) operand: on ref's device, of ref's dtype, the given sizes, unit stride in the
// last dim and no negative strides.
void check_operand(const char* op, const char* name, const Tensor& t, const Tensor& ref, at::IntArrayRef sizes) {
  FF_CHECK_ARG(t.defined(), op, name, " is undefined");
  FF_CHECK_ARG(t.device() == ref.device(), op, name, " is on ", t.device(), " but q is on ", ref.device());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, name, " has dtype ", t.scalar_type(), ", expected ",
                   ref.scalar_type(), " (q's dtype)");
  FF_CHECK_ARG(t.sizes() == sizes, op, name, " has shape ", t.sizes(), ", expected ", sizes);
  FF_CHECK_ARG(t.stride(3) == 1 || t.size(3) == 1, op, name, " must have a contiguous last dim, got strides ",
               t.strides());
  for (int d = 0; d < 4; ++d) FF_CHECK_ARG(t.stride(d) >= 0, op, name, " has a negative stride: ", t.strides());
}

// Shapes, masks and scalars shared by forward and backward; fills everything but the pointers to
// the outputs.
Problem make_problem(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& attn_mask,
                     const OptTensor& key_padding_mask, double dropout_p, bool is_causal, double scale,
                     int64_t seed, int64_t offset) {
  FF_CHECK_ARG(q.defined() && q.dim() == 4, op, "q must be a (B, H, Sq, D) tensor, got ", q.sizes());
  TORCH_CHECK_TYPE(is_fast_dtype(q.scalar_type()), op, "q must be float32, float16 or bfloat16, got ",
                   q.scalar_type());
  FF_CHECK_ARG(k.defined() && k.dim() == 4 && v.defined() && v.dim() == 4, op,
               "k and v must be (B, Hk, Sk, D) tensors");
  Problem pb;
  pb.B = q.size(0);
  pb.H = q.size(1);
  pb.Sq = q.size(2);
  pb.D = q.size(3);
  pb.Hk = k.size(1);
  pb.Sk = k.size(2);
  pb.Dv = v.size(3);
  FF_CHECK_ARG(pb.B > 0 && pb.H > 0 && pb.Sq > 0 && pb.D > 0, op, "q is empty: ", q.sizes());
  FF_CHECK_ARG(pb.Hk > 0 && pb.Sk > 0 && pb.Dv > 0, op, "k / v are empty: ", k.sizes(), ", ", v.sizes());
  FF_CHECK_ARG(pb.H % pb.Hk == 0, op, "query heads (", pb.H, ") must be a multiple of key/value heads (", pb.Hk, ")");
  check_operand(op, "q", q, q, q.sizes());
  check_operand(op, "k", k, q, {pb.B, pb.Hk, pb.Sk, pb.D});
  check_operand(op, "v", v, q, {pb.B, pb.Hk, pb.Sk, pb.Dv});
  pb.q = strided(q);
  pb.k = strided(k);
  pb.v = strided(v);
  if (attn_mask.has_value()) {
    const Tensor& m = *attn_mask;
    FF_CHECK_ARG(m.device() == q.device(), op, "attn_mask is on ", m.device(), " but q is on ", q.device());
    TORCH_CHECK_TYPE(is_fast_dtype(m.scalar_type()), op, "attn_mask must be an additive float mask, got ",
                     m.scalar_type());
    FF_CHECK_ARG(m.dim() == 4 && m.sizes() == at::IntArrayRef({pb.B, pb.H, pb.Sq, pb.Sk}), op,
                 "attn_mask must be expanded to (B, H, Sq, Sk) = (", pb.B, ", ", pb.H, ", ", pb.Sq, ", ", pb.Sk,
                 "), got ", m.sizes());
    for (int d = 0; d < 4; ++d) FF_CHECK_ARG(m.stride(d) >= 0, op, "attn_mask has a negative stride");
    pb.mask = strided(m);
    pb.mask_stride_k = m.stride(3);
    pb.mask_dtype = m.scalar_type();
  }
  if (key_padding_mask.has_value()) {
    const Tensor& kpm = *key_padding_mask;
    FF_CHECK_ARG(kpm.device() == q.device(), op, "key_padding_mask is on ", kpm.device(), " but q is on ",
                 q.device());
    TORCH_CHECK_TYPE(kpm.scalar_type() == at::kBool, op, "key_padding_mask must be bool, got ", kpm.scalar_type());
    FF_CHECK_ARG(kpm.dim() == 2 && kpm.size(0) == pb.B && kpm.size(1) == pb.Sk && kpm.is_contiguous(), op,
                 "key_padding_mask must be a contiguous (B, Sk) = (", pb.B, ", ", pb.Sk, ") tensor, got ",
                 kpm.sizes());
    pb.key_padding = kpm.data_ptr<bool>();
  }
  FF_CHECK_ARG(dropout_p >= 0.0 && dropout_p < 1.0, op, "dropout_p must be in [0, 1), got ", dropout_p);
  FF_CHECK_ARG(offset >= 0, op, "offset must be >= 0, got ", offset);
  FF_CHECK_ARG(std::isfinite(scale), op, "scale must be finite, got ", scale);
  pb.scale = static_cast<float>(scale);
  pb.causal = is_causal;
  pb.dropout = make_dropout(dropout_p, seed, offset);
  pb.dtype = q.scalar_type();
  return pb;
}

#ifdef FF_WITH_CUDA
// The CUDA kernels' limits: 16-bit dtypes, head dims that are multiples of 8 up to 256 (one
// 16-byte copy = 8 elements), grids within CUDA's y limit.
void check_cuda_problem(const char* op, const Problem& pb) {
  TORCH_CHECK_TYPE(pb.dtype == c10::kHalf || pb.dtype == c10::kBFloat16, op,
                   "the cuda kernels take float16 or bfloat16 q, k, v; got ", pb.dtype,
                   " (the triton or reference backend takes float32)");
  FF_CHECK_ARG(pb.D % 8 == 0 && pb.D <= 256, op, "the cuda kernels need a head dim that is a multiple of 8 and ",
               "at most 256; got q/k head dim ", pb.D);
  FF_CHECK_ARG(pb.Dv % 8 == 0 && pb.Dv <= 256, op, "the cuda kernels need a value head dim that is a multiple of ",
               "8 and at most 256; got ", pb.Dv);
  FF_CHECK_ARG(pb.Sq <= 65535LL * 32 && pb.Sk <= 65535LL * 32, op, "the cuda kernels take sequences of at most ",
               65535 * 32, " tokens; got Sq = ", pb.Sq, ", Sk = ", pb.Sk);
}

// The kernels copy rows with 16-byte cp.async: the base and every row must be 16-byte aligned.
// Other layouts (a view with an odd stride, say) are copied to a contiguous tensor first.
Tensor aligned_for_cuda(const Tensor& t) {
  if (!t.defined() || !t.is_cuda() || t.dim() != 4) return t;
  const int64_t elem = static_cast<int64_t>(t.element_size());
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3; ++d) ok = ok && (t.size(d) == 1 || (t.stride(d) * elem) % 16 == 0);
  return ok ? t : t.contiguous();
}
#endif

std::tuple<Tensor, Tensor> attention_fwd_impl(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                                              const OptTensor& attn_mask, const OptTensor& key_padding_mask,
                                              double dropout_p, bool is_causal, double scale, int64_t seed,
                                              int64_t offset) {
  FwdParams p;
  p.pb = make_problem(op, q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, offset);
  const c10::DeviceGuard guard(q.device());
  Tensor out = at::empty({p.pb.B, p.pb.H, p.pb.Sq, p.pb.Dv}, q.options());
  Tensor lse = at::empty({p.pb.B, p.pb.H, p.pb.Sq}, q.options().dtype(at::kFloat));
  p.out = strided(out);
  p.lse = lse.data_ptr<float>();
#ifdef FF_WITH_CUDA
  if (q.is_cuda()) {
    check_cuda_problem(op, p.pb);
    fwd_cuda(p);
    return {out, lse};
  }
#endif
  TORCH_CHECK(q.device().is_cpu(), op, "no kernel for ", q.device());
  fwd_cpu(p);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd_impl(const char* op, const Tensor& dout, const Tensor& q,
                                                      const Tensor& k, const Tensor& v, const Tensor& out,
                                                      const Tensor& lse, const OptTensor& attn_mask,
                                                      const OptTensor& key_padding_mask, double dropout_p,
                                                      bool is_causal, double scale, int64_t seed, int64_t offset) {
  BwdParams p;
  p.pb = make_problem(op, q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, offset);
  const std::array<int64_t, 4> out_sizes{p.pb.B, p.pb.H, p.pb.Sq, p.pb.Dv};
  check_operand(op, "dout", dout, q, out_sizes);
  check_operand(op, "out", out, q, out_sizes);
  FF_CHECK_ARG(lse.device() == q.device() && lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                   lse.sizes() == at::IntArrayRef({p.pb.B, p.pb.H, p.pb.Sq}),
               op, "lse must be a contiguous float32 (B, H, Sq) tensor on ", q.device(), ", got ", lse.sizes(), " ",
               lse.scalar_type());
  const c10::DeviceGuard guard(q.device());
  Tensor dq = at::empty_like(q);
  Tensor dk = at::empty_like(k);
  Tensor dv = at::empty_like(v);
  p.dout = strided(dout);
  p.out = strided(out);
  p.lse = lse.data_ptr<float>();
  p.dq = strided(dq);
  p.dk = strided(dk);
  p.dv = strided(dv);
  p.deterministic = at::globalContext().deterministicAlgorithms();
#ifdef FF_WITH_CUDA
  if (q.is_cuda()) {
    check_cuda_problem(op, p.pb);
    bwd_cuda(p);
    return {dq, dk, dv};
  }
#endif
  TORCH_CHECK(q.device().is_cpu(), op, "no kernel for ", q.device());
  bwd_cpu(p);
  return {dq, dk, dv};
}

std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                         const OptTensor& attn_mask, const OptTensor& key_padding_mask,
                                         double dropout_p, bool is_causal, double scale, int64_t seed,
                                         int64_t offset) {
  constexpr const char* op = "fusedformer_C::attention_fwd: ";
#ifdef FF_WITH_CUDA
  if (q.defined() && q.is_cuda()) {
    return attention_fwd_impl(op, aligned_for_cuda(q), aligned_for_cuda(k), aligned_for_cuda(v), attn_mask,
                              key_padding_mask, dropout_p, is_causal, scale, seed, offset);
  }
#endif
  return attention_fwd_impl(op, q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, offset);
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                 const Tensor& v, const Tensor& out, const Tensor& lse,
                                                 const OptTensor& attn_mask, const OptTensor& key_padding_mask,
                                                 double dropout_p, bool is_causal, double scale, int64_t seed,
                                                 int64_t offset) {
  constexpr const char* op = "fusedformer_C::attention_bwd: ";
#ifdef FF_WITH_CUDA
  if (q.defined() && q.is_cuda()) {
    return attention_bwd_impl(op, aligned_for_cuda(dout), aligned_for_cuda(q), aligned_for_cuda(k),
                              aligned_for_cuda(v), aligned_for_cuda(out), lse, attn_mask, key_padding_mask,
                              dropout_p, is_causal, scale, seed, offset);
  }
#endif
  return attention_bwd_impl(op, dout, q, k, v, out, lse, attn_mask, key_padding_mask, dropout_p, is_causal, scale,
                            seed, offset);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedformer_C, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? key_padding_mask, "
        "float dropout_p, bool is_causal, float scale, int seed, int offset) -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_mask, "
        "Tensor? key_padding_mask, float dropout_p, bool is_causal, float scale, int seed, int offset) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedformer_C, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

#ifdef FF_WITH_CUDA
TORCH_LIBRARY_IMPL(fusedformer_C, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}
#endif

}  // namespace ff::attention
