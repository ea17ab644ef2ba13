// layer_norm on CUDA: the host side — dtype checks, the backward's float32 scratch, the stream and
// the SM count — and the entry points fwd_cuda / bwd_cuda. The kernels are in layer_norm_cuda.cuh,
// instantiated by layer_norm_cuda_fwd.cu / _bwd.cu. Host code only, so the host compiler builds it
// (ATen's headers would cost nvcc ~40 s per file and architecture). The emulated tests compile this
// file with -DFF_SIMT_EMULATION and run forward / backward on CPU tensors.
#if defined(FF_WITH_CUDA) || defined(FF_SIMT_EMULATION)
#include <ATen/ATen.h>

#include "layer_norm/layer_norm.h"
#include "layer_norm/layer_norm_cuda.h"

#ifndef FF_SIMT_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace ff::layer_norm {
namespace gpu {
namespace {

// What the kernels are instantiated for (layer_norm_ops.cpp checks the same, with the op's name):
// the input dtype is checked where the launchers dispatch on it (layer_norm_cuda.cuh), the weight's here.
template <typename P>
void check_dtypes(const P& p) {
  TORCH_CHECK_TYPE(p.wtype == p.dtype || p.wtype == at::kFloat, "layer_norm (cuda): weight / bias dtype ", p.wtype,
                   " must be float32 or the input's ", p.dtype);
  TORCH_CHECK(p.M > 0 && p.N > 0, "layer_norm (cuda): empty input (", p.M, ", ", p.N, ")");
}

}  // namespace

void forward(const FwdParams& p, const Launch& l) {
  check_dtypes(p);
  fwd_launch(p, l);
}

void backward(const BwdParams& p, const Launch& l) {
  check_dtypes(p);
#ifdef FF_SIMT_EMULATION
  const auto opts = at::TensorOptions().dtype(at::kFloat);  // the emulated kernels run on CPU memory
#else
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, c10::cuda::current_device());
#endif
  // dw / db partials, one row per block (the kernel zeroes its rows before adding to them).
  const at::Tensor partials = at::empty({2, bwd_blocks(p.M, l.num_sms), p.N}, opts);
  bwd_launch(p, partials.data_ptr<float>(), l);
}

}  // namespace gpu

#ifndef FF_SIMT_EMULATION
namespace {

gpu::Launch current_launch() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return gpu::Launch{c10::cuda::getCurrentCUDAStream().stream(), sms};
}

}  // namespace

void fwd_cuda(const FwdParams& p) { gpu::forward(p, current_launch()); }
void bwd_cuda(const BwdParams& p) { gpu::backward(p, current_launch()); }
#endif

}  // namespace ff::layer_norm
#endif  // FF_WITH_CUDA || FF_SIMT_EMULATION
