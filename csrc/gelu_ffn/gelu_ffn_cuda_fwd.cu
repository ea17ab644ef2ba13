// gelu_ffn forward launchers (declared in gelu_ffn_cuda.h; kernels in gelu_ffn_cuda.cuh): the
// instantiations of the two forward GEMMs. Forward and backward live in separate files so that
// they compile in parallel; neither includes ATen.
#include "gelu_ffn/gelu_ffn_cuda.cuh"

namespace ff::gelu_ffn::cuda {
namespace {

template <typename T>
void bias_gelu(const void* x, const void* w1, const void* b1, void* pre, void* g, int64_t M, int F, int C, bool tanh,
               const Launch& l) {
  const tc::BiasGeluEpilogue<T> epi{static_cast<const T*>(b1), static_cast<T*>(pre), static_cast<T*>(g), F, tanh};
  tc::gemm<T, false>(static_cast<const T*>(x), static_cast<const T*>(w1), M, F, C, epi, l);
}

template <typename T>
void bias_dropout(const void* g, const void* w2, const void* b2, void* y, int64_t M, int C2, int F,
                  const DropoutParams& dropout, const Launch& l) {
  const tc::BiasDropoutEpilogue<T> epi{static_cast<const T*>(b2), static_cast<T*>(y), C2, dropout};
  tc::gemm<T, false>(static_cast<const T*>(g), static_cast<const T*>(w2), M, C2, F, epi, l);
}

}  // namespace

void gemm_bias_gelu(c10::ScalarType dtype, const void* x, const void* w1, const void* b1, void* pre, void* g,
                    int64_t M, int F, int C, bool tanh, const Launch& l) {
  ff::cuda::visit_device_dtype<LowPrecisionDtypes>(dtype, "gelu_ffn (cuda)", [&]<typename T>(TypeTag<T>) {
    bias_gelu<T>(x, w1, b1, pre, g, M, F, C, tanh, l);
  });
}

void gemm_bias_dropout(c10::ScalarType dtype, const void* g, const void* w2, const void* b2, void* y, int64_t M,
                       int C2, int F, const DropoutParams& dropout, const Launch& l) {
  ff::cuda::visit_device_dtype<LowPrecisionDtypes>(dtype, "gelu_ffn (cuda)", [&]<typename T>(TypeTag<T>) {
    bias_dropout<T>(g, w2, b2, y, M, C2, F, dropout, l);
  });
}

}  // namespace ff::gelu_ffn::cuda
