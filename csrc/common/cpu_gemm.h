// Low-precision GEMM strategy of the CPU kernels, decided once per process from what the CPU can do.
//
// A bfloat16 GEMM is fast only where the CPU has bf16 dot-product instructions (AVX512-BF16's
// vdpbf16ps, AMX-BF16's tile multiplies: Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4
// and later). Elsewhere torch emulates it, and it is slower than float32 (measured on an AVX2 AMD
// EPYC: torch's bfloat16 mm 2.5-7.6 GFLOP/s against 50-74 for float32, one thread), so bfloat16
// inputs go through float32 GEMMs on float32 copies there. Each op with GEMMs asks which path its
// bfloat16 inputs take:
//
//   gelu_ffn   bf16: at::mm / at::addmm on the bfloat16 tensors (oneDNN, float32 accumulation,
//              outputs rounded to bfloat16 like F.linear's); auto = the CPU reports avx512_bf16 or
//              amx_bf16 and torch has oneDNN enabled (torch's bf16 matmul then uses them).
//   attention  bf16: MKL's gemm_bf16bf16f32 on the tiles (bfloat16 operands, float32 scores and
//              accumulators); auto = the flags above, and one short measurement at the tile shape
//              (MKL chooses its kernels by CPU vendor as well as flags, so the flags alone do not
//              say it uses them): bf16 only where it beats sgemm by kAttentionMinGain.
//
// Override (tests, experiments): FUSEDFORMER_CPU_BF16_GEMM=auto|on|off, read once at the first
// question, or set_bf16_gemm_mode() (fusedformer.cpu_caps.set_bf16_gemm from Python), which wins
// over the environment. "on" forces the bf16 path where it can run at all (torch's bf16 matmul
// runs on any CPU, slowly without the instructions; the attention path needs MKL).
// float16 inputs always take the float32 path.
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <string>

#include "common/dtype.h"

namespace ff::cpu {

enum class GemmOp : int { kGeluFfn = 0, kAttention = 1 };
enum class Bf16GemmMode : int { kAuto = 0, kOn = 1, kOff = 2 };

struct Bf16GemmPath {
  bool bf16 = false;   // true: bfloat16 operands into bf16 GEMMs, float32 accumulation
  std::string reason;  // why, for `python -m fusedformer info`
};

// The path op's bfloat16 inputs take in this process, and why.
Bf16GemmPath bf16_gemm_path(GemmOp op);
// The same decision, cheap enough for every call.
bool use_bf16_gemm(GemmOp op);

// The kernel an op with GEMMs runs for inputs of dtype t, forward and backward alike: float32 as
// it is; bfloat16 with bfloat16 operands where use_bf16_gemm(op) says; float16, and bfloat16
// elsewhere, the float32 kernel on float32 copies. Either low-precision way the outputs are
// accumulated in float32 and rounded once. A TypeError naming `name` for any other dtype.
enum class GemmPath { kFloat32, kBf16Gemm, kFloat32Copies };
inline GemmPath gemm_path(c10::ScalarType t, GemmOp op, const char* name) {
  check_dtype(t, name);
  if (t == c10::ScalarType::Float) return GemmPath::kFloat32;
  if (t == c10::ScalarType::BFloat16 && use_bf16_gemm(op)) return GemmPath::kBf16Gemm;
  return GemmPath::kFloat32Copies;
}

Bf16GemmMode bf16_gemm_mode();
// Sets the override; returns the previous mode.
Bf16GemmMode set_bf16_gemm_mode(Bf16GemmMode mode);

// Whether torch links MKL's bfloat16 GEMM (cblas_gemm_bf16bf16f32).
bool has_mkl_bf16_gemm();

// Row-major C (m x n, row stride ldc) = alpha op(A) op(B) + beta C with bfloat16 A and B and
// float32 C (accumulation in float32), where op(A) is m x k (A stored m x k, or k x m when trans_a)
// and op(B) is k x n (B stored k x n, or n x k when trans_b); unit column strides. beta = 0 ignores
// C's contents. MKL's gemm_bf16bf16f32, one call (single-threaded inside torch's parallel region);
// only where has_mkl_bf16_gemm().
void gemm_bf16_f32(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const c10::BFloat16* a,
                   int64_t lda, const c10::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc);

}  // namespace ff::cpu
