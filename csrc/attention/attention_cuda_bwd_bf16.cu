// attention backward on CUDA, __nv_bfloat16: the nvcc instantiations of attention_cuda.cuh's backward
// kernels for the head-dim buckets 64, 128, 256 (one file per dtype, for parallel compiles).
#include "attention/attention_cuda.cuh"

namespace ff::attention::gpu {

template <typename T>
void bwd_launch(const BwdParams& p, float* delta, float* dq_acc, cudaStream_t stream) {
  launch_bwd_any<typename ff::cuda::DeviceType<T>::type>(p, delta, dq_acc, stream);
}
template void bwd_launch<c10::BFloat16>(const BwdParams& p, float* delta, float* dq_acc, cudaStream_t stream);

}  // namespace ff::attention::gpu
