// layer_norm forward on CUDA: the nvcc instantiations of layer_norm_cuda.cuh's forward kernel
// (input float32 / float16 / bfloat16 x weight in that dtype or float32 x 16-byte or scalar packs).
// No ATen: the host side is layer_norm_cuda.cpp.
#include "layer_norm/layer_norm_cuda.cuh"

namespace ff::layer_norm::gpu {

void fwd_launch(const FwdParams& p, const Launch& l) { dispatch<Fwd>(p, l); }

}  // namespace ff::layer_norm::gpu
