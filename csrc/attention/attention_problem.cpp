// Problem construction and argument checks for attention (see attention_problem.h).
#include "attention/attention_problem.h"

#include <cmath>

#include "common/checks.h"
#include "common/dtype.h"

namespace ff::attention {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

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

Problem make_problem(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& attn_mask,
                     const OptTensor& key_padding_mask, double dropout_p, bool is_causal, double scale,
                     int64_t seed, int64_t offset) {
  FF_CHECK_ARG(q.defined() && q.dim() == 4, op, "q must be a (B, H, Sq, D) tensor, got ", q.sizes());
  check_dtype_of(op, "q", q);
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
    TORCH_CHECK_TYPE(FloatDtypes::contains(m.scalar_type()), op, "attn_mask must be an additive float mask, got ",
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

void set_bwd_operands(BwdParams& p, const Tensor& dout, const Tensor& out, const Tensor& lse, const Tensor& dq,
                      const Tensor& dk, const Tensor& dv) {
  p.dout = strided(dout);
  p.out = strided(out);
  p.lse = lse.data_ptr<float>();
  p.dq = strided(dq);
  p.dk = strided(dk);
  p.dv = strided(dv);
}

void check_cuda_problem(const char* op, const Problem& pb) {
  TORCH_CHECK_TYPE(LowPrecisionDtypes::contains(pb.dtype), op, "the cuda kernels take ",
                   LowPrecisionDtypes::names(), " q, k, v; got ", pb.dtype,
                   " (the triton or reference backend takes float32)");
  FF_CHECK_ARG(pb.D % 8 == 0 && pb.D <= 256, op, "the cuda kernels need a head dim that is a multiple of 8 and ",
               "at most 256; got q/k head dim ", pb.D);
  FF_CHECK_ARG(pb.Dv % 8 == 0 && pb.Dv <= 256, op, "the cuda kernels need a value head dim that is a multiple of ",
               "8 and at most 256; got ", pb.Dv);
  FF_CHECK_ARG(pb.Sq <= 65535LL * 32 && pb.Sk <= 65535LL * 32, op, "the cuda kernels take sequences of at most ",
               65535 * 32, " tokens; got Sq = ", pb.Sq, ", Sk = ", pb.Sk);
}

}  // namespace ff::attention
