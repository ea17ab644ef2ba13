// Test-only extension: the layer_norm CUDA kernels, launchers and host code built with
// -DFF_SIMT_EMULATION by a host compiler and run on CPU tensors (tests/emu/test_layer_norm_emu.py):
// together with csrc/layer_norm/layer_norm_cuda.cpp (the host code fwd_cuda / bwd_cuda run, given as
// a second source) and the two launcher files included below, exactly what nvcc builds.
// The bindings take preallocated outputs so the tests can place them inside guard bands; the
// backward optionally takes its float32 scratch (NaN-filled by the tests: the kernels must
// initialise what they read), else the host code allocates it.
#include <torch/extension.h>

#include <optional>

#include "layer_norm/layer_norm.h"
#include "layer_norm/layer_norm_cuda.cuh"
#include "layer_norm/layer_norm_cuda_bwd.cu"
#include "layer_norm/layer_norm_cuda_fwd.cu"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
namespace gpu = ff::layer_norm::gpu;

const void* cptr(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }
void* mptr(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// `sms` plays the device's SM count: it sizes the grids (few SMs: blocks loop over many rows).
gpu::Launch make_launch(int64_t sms) {
  TORCH_CHECK(sms >= 1, "sms must be >= 1");
  return gpu::Launch{cudaStream_t{}, static_cast<int>(sms)};
}

void check_rows(const char* name, const Tensor& t, const Tensor& like) {
  TORCH_CHECK(t.is_contiguous() && t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type(), name,
              " must be contiguous with the shape and dtype of the input");
}

void fwd(const Tensor& x, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias, const Tensor& y,
         const OptTensor& h, const OptTensor& mean, const Tensor& rstd, double eps, double p, int64_t seed,
         int64_t offset, bool rms, int64_t sms) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (M, N) tensor");
  check_rows("y", y, x);
  if (residual) check_rows("residual", *residual, x);
  if (h) check_rows("h", *h, x);
  TORCH_CHECK(rms == !mean.has_value(), "mean is given exactly for LayerNorm");
  ff::layer_norm::FwdParams prm;
  prm.x = x.data_ptr();
  prm.residual = cptr(residual);
  prm.weight = cptr(weight);
  prm.bias = cptr(bias);
  prm.y = y.data_ptr();
  prm.h = mptr(h);
  prm.mean = mean ? mean->data_ptr<float>() : nullptr;
  prm.rstd = rstd.data_ptr<float>();
  prm.M = x.size(0);
  prm.N = x.size(1);
  prm.eps = static_cast<float>(eps);
  prm.rms = rms;
  prm.dropout = ff::make_dropout(p, seed, offset);
  prm.dtype = x.scalar_type();
  prm.wtype = weight ? weight->scalar_type() : bias ? bias->scalar_type() : x.scalar_type();
  gpu::forward(prm, make_launch(sms));
}

void bwd(const Tensor& dy, const OptTensor& dh_out, const Tensor& h, const OptTensor& weight, const OptTensor& mean,
         const Tensor& rstd, const Tensor& dh, const OptTensor& dx, const OptTensor& dweight, const OptTensor& dbias,
         double p, int64_t seed, int64_t offset, bool rms, int64_t sms, const OptTensor& scratch) {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous(), "h must be a contiguous (M, N) tensor");
  check_rows("dy", dy, h);
  check_rows("dh", dh, h);
  if (dh_out) check_rows("dh_out", *dh_out, h);
  if (dx) check_rows("dx", *dx, h);
  TORCH_CHECK(rms == !mean.has_value(), "mean is given exactly for LayerNorm");
  ff::layer_norm::BwdParams prm;
  prm.dy = dy.data_ptr();
  prm.dh_out = cptr(dh_out);
  prm.h = h.data_ptr();
  prm.weight = cptr(weight);
  prm.mean = mean ? mean->data_ptr<float>() : nullptr;
  prm.rstd = rstd.data_ptr<float>();
  prm.dh = dh.data_ptr();
  prm.dx = mptr(dx);
  prm.dweight = mptr(dweight);
  prm.dbias = mptr(dbias);
  prm.M = h.size(0);
  prm.N = h.size(1);
  prm.rms = rms;
  prm.dropout = ff::make_dropout(p, seed, offset);
  prm.dtype = h.scalar_type();
  prm.wtype = weight ? weight->scalar_type() : h.scalar_type();  // as layer_norm_ops.cpp: dbias in this dtype
  const gpu::Launch l = make_launch(sms);
  if (scratch) {
    TORCH_CHECK(scratch->scalar_type() == at::kFloat && scratch->is_contiguous() &&
                    scratch->numel() == 2 * gpu::bwd_blocks(prm.M, l.num_sms) * prm.N,
                "scratch must be a contiguous float32 tensor of 2 * bwd_blocks(M, sms) * N elements");
    gpu::bwd_launch(prm, scratch->data_ptr<float>(), l);
  } else {
    gpu::backward(prm, l);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd);
  m.def("bwd", &bwd);
  m.def("bwd_blocks", [](int64_t M, int64_t sms) { return gpu::bwd_blocks(M, static_cast<int>(sms)); });
  m.def("threads_for", &gpu::threads_for);
}
