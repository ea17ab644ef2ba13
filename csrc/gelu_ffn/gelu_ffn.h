// gelu_ffn: the Transformer feed-forward block, Linear -> +bias -> GELU -> Linear -> +bias -> dropout.
//
// Forward, x (M, C), w1 (F, C), b1 (F,), w2 (C2, F), b2 (C2,):
//   pre = x w1^T + b1                                     (saved, M x F)
//   g   = gelu(pre)
//         exact: gelu(u) = u Phi(u) = 0.5 u (1 + erf(u / sqrt 2))
//         tanh:  gelu(u) = 0.5 u (1 + tanh(k (u + 0.044715 u^3))),  k = sqrt(2 / pi)
//   y   = (g w2^T + b2) * Z                               Z = dropout multiplier of element
//                                                         n = m * C2 + c   (common/philox.h)
// Backward (vector-Jacobian product):
//   dz  = dy * Z;                 db2 = sum_m dz;         dw2 = dz^T g      (g recomputed from pre)
//   dpre = (dz w2) * gelu'(pre);  db1 = sum_m dpre;       dw1 = dpre^T x;   dx = dpre w1
//   gelu'(u) = Phi(u) + u phi(u)                                              (exact)
//            = 0.5 (1 + t) + 0.5 u (1 - t^2) k (1 + 3 * 0.044715 u^2)          (tanh, t as above)
//
// CUDA (gelu_ffn_cuda.cuh, float16 / bfloat16): bias + GELU, bias + dropout and GELU' + db1 are
// the epilogues of tensor-core GEMMs; dw1, dw2, dx are cuBLAS; db1 = sum of the rounded dpre.
//
// CPU — what is fused: the GEMMs are torch's (at::mm_out into views of the outputs, so MKL / oneDNN);
// every element-wise step between them is one pass: bias + GELU (writing pre and g), bias +
// dropout, dropout + db2, and GELU + its derivative + db1 (recomputing g from pre).
// Saved: pre (M, F) in the input dtype. dtypes: float32, bfloat16, float16; the element-wise math
// in float32 on the CPU; the GEMMs in float32 too, except bfloat16 on a CPU with bf16 matrix
// instructions (common/cpu_gemm.h: use_bf16_gemm; docs/cpu_kernels.md), where they run in bf16
// with float32 accumulation. Low-precision outputs are rounded once.
#pragma once
#include <ATen/core/Tensor.h>

#include "common/philox.h"

namespace ff::gelu_ffn {

struct FwdArgs {
  at::Tensor x;     // (M, C) contiguous
  at::Tensor w1;    // (F, C) contiguous
  at::Tensor b1;    // (F,) or undefined
  at::Tensor w2;    // (C2, F) contiguous
  at::Tensor b2;    // (C2,) or undefined
  at::Tensor y;     // (M, C2) output
  at::Tensor pre;   // (M, F) output: the pre-activation
  bool tanh = false;
  DropoutParams dropout;
};

struct BwdArgs {
  at::Tensor dy;    // (M, C2) contiguous
  at::Tensor x;     // (M, C)
  at::Tensor w1;    // (F, C)
  at::Tensor w2;    // (C2, F)
  at::Tensor pre;   // (M, F)
  at::Tensor dx;    // (M, C) output
  at::Tensor dw1;   // (F, C) output
  at::Tensor db1;   // (F,) output, or undefined
  at::Tensor dw2;   // (C2, F) output
  at::Tensor db2;   // (C2,) output, or undefined
  bool tanh = false;
  DropoutParams dropout;
};

void fwd_cpu(const FwdArgs& a);
void bwd_cpu(const BwdArgs& a);
#ifdef FF_WITH_CUDA
// float16 / bfloat16 only; C, F and C2 multiples of 8; x, w1, w2, dy, pre 16-byte aligned
// (gelu_ffn_ops.cpp checks or arranges all of it). Defined in gelu_ffn_cuda.cpp; kernels in
// gelu_ffn_cuda.cuh.
void fwd_cuda(const FwdArgs& a);
void bwd_cuda(const BwdArgs& a);
#endif

}  // namespace ff::gelu_ffn
