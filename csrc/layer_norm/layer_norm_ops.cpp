// fusedformer_C::layer_norm_fwd / layer_norm_bwd: schemas and the CPU / CUDA entry points.
// Argument checks, allocation and launch only; the math lives in layer_norm_cpu.cpp / _cuda.cu.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "common/checks.h"
#include "layer_norm/layer_norm.h"

namespace ff::layer_norm {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

const void* ptr_or_null(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

void check_params(const char* op, const Tensor& ref, const OptTensor& weight, const OptTensor& bias, int64_t N) {
  for (const auto& [name, t] : {std::pair<const char*, const OptTensor&>{"weight", weight}, {"bias", bias}}) {
    if (!t.has_value()) continue;
    FF_CHECK_ARG(t->device() == ref.device(), op, name, " is on ", t->device(), ", expected ", ref.device());
    FF_CHECK_ARG(t->dim() == 1 && t->size(0) == N && t->is_contiguous(), op, name,
                 " must be a contiguous (N,) tensor with N = ", N, ", got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == ref.scalar_type() || t->scalar_type() == at::kFloat, op, ": ", name,
                     " must have dtype ", ref.scalar_type(), " or float32, got ", t->scalar_type());
  }
  if (weight.has_value() && bias.has_value())
    TORCH_CHECK_TYPE(weight->scalar_type() == bias->scalar_type(), op, ": weight and bias dtypes differ");
}

void check_dropout(const char* op, double p, int64_t offset) {
  FF_CHECK_ARG(p >= 0.0 && p < 1.0, op, "dropout_p must be in [0, 1), got ", p);
  FF_CHECK_ARG(offset >= 0, op, "offset must be >= 0, got ", offset);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x, const OptTensor& residual,
                                                          const OptTensor& weight, const OptTensor& bias,
                                                          double eps, double dropout_p, const OptTensor& seed,
                                                          int64_t offset, bool rms) {
  constexpr const char* op = "fusedformer_C::layer_norm_fwd: ";
  FF_CHECK_ARG(x.dim() == 2 && x.is_contiguous(), op, "x must be a contiguous (M, N) tensor, got ", x.sizes());
  check_dtype_of(op, "x", x);
  const int64_t M = x.size(0), N = x.size(1);
  FF_CHECK_ARG(M > 0 && N > 0, op, "x is empty: ", x.sizes());
  if (residual.has_value()) {
    check_input(op, "residual", *residual, x, 2);
    FF_CHECK_ARG(residual->sizes() == x.sizes(), op, "residual shape ", residual->sizes(), " != x shape ", x.sizes());
    TORCH_CHECK_TYPE(residual->scalar_type() == x.scalar_type(), op, "residual dtype must equal x dtype");
  }
  check_params(op, x, weight, bias, N);
  FF_CHECK_ARG(std::isfinite(eps) && eps >= 0.0, op, "eps must be finite and >= 0, got ", eps);
  check_dropout(op, dropout_p, offset);

  const c10::DeviceGuard guard(x.device());
  const auto fopts = x.options().dtype(at::kFloat);
  Tensor y = at::empty_like(x);
  Tensor h = (residual.has_value() || dropout_p > 0.0) ? at::empty_like(x) : x.new_empty({0});
  Tensor mean = at::empty({rms ? 0 : M}, fopts);
  Tensor rstd = at::empty({M}, fopts);

  FwdParams p;
  p.x = x.data_ptr();
  p.residual = ptr_or_null(residual);
  p.weight = ptr_or_null(weight);
  p.bias = ptr_or_null(bias);
  p.y = y.data_ptr();
  p.h = h.numel() ? h.data_ptr() : nullptr;
  p.mean = rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.M = M;
  p.N = N;
  p.eps = static_cast<float>(eps);
  p.rms = rms;
  p.dropout = make_dropout(dropout_p, seed_value(op, seed), offset);
  p.dtype = x.scalar_type();
  p.wtype = weight.has_value() ? weight->scalar_type() : bias.has_value() ? bias->scalar_type() : x.scalar_type();
  if (x.is_cuda()) {
#ifdef FF_WITH_CUDA
    fwd_cuda(p);
#else
    TORCH_CHECK(false, op, "fusedformer._C was built without CUDA");
#endif
  } else {
    fwd_cpu(p);
  }
  return {y, h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy, const OptTensor& dh_out,
                                                          const Tensor& h, const OptTensor& weight,
                                                          const Tensor& mean, const Tensor& rstd,
                                                          double dropout_p, const OptTensor& seed, int64_t offset,
                                                          bool rms, bool has_bias) {
  constexpr const char* op = "fusedformer_C::layer_norm_bwd: ";
  FF_CHECK_ARG(h.dim() == 2 && h.is_contiguous(), op, "h must be a contiguous (M, N) tensor, got ", h.sizes());
  check_dtype_of(op, "h", h);
  const int64_t M = h.size(0), N = h.size(1);
  FF_CHECK_ARG(M > 0 && N > 0, op, "h is empty: ", h.sizes());
  check_input(op, "dy", dy, h, 2);
  FF_CHECK_ARG(dy.sizes() == h.sizes(), op, "dy shape ", dy.sizes(), " != h shape ", h.sizes());
  TORCH_CHECK_TYPE(dy.scalar_type() == h.scalar_type(), op, "dy dtype must equal h dtype");
  if (dh_out.has_value()) {
    check_input(op, "dh", *dh_out, h, 2);
    FF_CHECK_ARG(dh_out->sizes() == h.sizes(), op, "dh shape must equal h shape");
    TORCH_CHECK_TYPE(dh_out->scalar_type() == h.scalar_type(), op, "dh dtype must equal h dtype");
  }
  check_params(op, h, weight, std::nullopt, N);
  for (const auto& [name, t, n] : {std::tuple<const char*, const Tensor&, int64_t>{"mean", mean, rms ? 0 : M},
                                   {"rstd", rstd, M}}) {
    FF_CHECK_ARG(t.device() == h.device() && t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == n &&
                     t.is_contiguous(),
                 op, name, " must be a contiguous float32 (", n, ",) tensor on ", h.device(), ", got ", t.sizes(),
                 " ", t.scalar_type());
  }
  check_dropout(op, dropout_p, offset);

  const c10::DeviceGuard guard(h.device());
  const at::ScalarType wtype = weight.has_value() ? weight->scalar_type() : h.scalar_type();
  Tensor dh = at::empty_like(h);
  Tensor dx = dropout_p > 0.0 ? at::empty_like(h) : h.new_empty({0});
  Tensor dweight = weight.has_value() ? at::empty_like(*weight) : h.new_empty({0});
  Tensor dbias = has_bias ? at::empty({N}, h.options().dtype(wtype)) : h.new_empty({0});

  BwdParams p;
  p.dy = dy.data_ptr();
  p.dh_out = ptr_or_null(dh_out);
  p.h = h.data_ptr();
  p.weight = ptr_or_null(weight);
  p.mean = rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.dh = dh.data_ptr();
  p.dx = dx.numel() ? dx.data_ptr() : nullptr;
  p.dweight = dweight.numel() ? dweight.data_ptr() : nullptr;
  p.dbias = dbias.numel() ? dbias.data_ptr() : nullptr;
  p.M = M;
  p.N = N;
  p.rms = rms;
  p.dropout = make_dropout(dropout_p, seed_value(op, seed), offset);
  p.dtype = h.scalar_type();
  p.wtype = wtype;
  if (h.is_cuda()) {
#ifdef FF_WITH_CUDA
    bwd_cuda(p);
#else
    TORCH_CHECK(false, op, "fusedformer._C was built without CUDA");
#endif
  } else {
    bwd_cpu(p);
  }
  return {dh, dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedformer_C, m) {
  m.def("layer_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, float dropout_p, "
        "Tensor? seed, int offset, bool rms) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor dy, Tensor? dh, Tensor h, Tensor? weight, Tensor mean, Tensor rstd, "
        "float dropout_p, Tensor? seed, int offset, bool rms, bool has_bias) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedformer_C, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
}

#ifdef FF_WITH_CUDA
TORCH_LIBRARY_IMPL(fusedformer_C, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
}
#endif

}  // namespace ff::layer_norm
