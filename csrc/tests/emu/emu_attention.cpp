// Test-only extension: the attention CUDA kernels and launchers (attention/attention_cuda.cuh)
// built with -DFF_SIMT_EMULATION by a host compiler and run on CPU tensors
// (tests/emu/test_attention_emu.py). The bindings take preallocated outputs, so the tests can place
// them inside guard bands, and any strides the op allows.
#include <torch/extension.h>

#include <optional>

#include "attention/attention_cuda.cuh"
#include "attention/attention_problem.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using namespace ff::attention;

// The Problem exactly as the op builds and checks it (attention_problem.cpp is linked in).
Problem cuda_problem(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& attn_mask,
                     const OptTensor& key_padding_mask, double dropout_p, bool causal, double scale, int64_t seed,
                     int64_t offset) {
  constexpr const char* op = "emu_attention: ";
  Problem pb = make_problem(op, q, k, v, attn_mask, key_padding_mask, dropout_p, causal, scale, seed, offset);
  check_cuda_problem(op, pb);
  return pb;
}

void fwd(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& attn_mask,
         const OptTensor& key_padding_mask, double dropout_p, bool causal, double scale, int64_t seed, int64_t offset,
         const Tensor& out, const Tensor& lse, bool mask_tile) {
  FwdParams p;
  p.pb = cuda_problem(q, k, v, attn_mask, key_padding_mask, dropout_p, causal, scale, seed, offset);
  p.out = strided(out);
  p.lse = lse.data_ptr<float>();
  p.mask_tile = mask_tile;  // false: what attention_cuda.cpp sets where the tile does not fit the device
  ff::cuda::visit_device_dtype<ff::LowPrecisionDtypes>(p.pb.dtype, "emu_attention", [&]<typename T>(ff::TypeTag<T>) {
    gpu::launch_fwd_any<T>(p, cudaStream_t{});
  });
}

void bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
         const OptTensor& attn_mask, const OptTensor& key_padding_mask, double dropout_p, bool causal, double scale,
         int64_t seed, int64_t offset, bool deterministic, const Tensor& dq, const Tensor& dk, const Tensor& dv) {
  BwdParams p;
  p.pb = cuda_problem(q, k, v, attn_mask, key_padding_mask, dropout_p, causal, scale, seed, offset);
  set_bwd_operands(p, dout, out, lse, dq, dk, dv);
  p.deterministic = deterministic;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  // NaN-filled scratch: the kernels must initialise what they read.
  Tensor delta = at::full({p.pb.B, p.pb.H, p.pb.Sq}, NAN, f32);
  Tensor dq_acc = at::full({p.pb.B, p.pb.H, p.pb.Sq, p.pb.D}, NAN, f32);
  ff::cuda::visit_device_dtype<ff::LowPrecisionDtypes>(p.pb.dtype, "emu_attention", [&]<typename T>(ff::TypeTag<T>) {
    gpu::launch_bwd_any<T>(p, delta.data_ptr<float>(), dq_acc.data_ptr<float>(), cudaStream_t{});
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd, pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("attn_mask"),
        pybind11::arg("key_padding_mask"), pybind11::arg("dropout_p"), pybind11::arg("causal"), pybind11::arg("scale"),
        pybind11::arg("seed"), pybind11::arg("offset"), pybind11::arg("out"), pybind11::arg("lse"),
        pybind11::arg("mask_tile") = true);
  m.def("bwd", &bwd);
}
