// layer_norm: LayerNorm / RMSNorm fused with dropout on the input and a residual add.
//
// Forward, per row m of the (M, N) input:
//   h = x * Z + residual              Z = dropout multiplier of element (m, c) (common/philox.h)
//   LayerNorm: mean = sum(h) / N,  rstd = 1 / sqrt(sum((h - mean)^2) / N + eps)
//              y = (h - mean) * rstd * w + b
//   RMSNorm:   rstd = 1 / sqrt(sum(h^2) / N + eps),  y = h * rstd * w
// h is rounded to the input dtype (and stored when it differs from x) before the statistics, so
// the backward, which reads the stored h, sees exactly what the forward normalized.
//
// Backward (vector-Jacobian product), xhat = (h - mean) * rstd, g = dy * w:
//   dh = rstd * (g - xhat * sum(g * xhat) / N - sum(g) / N) + dh_out      (RMSNorm: no sum(g) term)
//   dx = dh * Z;  dw = sum_m dy * xhat;  db = sum_m dy
// dw / db are reduced deterministically in two stages: fixed row blocks write float32 partials,
// then a column pass adds the partials in block order.
//
// Saved: mean and rstd (float32, M each; mean empty for RMSNorm) and h when it differs from x.
// dtypes: x / residual / y / h in float32, float16 or bfloat16; weight and bias in x's dtype or
// float32. Any width N >= 1.
#pragma once
#include <cstdint>

#include <c10/core/ScalarType.h>

#include "common/philox.h"

namespace ff::layer_norm {

struct FwdParams {
  const void* x;          // (M, N)
  const void* residual;   // (M, N) or nullptr
  const void* weight;     // (N,) or nullptr
  const void* bias;       // (N,) or nullptr
  void* y;                // (M, N)
  void* h;                // (M, N) pre-norm sum, or nullptr when h == x
  float* mean;            // (M,) or nullptr for RMSNorm
  float* rstd;            // (M,)
  int64_t M, N;
  float eps;
  bool rms;
  DropoutParams dropout;
  c10::ScalarType dtype, wtype;
};

struct BwdParams {
  const void* dy;         // (M, N)
  const void* dh_out;     // (M, N) or nullptr
  const void* h;          // (M, N) the normalized input (x when there was no residual/dropout)
  const void* weight;     // (N,) or nullptr
  const float* mean;      // (M,) or nullptr for RMSNorm
  const float* rstd;      // (M,)
  void* dh;               // (M, N) gradient of the pre-norm sum
  void* dx;               // (M, N) or nullptr without dropout
  void* dweight;          // (N,) or nullptr
  void* dbias;            // (N,) or nullptr
  int64_t M, N;
  bool rms;
  DropoutParams dropout;
  c10::ScalarType dtype, wtype;
};

void fwd_cpu(const FwdParams& p);
void bwd_cpu(const BwdParams& p);
#ifdef FF_WITH_CUDA
void fwd_cuda(const FwdParams& p);
void bwd_cuda(const BwdParams& p);
#endif

}  // namespace ff::layer_norm
