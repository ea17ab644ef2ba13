// gelu_ffn backward launchers (declared in gelu_ffn_cuda.h; kernels in gelu_ffn_cuda.cuh): the
// dGELU GEMM and the two element-wise kernels. No ATen here (see gelu_ffn_cuda_fwd.cu).
#include "gelu_ffn/gelu_ffn_cuda.cuh"

namespace ff::gelu_ffn::cuda {
namespace {

template <typename T>
void dgelu(const void* dz, const void* w2, const void* pre, void* dpre, void* g, float* partial, int64_t M, int F,
           int C2, bool tanh, const Launch& l) {
  const tc::DgeluEpilogue<T> epi{static_cast<const T*>(pre), static_cast<T*>(dpre), static_cast<T*>(g), partial, F,
                                 tanh};
  tc::gemm<T, true>(static_cast<const T*>(dz), static_cast<const T*>(w2), M, F, C2, epi, l);
}

}  // namespace

void gemm_dgelu(bool bf16, const void* dz, const void* w2, const void* pre, void* dpre, void* g, float* partial,
                int64_t M, int F, int C2, bool tanh, const Launch& l) {
  if (bf16) {
    dgelu<__nv_bfloat16>(dz, w2, pre, dpre, g, partial, M, F, C2, tanh, l);
  } else {
    dgelu<__half>(dz, w2, pre, dpre, g, partial, M, F, C2, tanh, l);
  }
}

void dropout_colsum(bool bf16, const void* dy, void* dz, float* partial, int64_t M, int N, int64_t chunks,
                    int64_t rows_per_chunk, const DropoutParams& dropout, cudaStream_t stream) {
  if (bf16) {
    tc::dropout_colsum(static_cast<const __nv_bfloat16*>(dy), static_cast<__nv_bfloat16*>(dz), partial, M, N, chunks,
                       rows_per_chunk, dropout, stream);
  } else {
    tc::dropout_colsum(static_cast<const __half*>(dy), static_cast<__half*>(dz), partial, M, N, chunks, rows_per_chunk,
                       dropout, stream);
  }
}

void colsum_reduce(bool bf16, const float* partial, int64_t rows, int N, void* out, cudaStream_t stream) {
  if (bf16) {
    tc::colsum_reduce(partial, rows, N, static_cast<__nv_bfloat16*>(out), stream);
  } else {
    tc::colsum_reduce(partial, rows, N, static_cast<__half*>(out), stream);
  }
}

}  // namespace ff::gelu_ffn::cuda
