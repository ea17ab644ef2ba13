// attention forward on CUDA: the nvcc instantiations of attention_cuda.cuh's forward kernel
// (float16 / bfloat16 x head-dim buckets 64, 128, 256).
#include "attention/attention_cuda.cuh"

namespace ff::attention::gpu {

void fwd_launch(const FwdParams& p, cudaStream_t stream) {
  if (p.pb.dtype == c10::ScalarType::Half) return launch_fwd_any<__half>(p, stream);
  launch_fwd_any<__nv_bfloat16>(p, stream);
}

}  // namespace ff::attention::gpu
