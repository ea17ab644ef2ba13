// attention on CUDA: the entry points fwd_cuda / bwd_cuda (workspace and stream); the kernels are
// in attention_cuda.cuh, instantiated by attention_cuda_fwd.cu and attention_cuda_bwd_*.cu. Host
// code only, so the host compiler builds it (ATen's headers cost nvcc a minute).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include "attention/attention.h"

namespace ff::attention {

void fwd_cuda(const FwdParams& p) { gpu::fwd_launch(p, c10::cuda::getCurrentCUDAStream()); }

void bwd_cuda(const BwdParams& p) {
  const Problem& pb = p.pb;
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, c10::cuda::current_device());
  at::Tensor delta = at::empty({pb.B, pb.H, pb.Sq}, opts);
  // The float32 dQ accumulator of the atomic path (zeroed by the delta kernel).
  at::Tensor dq_acc = p.deterministic ? at::Tensor() : at::empty({pb.B, pb.H, pb.Sq, pb.D}, opts);
  float* acc = p.deterministic ? nullptr : dq_acc.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (pb.dtype == c10::ScalarType::Half) {
    gpu::bwd_launch_f16(p, delta.data_ptr<float>(), acc, stream);
  } else {
    gpu::bwd_launch_bf16(p, delta.data_ptr<float>(), acc, stream);
  }
}

}  // namespace ff::attention
