// Test-only extension: the gelu_ffn CUDA kernels, launchers and host code built with
// -DFF_SIMT_EMULATION by a host compiler and run on CPU tensors (tests/emu/test_gelu_ffn_emu.py):
// together with csrc/gelu_ffn/gelu_ffn_cuda.cpp (the host code fwd_cuda / bwd_cuda run, given as a
// second source) and the two launcher files included below, exactly what nvcc builds.
// The bindings take preallocated outputs so the tests can place them inside guard bands.
#include <torch/extension.h>

#include <optional>

#include "gelu_ffn/gelu_ffn.h"
#include "gelu_ffn/gelu_ffn_cuda.cuh"
#include "gelu_ffn/gelu_ffn_cuda_bwd.cu"
#include "gelu_ffn/gelu_ffn_cuda_fwd.cu"

namespace {

using at::Tensor;
using ff::gelu_ffn::FwdArgs;
using ff::gelu_ffn::BwdArgs;
namespace cuda = ff::gelu_ffn::cuda;
namespace tc = ff::gelu_ffn::tc;

// tile: 0 = automatic (as on a GPU with `sms` SMs), 1 = the 128 x 128 tile, 2 = the 64 x 64 tile.
cuda::Launch make_launch(int64_t tile, int64_t sms) {
  TORCH_CHECK(tile >= 0 && tile <= 2, "tile must be 0, 1 or 2");
  return cuda::Launch{cudaStream_t{}, static_cast<int>(sms), static_cast<cuda::TileChoice>(tile)};
}

Tensor opt(const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

void fwd(const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1, const Tensor& w2,
         const std::optional<Tensor>& b2, const Tensor& y, const Tensor& pre, bool tanh, double p, int64_t seed,
         int64_t offset, int64_t tile, int64_t sms) {
  const FwdArgs a{x, w1, opt(b1), w2, opt(b2), y, pre, tanh, ff::make_dropout(p, seed, offset)};
  cuda::forward(a, make_launch(tile, sms));
}

void bwd(const Tensor& dy, const Tensor& x, const Tensor& w1, const Tensor& w2, const Tensor& pre, const Tensor& dx,
         const Tensor& dw1, const std::optional<Tensor>& db1, const Tensor& dw2, const std::optional<Tensor>& db2,
         bool tanh, double p, int64_t seed, int64_t offset, int64_t tile, int64_t sms) {
  const BwdArgs a{dy, x, w1, w2, pre, dx, dw1, opt(db1), dw2, opt(db2), tanh, ff::make_dropout(p, seed, offset)};
  cuda::backward(a, make_launch(tile, sms));
}

// c (M, N) = a (M, K) b^T with b (N, K) ("NT"), or a b with b (K, N) ("NN"); c may be a view with
// row stride ldc (a guard-banded buffer).
template <typename T>
void gemm_t(const Tensor& a, const Tensor& b, const Tensor& c, bool nn, const cuda::Launch& l) {
  const int64_t M = a.size(0);
  const int K = static_cast<int>(a.size(1)), N = static_cast<int>(nn ? b.size(1) : b.size(0));
  const tc::StoreEpilogue<T> epi{static_cast<T*>(c.data_ptr()), c.stride(0)};
  if (nn) {
    tc::gemm<T, true>(static_cast<const T*>(a.data_ptr()), static_cast<const T*>(b.data_ptr()), M, N, K, epi, l);
  } else {
    tc::gemm<T, false>(static_cast<const T*>(a.data_ptr()), static_cast<const T*>(b.data_ptr()), M, N, K, epi, l);
  }
}

void gemm(const Tensor& a, const Tensor& b, const Tensor& c, bool nn, int64_t tile) {
  const cuda::Launch l = make_launch(tile, 1);
  ff::cuda::visit_device_dtype<ff::LowPrecisionDtypes>(a.scalar_type(), "emu_gelu_ffn gemm",
                                                       [&]<typename T>(ff::TypeTag<T>) { gemm_t<T>(a, b, c, nn, l); });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd);
  m.def("bwd", &bwd);
  m.def("gemm", &gemm);
}
