// gelu_ffn on CUDA: the launchers the host code (gelu_ffn_cuda.cpp) calls, with raw pointers and no
// ATen, so the nvcc-compiled files (gelu_ffn_cuda_fwd.cu / _bwd.cu, kernels in gelu_ffn_cuda.cuh)
// never parse ATen's headers (about 40 s of nvcc time per file and architecture). `dtype` is x's,
// float16 or bfloat16 (the launchers dispatch on it: common/cuda_utils.cuh, visit_device_dtype).
// The same declarations serve the SIMT emulation (FF_SIMT_EMULATION).
#pragma once
#include <c10/core/ScalarType.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/philox.h"

namespace ff::gelu_ffn {
struct FwdArgs;  // gelu_ffn.h (not included: it brings ATen)
struct BwdArgs;
}  // namespace ff::gelu_ffn

namespace ff::gelu_ffn::cuda {

enum class TileChoice { kAuto, kLarge, kSmall };

struct Launch {
  cudaStream_t stream;
  int num_sms;                          // the device's SM count (picks the tile in kAuto)
  TileChoice tile = TileChoice::kAuto;  // the tests force either
};

// Rows per CTA tile of the two GEMM configurations (gelu_ffn_cuda.cuh asserts they match).
constexpr int kLargeBM = 128, kLargeBN = 128, kSmallBM = 64;

// The large tile when it gives every SM at least one CTA, else the small one.
inline bool use_large_tile(int64_t M, int N, const Launch& l) {
  if (l.tile != TileChoice::kAuto) return l.tile == TileChoice::kLarge;
  return (M + kLargeBM - 1) / kLargeBM * ((N + kLargeBN - 1) / kLargeBN) >= l.num_sms;
}

// Row tiles of a GEMM's grid (rows of the db1 partial buffer).
inline int64_t gemm_tiles_m(int64_t M, int N, const Launch& l) {
  const int bm = use_large_tile(M, N, l) ? kLargeBM : kSmallBM;
  return (M + bm - 1) / bm;
}

// pre = x w1^T + b1, g = gelu(pre): x (M, C), w1 (F, C), b1 (F,) or null, pre / g (M, F).
void gemm_bias_gelu(c10::ScalarType dtype, const void* x, const void* w1, const void* b1, void* pre, void* g,
                    int64_t M, int F, int C, bool tanh, const Launch& l);
// y = (g w2^T + b2) * Z: g (M, F), w2 (C2, F), b2 (C2,) or null, y (M, C2).
void gemm_bias_dropout(c10::ScalarType dtype, const void* g, const void* w2, const void* b2, void* y, int64_t M,
                       int C2, int F, const DropoutParams& dropout, const Launch& l);
// dz = dy * Z (dz null: not stored) and column sums of dz per chunk of rows (partial null: none).
void dropout_colsum(c10::ScalarType dtype, const void* dy, void* dz, float* partial, int64_t M, int N,
                    int64_t chunks, int64_t rows_per_chunk, const DropoutParams& dropout, cudaStream_t stream);
// dpre = (dz w2) * gelu'(pre), g = gelu(pre), per-tile column sums of dpre (partial null: none):
// dz (M, C2), w2 (C2, F), pre / dpre / g (M, F), partial (gemm_tiles_m(M, F), F).
void gemm_dgelu(c10::ScalarType dtype, const void* dz, const void* w2, const void* pre, void* dpre, void* g,
                float* partial, int64_t M, int F, int C2, bool tanh, const Launch& l);
// out (N,) = sum over the rows of partial (rows, N), in order.
void colsum_reduce(c10::ScalarType dtype, const float* partial, int64_t rows, int N, void* out, cudaStream_t stream);

// The whole forward / backward (gelu_ffn_cuda.cpp): workspaces, the launches above, cuBLAS GEMMs.
void forward(const FwdArgs& a, const Launch& l);
void backward(const BwdArgs& a, const Launch& l);

}  // namespace ff::gelu_ffn::cuda
