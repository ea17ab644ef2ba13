// attention backward on CUDA, __nv_bfloat16: the nvcc instantiations of attention_cuda.cuh's backward
// kernels for the head-dim buckets 64, 128, 256 (one file per dtype, for parallel compiles).
#include "attention/attention_cuda.cuh"

namespace ff::attention::gpu {

void bwd_launch_bf16(const BwdParams& p, float* delta, float* dq_acc, cudaStream_t stream) {
  launch_bwd_any<__nv_bfloat16>(p, delta, dq_acc, stream);
}

}  // namespace ff::attention::gpu
