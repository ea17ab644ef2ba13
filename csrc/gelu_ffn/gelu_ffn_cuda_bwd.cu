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

void gemm_dgelu(c10::ScalarType dtype, const void* dz, const void* w2, const void* pre, void* dpre, void* g,
                float* partial, int64_t M, int F, int C2, bool tanh, const Launch& l) {
  ff::cuda::visit_device_dtype<LowPrecisionDtypes>(dtype, "gelu_ffn (cuda)", [&]<typename T>(TypeTag<T>) {
    dgelu<T>(dz, w2, pre, dpre, g, partial, M, F, C2, tanh, l);
  });
}

void dropout_colsum(c10::ScalarType dtype, const void* dy, void* dz, float* partial, int64_t M, int N,
                    int64_t chunks, int64_t rows_per_chunk, const DropoutParams& dropout, cudaStream_t stream) {
  ff::cuda::visit_device_dtype<LowPrecisionDtypes>(dtype, "gelu_ffn (cuda)", [&]<typename T>(TypeTag<T>) {
    tc::dropout_colsum(static_cast<const T*>(dy), static_cast<T*>(dz), partial, M, N, chunks, rows_per_chunk,
                       dropout, stream);
  });
}

void colsum_reduce(c10::ScalarType dtype, const float* partial, int64_t rows, int N, void* out, cudaStream_t stream) {
  ff::cuda::visit_device_dtype<LowPrecisionDtypes>(dtype, "gelu_ffn (cuda)", [&]<typename T>(TypeTag<T>) {
    tc::colsum_reduce(partial, rows, N, static_cast<T*>(out), stream);
  });
}

}  // namespace ff::gelu_ffn::cuda
