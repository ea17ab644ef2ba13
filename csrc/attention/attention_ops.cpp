// fusedformer_C::attention_fwd / attention_bwd: schemas and the entry points.
// Argument checks, allocation and launch only; the math lives in attention_cpu.cpp and
// attention_cuda.cuh.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>

#include "attention/attention.h"
#include "attention/attention_cuda_config.h"
#include "attention/attention_problem.h"
#include "common/checks.h"

namespace ff::attention {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

#ifdef FF_WITH_CUDA
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
  set_bwd_operands(p, dout, out, lse, dq, dk, dv);
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
                                         double dropout_p, bool is_causal, double scale, const OptTensor& seed_t,
                                         int64_t offset) {
  constexpr const char* op = "fusedformer_C::attention_fwd: ";
  const int64_t seed = seed_value(op, seed_t);
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
                                                 double dropout_p, bool is_causal, double scale,
                                                 const OptTensor& seed_t, int64_t offset) {
  constexpr const char* op = "fusedformer_C::attention_bwd: ";
  const int64_t seed = seed_value(op, seed_t);
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

// The cuda kernels' limits on sizes and dtype alone: the check_cuda_problem the cuda entry points
// call, compiled into every build, so tests/test_limits.py can compare it with the limits the
// Python side declares (fusedformer/ops/limits.py) without a GPU. Throws where the kernels refuse.
void attention_cuda_limits(c10::ScalarType dtype, int64_t D, int64_t Dv, int64_t Sq, int64_t Sk) {
  Problem pb;
  pb.B = pb.H = pb.Hk = 1;
  pb.D = D;
  pb.Dv = Dv;
  pb.Sq = Sq;
  pb.Sk = Sk;
  pb.dtype = dtype;
  check_cuda_problem("fusedformer_C::attention_cuda_limits: ", pb);
}

// The dynamic shared memory one CTA of the cuda kernels needs at head dims (D, Dv <= 256): the
// forward (without its mask tile where it can leave the tile out: fwd_smem_least), or the backward
// (with a float32 mask's tile; deterministic: the larger of its dK / dV and dQ kernels) —
// attention_cuda_config.h's one definition, in every build. Dispatch compares it with the device's
// opt-in limit (ops/attention.py), so that e.g. the head-dim-256 backward is not picked on sm_86.
int64_t attention_cuda_smem_bytes(int64_t D, int64_t Dv, bool backward, bool deterministic) {
  return static_cast<int64_t>(backward ? gpu::bwd_smem_bytes(D, Dv, deterministic) : gpu::fwd_smem_least(D, Dv));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedformer_C, m) {
  m.def("attention_cuda_limits(ScalarType dtype, int D, int Dv, int Sq, int Sk) -> ()", &attention_cuda_limits);
  m.def("attention_cuda_smem_bytes(int D, int Dv, bool backward, bool deterministic) -> int",
        &attention_cuda_smem_bytes);
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? key_padding_mask, "
        "float dropout_p, bool is_causal, float scale, Tensor? seed, int offset) -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_mask, "
        "Tensor? key_padding_mask, float dropout_p, bool is_causal, float scale, Tensor? seed, int offset) "
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
