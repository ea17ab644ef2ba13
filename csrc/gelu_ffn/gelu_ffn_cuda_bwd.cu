// gelu_ffn backward on CUDA GPUs: the entry point; the kernels are in gelu_ffn_cuda.cuh.
#include <c10/cuda/CUDAStream.h>

#include "gelu_ffn/gelu_ffn_cuda.cuh"

namespace ff::gelu_ffn {

void bwd_cuda(const BwdArgs& a) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const tc::Launch l{c10::cuda::getCurrentCUDAStream().stream(), sms};
  if (a.x.scalar_type() == at::kHalf) {
    tc::backward<__half>(a, l);
  } else {
    TORCH_CHECK(a.x.scalar_type() == at::kBFloat16, "gelu_ffn (cuda): unsupported dtype ", a.x.scalar_type());
    tc::backward<__nv_bfloat16>(a, l);
  }
}

}  // namespace ff::gelu_ffn
