// layer_norm backward on CUDA: the nvcc instantiations of layer_norm_cuda.cuh's backward kernels
// (the row kernel per dtype pair and pack width, the dw / db column kernel per weight dtype). A
// file of its own so that forward and backward compile in parallel; no ATen.
#include "layer_norm/layer_norm_cuda.cuh"

namespace ff::layer_norm::gpu {

void bwd_launch(const BwdParams& p, float* partials, const Launch& l) { dispatch<Bwd>(p, partials, l); }

}  // namespace ff::layer_norm::gpu
