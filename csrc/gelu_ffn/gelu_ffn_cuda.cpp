// gelu_ffn on CUDA: the host side — workspaces, the kernel launches in order, the cuBLAS GEMMs —
// and the entry points fwd_cuda / bwd_cuda. The algorithm is described in gelu_ffn_cuda.cuh.
// Host code only (the host compiler builds it; ATen's headers would cost nvcc ~40 s per file and
// architecture). The emulated tests compile this file with -DFF_SIMT_EMULATION and run forward /
// backward on CPU tensors (at::mm_out is then torch's CPU GEMM).
#if defined(FF_WITH_CUDA) || defined(FF_SIMT_EMULATION)
#include <ATen/ATen.h>

#include <algorithm>

#include "gelu_ffn/gelu_ffn.h"
#include "gelu_ffn/gelu_ffn_cuda.h"

#ifndef FF_SIMT_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace ff::gelu_ffn {
namespace cuda {
namespace {

const void* cptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
void* mptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
float* fptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

}  // namespace

void forward(const FwdArgs& a, const Launch& l) {
  const c10::ScalarType dtype = a.x.scalar_type();  // checked where the launchers dispatch
  const int64_t M = a.x.size(0);
  const int C = static_cast<int>(a.x.size(1)), F = static_cast<int>(a.w1.size(0)), C2 = static_cast<int>(a.w2.size(0));
  const at::Tensor g = at::empty({M, F}, a.x.options());
  gemm_bias_gelu(dtype, cptr(a.x), cptr(a.w1), cptr(a.b1), mptr(a.pre), mptr(g), M, F, C, a.tanh, l);
  gemm_bias_dropout(dtype, cptr(g), cptr(a.w2), cptr(a.b2), mptr(a.y), M, C2, F, a.dropout, l);
}

void backward(const BwdArgs& a, const Launch& l) {
  const c10::ScalarType dtype = a.x.scalar_type();  // checked where the launchers dispatch
  const int64_t M = a.x.size(0);
  const int F = static_cast<int>(a.w1.size(0)), C2 = static_cast<int>(a.w2.size(0));
  const at::TensorOptions f32 = a.x.options().dtype(at::kFloat);

  // dz = dy * Z and the db2 partials: row chunks of at least 64 rows, at most 1024 chunks.
  at::Tensor dz = a.dy;
  if (a.dropout.enabled || a.db2.defined()) {
    const int64_t rows_per_chunk = std::max<int64_t>(64, (M + 1023) / 1024);
    const int64_t chunks = (M + rows_per_chunk - 1) / rows_per_chunk;
    if (a.dropout.enabled) dz = at::empty({M, C2}, a.x.options());
    const at::Tensor partial = a.db2.defined() ? at::empty({chunks, C2}, f32) : at::Tensor();
    dropout_colsum(dtype, cptr(a.dy), a.dropout.enabled ? mptr(dz) : nullptr, fptr(partial), M, C2, chunks,
                   rows_per_chunk, a.dropout, l.stream);
    if (a.db2.defined()) colsum_reduce(dtype, fptr(partial), chunks, C2, mptr(a.db2), l.stream);
  }

  // dpre, g = dgelu(dz w2) and the db1 partials (one row per CTA row tile).
  const at::Tensor dpre = at::empty({M, F}, a.x.options());
  const at::Tensor g = at::empty({M, F}, a.x.options());
  const int64_t tiles = gemm_tiles_m(M, F, l);
  const at::Tensor partial = a.db1.defined() ? at::empty({tiles, F}, f32) : at::Tensor();
  gemm_dgelu(dtype, cptr(dz), cptr(a.w2), cptr(a.pre), mptr(dpre), mptr(g), fptr(partial), M, F, C2, a.tanh, l);
  if (a.db1.defined()) colsum_reduce(dtype, fptr(partial), tiles, F, mptr(a.db1), l.stream);

  // The GEMMs without an epilogue: cuBLAS, straight into the outputs.
  at::Tensor dw2 = a.dw2, dw1 = a.dw1, dx = a.dx;
  at::mm_out(dw2, dz.t(), g);
  at::mm_out(dw1, dpre.t(), a.x);
  at::mm_out(dx, dpre, a.w1);
}

}  // namespace cuda

#ifndef FF_SIMT_EMULATION
namespace {

cuda::Launch current_launch() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return cuda::Launch{c10::cuda::getCurrentCUDAStream().stream(), sms};
}

}  // namespace

void fwd_cuda(const FwdArgs& a) { cuda::forward(a, current_launch()); }
void bwd_cuda(const BwdArgs& a) { cuda::backward(a, current_launch()); }
#endif

}  // namespace ff::gelu_ffn
#endif  // FF_WITH_CUDA || FF_SIMT_EMULATION
