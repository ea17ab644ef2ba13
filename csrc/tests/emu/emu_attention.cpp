// Test-only extension: the attention CUDA kernels and launchers (attention/attention_cuda.cuh)
// built with -DFF_SIMT_EMULATION by a host compiler and run on CPU tensors
// (tests/test_attention_emu.py). The bindings take preallocated outputs, so the tests can place
// them inside guard bands, and any strides the op allows.
#include <torch/extension.h>

#include <optional>

#include "attention/attention_cuda.cuh"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using namespace ff::attention;

Strided4 strided(const Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

// The Problem as attention_ops.cpp builds it (shapes were checked by the caller, the test).
Problem make_problem(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& attn_mask,
                     const OptTensor& key_padding_mask, double dropout_p, bool causal, double scale, int64_t seed,
                     int64_t offset) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, "float16 or bfloat16");
  Problem pb;
  pb.B = q.size(0);
  pb.H = q.size(1);
  pb.Sq = q.size(2);
  pb.D = q.size(3);
  pb.Hk = k.size(1);
  pb.Sk = k.size(2);
  pb.Dv = v.size(3);
  pb.q = strided(q);
  pb.k = strided(k);
  pb.v = strided(v);
  if (attn_mask) {
    pb.mask = strided(*attn_mask);
    pb.mask_stride_k = attn_mask->stride(3);
    pb.mask_dtype = attn_mask->scalar_type();
  }
  if (key_padding_mask) pb.key_padding = key_padding_mask->data_ptr<bool>();
  pb.scale = static_cast<float>(scale);
  pb.causal = causal;
  pb.dropout = ff::make_dropout(dropout_p, seed, offset);
  pb.dtype = q.scalar_type();
  return pb;
}

void fwd(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& attn_mask,
         const OptTensor& key_padding_mask, double dropout_p, bool causal, double scale, int64_t seed, int64_t offset,
         const Tensor& out, const Tensor& lse) {
  FwdParams p;
  p.pb = make_problem(q, k, v, attn_mask, key_padding_mask, dropout_p, causal, scale, seed, offset);
  p.out = strided(out);
  p.lse = lse.data_ptr<float>();
  if (p.pb.dtype == at::kHalf) {
    gpu::launch_fwd_any<__half>(p, cudaStream_t{});
  } else {
    gpu::launch_fwd_any<__nv_bfloat16>(p, cudaStream_t{});
  }
}

void bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
         const OptTensor& attn_mask, const OptTensor& key_padding_mask, double dropout_p, bool causal, double scale,
         int64_t seed, int64_t offset, bool deterministic, const Tensor& dq, const Tensor& dk, const Tensor& dv) {
  BwdParams p;
  p.pb = make_problem(q, k, v, attn_mask, key_padding_mask, dropout_p, causal, scale, seed, offset);
  p.dout = strided(dout);
  p.out = strided(out);
  p.lse = lse.data_ptr<float>();
  p.dq = strided(dq);
  p.dk = strided(dk);
  p.dv = strided(dv);
  p.deterministic = deterministic;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  // NaN-filled scratch: the kernels must initialise what they read.
  Tensor delta = at::full({p.pb.B, p.pb.H, p.pb.Sq}, NAN, f32);
  Tensor dq_acc = at::full({p.pb.B, p.pb.H, p.pb.Sq, p.pb.D}, NAN, f32);
  if (p.pb.dtype == at::kHalf) {
    gpu::launch_bwd_any<__half>(p, delta.data_ptr<float>(), dq_acc.data_ptr<float>(), cudaStream_t{});
  } else {
    gpu::launch_bwd_any<__nv_bfloat16>(p, delta.data_ptr<float>(), dq_acc.data_ptr<float>(), cudaStream_t{});
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd);
  m.def("bwd", &bwd);
}
