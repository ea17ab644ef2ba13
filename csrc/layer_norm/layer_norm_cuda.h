// layer_norm on CUDA: the launchers the host code (layer_norm_cuda.cpp) calls. Raw pointers in
// layer_norm.h's FwdParams / BwdParams, no ATen, so the nvcc-compiled files
// (layer_norm_cuda_fwd.cu / _bwd.cu, kernels in layer_norm_cuda.cuh) never parse ATen's headers.
// The same declarations serve the SIMT emulation (FF_SIMT_EMULATION; tests/emu/test_layer_norm_emu.py).
#pragma once
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "layer_norm/layer_norm.h"

namespace ff::layer_norm::gpu {

struct Launch {
  cudaStream_t stream;
  int num_sms;  // the device's SM count (sizes the grids)
};

// Blocks of the backward's row loop, i.e. rows of its dw / db partial buffers.
inline int64_t bwd_blocks(int64_t M, int num_sms) { return std::min<int64_t>(M, static_cast<int64_t>(num_sms) * 4); }

// Forward: y, h (when p.h), mean (when p.mean), rstd. dtype float32 / float16 / bfloat16, weight
// and bias in that dtype or float32; any M, N >= 1, rows contiguous.
void fwd_launch(const FwdParams& p, const Launch& l);
// Backward: dh, dx (when p.dx), dweight / dbias (when given). `partials`: (2, bwd_blocks(M), N)
// float32 scratch on the device, need not be initialised.
void bwd_launch(const BwdParams& p, float* partials, const Launch& l);

// The host side (layer_norm_cuda.cpp): the backward's scratch allocation around bwd_launch. Under
// FF_SIMT_EMULATION it allocates on the CPU, which is where the emulated kernels run.
void forward(const FwdParams& p, const Launch& l);
void backward(const BwdParams& p, const Launch& l);

}  // namespace ff::layer_norm::gpu
