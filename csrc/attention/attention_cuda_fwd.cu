// attention forward on CUDA: the nvcc instantiations of attention_cuda.cuh's forward kernel
// (float16 / bfloat16 x head-dim buckets 64, 128, 256).
#include "attention/attention_cuda.cuh"

namespace ff::attention::gpu {

void fwd_launch(const FwdParams& p, cudaStream_t stream) {
  ff::cuda::visit_device_dtype<LowPrecisionDtypes>(p.pb.dtype, "attention (cuda)", [&]<typename T>(TypeTag<T>) {
    launch_fwd_any<T>(p, stream);
  });
}

}  // namespace ff::attention::gpu
