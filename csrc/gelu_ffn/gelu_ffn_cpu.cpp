// gelu_ffn on the CPU: the math is in gelu_ffn.h.
//
// Four GEMMs' worth of work go to torch's BLAS (at::mm_out into views of the outputs: MKL on x86);
// everything element-wise between them is one multi-threaded pass of vectorized float32 loops:
//
//   forward:   pre = x w1^T                       GEMM, written straight into the saved pre
//              pre += b1; g = gelu(pre)            one pass (rows split over threads)
//              y = g w2^T                          GEMM
//              y = (y + b2) * Z                    one pass, only with a b2 or dropout
//   backward:  dz = dy * Z; db2 = colsum(dz)       one pass (only dz with dropout)
//              dg = dz w2                          GEMM
//              g = gelu(pre); dpre = dg * gelu'(pre) over dg; db1 = colsum(dpre)
//                                                  one pass (columns split over threads, so each
//                                                  bias-gradient column is summed by one thread in
//                                                  row order: deterministic for any thread count)
//              dw2 = dz^T g; dw1 = dpre^T x; dx = dpre w1      GEMMs
//
// Compared with eager PyTorch this saves the bias copies of addmm, the separate GELU / GELU-backward
// / bias-gradient passes and the allocations behind them; g is recomputed in the backward instead
// of being kept from the forward. Long inputs are processed in blocks of R rows (the weight
// gradients accumulated over blocks) so that g / dg scratch stays bounded; R is large because
// every GEMM call re-packs its weight operand.
//
// Low precision, by what the CPU can do (common/cpu_gemm.h decides, once per process):
//  * bfloat16 where the CPU has bf16 dot-product instructions (avx512_bf16 / amx_bf16): the GEMMs
//    take the bfloat16 tensors (at::mm / at::addmm: oneDNN, float32 accumulation, outputs rounded
//    to bfloat16 as F.linear's are), the passes between them convert rows to float32 and back;
//    pre, g, dz and dpre are bfloat16, at the points where eager PyTorch rounds them;
//  * bfloat16 elsewhere, and float16 everywhere: the float32 code on float32 copies, outputs
//    rounded once (see fwd_cpu).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/cpu.h"
#include "common/cpu_gemm.h"
#include "common/cpu_kernels.h"
#include "gelu_ffn/gelu_ffn.h"

namespace ff::gelu_ffn {
namespace {

using ff::cpu::bf16_to_f32;
using ff::cpu::dropout_row;
using ff::cpu::exp_f32;
using ff::cpu::f32_to_bf16;
using BF16 = c10::BFloat16;

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;
constexpr float kTanhC = 0.044715f;

// ---------------------------------------------------------------------------------------------
// Vectorizable float32 math (the same exp as attention_cpu.cpp)
// ---------------------------------------------------------------------------------------------

__attribute__((always_inline)) inline float abs_f32(float x) {
  return std::bit_cast<float>(std::bit_cast<uint32_t>(x) & 0x7fffffffu);
}

// |x| carrying the sign of s.
__attribute__((always_inline)) inline float with_sign_of(float ax, float s) {
  return std::bit_cast<float>(std::bit_cast<uint32_t>(ax) | (std::bit_cast<uint32_t>(s) & 0x80000000u));
}

// erf(x) = 1 - t (a1 + t (a2 + ...)) exp(-x^2), t = 1 / (1 + p |x|), sign restored
// (Abramowitz & Stegun 7.1.26; absolute error <= 1.5e-7).
// erf(x) given e = exp(-x^2): the backward has that exponential anyway (the normal density).
__attribute__((always_inline)) inline float erf_given_exp(float x, float e) {
  const float ax = abs_f32(x);
  const float t = 1.f / (1.f + 0.3275911f * ax);
  float poly = 1.061405429f;
  poly = poly * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  return with_sign_of(1.f - poly * t * e, x);
}

__attribute__((always_inline)) inline float erf_f32(float x) { return erf_given_exp(x, exp_f32(-x * x)); }

// tanh(z) = sign(z) (1 - e) / (1 + e), e = exp(-2 |z|) in (0, 1].
__attribute__((always_inline)) inline float tanh_f32(float z) {
  const float e = exp_f32(-2.f * abs_f32(z));
  return with_sign_of((1.f - e) / (1.f + e), z);
}

// ---------------------------------------------------------------------------------------------
// Row passes (float32, multi-versioned)
// ---------------------------------------------------------------------------------------------
// u += b (b may be null); g = gelu(u).
FF_CPU_CLONES void bias_gelu_row(float* u, const float* b, float* g, int64_t n, bool tanh) {
  if (b) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) u[j] += b[j];
  }
  if (tanh) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float x = u[j];
      g[j] = 0.5f * x * (1.f + tanh_f32(kSqrt2OverPi * (x + kTanhC * x * x * x)));
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float x = u[j];
      g[j] = 0.5f * x * (1.f + erf_f32(x * kInvSqrt2));
    }
  }
}

// g = gelu(u); d = d * gelu'(u)   (d holds dgelu on entry, dpre on exit)
FF_CPU_CLONES void gelu_bwd_row(const float* u, float* d, float* g, int64_t n, bool tanh) {
  if (tanh) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float x = u[j];
      const float t = tanh_f32(kSqrt2OverPi * (x + kTanhC * x * x * x));
      g[j] = 0.5f * x * (1.f + t);
      d[j] *= 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kTanhC * x * x);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float x = u[j], z = x * kInvSqrt2;
      const float e = exp_f32(-z * z);  // exp(-x^2 / 2): in erf(z) and in the density
      const float cdf = 0.5f * (1.f + erf_given_exp(z, e));
      g[j] = x * cdf;
      d[j] *= cdf + x * e * kInvSqrt2Pi;
    }
  }
}

// y = (y + b) * z   (b or z may be null)
FF_CPU_CLONES void bias_scale_row(float* y, const float* b, const float* z, int64_t n) {
  if (b) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] += b[j];
  }
  if (z) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] *= z[j];
  }
}

FF_CPU_CLONES void accumulate_row(float* acc, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] += x[j];
}

// out = x * z
FF_CPU_CLONES void scale_row(const float* x, const float* z, float* out, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = x[j] * z[j];
}


// ---------------------------------------------------------------------------------------------
// Blocking
// ---------------------------------------------------------------------------------------------
// Rows per block. Each GEMM call re-packs its weight operand (F x C floats), which costs about
// 50 / R of the GEMM itself, so blocks are large: the block exists to bound the scratch memory
// (g and dg are R x F, about 32 MiB at most) for long inputs, not to fit a cache.
int64_t block_rows(int64_t M, int64_t F, int64_t elem_bytes = sizeof(float)) {
  const int64_t by_memory = (int64_t{32} << 20) / elem_bytes / F;  // R x F elements <= 32 MiB
  return std::min<int64_t>(M, std::max<int64_t>(1024, by_memory));
}

// Column ranges for a column-parallel pass: about one per thread, multiples of 16 wide.
int64_t column_grain(int64_t n) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(16, (n / threads + 15) / 16 * 16);
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// Scratch memory kept between calls, per calling thread, up to kKeptScratchBytes. A fresh
// multi-megabyte allocation is mapped page by page by the kernel on first touch (~12 ms per
// 32 MiB here, as much as the element-wise passes themselves); the activations' scratch (g, dg)
// is the same size call after call, so it is kept. Larger requests are allocated per call.
constexpr int64_t kKeptScratchBytes = int64_t{64} << 20;

at::Tensor scratch(int64_t n, at::ScalarType dtype = at::kFloat) {
  thread_local at::Tensor kept_f32, kept_bf16;
  at::Tensor& kept = dtype == at::kFloat ? kept_f32 : kept_bf16;
  const auto opts = at::TensorOptions().dtype(dtype);
  if (n * static_cast<int64_t>(c10::elementSize(dtype)) > kKeptScratchBytes) return at::empty({n}, opts);
  if (!kept.defined() || kept.numel() < n) kept = at::empty({n}, opts);
  return kept.narrow(0, 0, n);
}

// ---------------------------------------------------------------------------------------------
// forward (float32)
// ---------------------------------------------------------------------------------------------
void forward_f32(const FwdArgs& a) {
  const int64_t M = a.x.size(0), F = a.w1.size(0), C2 = a.w2.size(0);
  const int64_t R = block_rows(M, F);
  const float* b1 = ptr_or_null(a.b1);
  const float* b2 = ptr_or_null(a.b2);
  at::Tensor g = scratch(R * F).view({R, F});
  const at::Tensor w1t = a.w1.t(), w2t = a.w2.t();

  for (int64_t r0 = 0; r0 < M; r0 += R) {
    const int64_t rows = std::min(R, M - r0);
    at::Tensor pre_b = a.pre.narrow(0, r0, rows), g_b = g.narrow(0, 0, rows), y_b = a.y.narrow(0, r0, rows);
    at::mm_out(pre_b, a.x.narrow(0, r0, rows), w1t);
    float* pre_p = pre_b.data_ptr<float>();
    float* g_p = g_b.data_ptr<float>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / F), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) bias_gelu_row(pre_p + i * F, b1, g_p + i * F, F, a.tanh);
    });
    at::mm_out(y_b, g_b, w2t);
    if (!b2 && !a.dropout.enabled) continue;
    float* y_p = y_b.data_ptr<float>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / C2), [&](int64_t i0, int64_t i1) {
      std::vector<float> z(a.dropout.enabled ? C2 : 0);
      for (int64_t i = i0; i < i1; ++i) {
        if (a.dropout.enabled) dropout_row(a.dropout, static_cast<uint64_t>((r0 + i) * C2), z.data(), C2);
        bias_scale_row(y_p + i * C2, b2, a.dropout.enabled ? z.data() : nullptr, C2);
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------
// backward (float32)
// ---------------------------------------------------------------------------------------------
void backward_f32(const BwdArgs& a) {
  const int64_t M = a.x.size(0), F = a.w1.size(0), C2 = a.w2.size(0);
  const int64_t R = block_rows(M, F);
  const bool dropout = a.dropout.enabled;
  at::Tensor dz = dropout ? at::empty({R, C2}, a.dy.options()) : at::Tensor();
  at::Tensor work = scratch(2 * R * F);  // dg (then dpre) and g
  at::Tensor dg = work.narrow(0, 0, R * F).view({R, F});
  at::Tensor g = work.narrow(0, R * F, R * F).view({R, F});
  std::vector<float> db1(a.db1.defined() ? F : 0, 0.f), db2(a.db2.defined() ? C2 : 0, 0.f);
  at::Tensor dw1 = a.dw1, dw2 = a.dw2;

  for (int64_t r0 = 0; r0 < M; r0 += R) {
    const int64_t rows = std::min(R, M - r0);
    const at::Tensor dy_b = a.dy.narrow(0, r0, rows);
    const at::Tensor dz_b = dropout ? dz.narrow(0, 0, rows) : dy_b;
    at::Tensor dg_b = dg.narrow(0, 0, rows), g_b = g.narrow(0, 0, rows);

    // dz = dy * Z and db2 += colsum(dz): columns split over threads, rows summed in order.
    if (dropout || !db2.empty()) {
      const float* dy_p = dy_b.data_ptr<float>();
      float* dz_p = dropout ? dz_b.data_ptr<float>() : nullptr;
      at::parallel_for(0, C2, column_grain(C2), [&](int64_t c0, int64_t c1) {
        const int64_t n = c1 - c0;
        std::vector<float> z(dropout ? n : 0);
        for (int64_t i = 0; i < rows; ++i) {
          const float* row = dy_p + i * C2 + c0;
          if (dropout) {
            dropout_row(a.dropout, static_cast<uint64_t>((r0 + i) * C2 + c0), z.data(), n);
            scale_row(row, z.data(), dz_p + i * C2 + c0, n);
            row = dz_p + i * C2 + c0;
          }
          if (!db2.empty()) accumulate_row(db2.data() + c0, row, n);
        }
      });
    }

    // dg = dz w2; then one pass: g = gelu(pre), dpre = dg * gelu'(pre) over dg, db1 += colsum(dpre).
    at::mm_out(dg_b, dz_b, a.w2);
    const float* pre_p = a.pre.data_ptr<float>() + r0 * F;
    float* dg_p = dg_b.data_ptr<float>();
    float* g_p = g_b.data_ptr<float>();
    at::parallel_for(0, F, column_grain(F), [&](int64_t f0, int64_t f1) {
      const int64_t n = f1 - f0;
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t at = i * F + f0;
        gelu_bwd_row(pre_p + at, dg_p + at, g_p + at, n, a.tanh);
        if (!db1.empty()) accumulate_row(db1.data() + f0, dg_p + at, n);
      }
    });

    // dw2 += dz^T g, dw1 += dpre^T x, dx = dpre w1.
    const at::Tensor x_b = a.x.narrow(0, r0, rows);
    if (r0 == 0) {
      at::mm_out(dw2, dz_b.t(), g_b);
      at::mm_out(dw1, dg_b.t(), x_b);
    } else {
      dw2.addmm_(dz_b.t(), g_b);
      dw1.addmm_(dg_b.t(), x_b);
    }
    at::Tensor dx_b = a.dx.narrow(0, r0, rows);
    at::mm_out(dx_b, dg_b, a.w1);
  }
  if (!db1.empty()) std::copy(db1.begin(), db1.end(), a.db1.data_ptr<float>());
  if (!db2.empty()) std::copy(db2.begin(), db2.end(), a.db2.data_ptr<float>());
}

// ---------------------------------------------------------------------------------------------
// bfloat16 with bfloat16 GEMMs (CPUs with bf16 dot-product instructions; forced anywhere for tests)
// ---------------------------------------------------------------------------------------------
// The GEMMs are torch's on the bfloat16 tensors: at::addmm puts the bias into the GEMM (one
// rounding, as F.linear), at::mm_out / addmm_ write straight into the outputs. The element-wise
// passes read bfloat16 rows into float32 row buffers, run the float32 row functions above and round
// once. Rounded to bfloat16 (as eager PyTorch and the reference): pre, g, y, dz, dg, dpre and the
// weight gradients; in float32: the GELU and its derivative, the bias-gradient sums.

// y = y * z for a bfloat16 row, through the float32 buffer u.
void scale_row_bf16(BF16* y, const float* z, float* u, int64_t n) {
  bf16_to_f32(y, u, n);
  scale_row(u, z, u, n);
  f32_to_bf16(u, y, n);
}

void forward_bf16(const FwdArgs& a) {
  const int64_t M = a.x.size(0), F = a.w1.size(0), C2 = a.w2.size(0);
  const int64_t R = block_rows(M, F, sizeof(BF16));
  at::Tensor g = scratch(R * F, at::kBFloat16).view({R, F});
  const at::Tensor w1t = a.w1.t(), w2t = a.w2.t();

  for (int64_t r0 = 0; r0 < M; r0 += R) {
    const int64_t rows = std::min(R, M - r0);
    at::Tensor pre_b = a.pre.narrow(0, r0, rows), g_b = g.narrow(0, 0, rows), y_b = a.y.narrow(0, r0, rows);
    const at::Tensor x_b = a.x.narrow(0, r0, rows);
    if (a.b1.defined()) at::addmm_out(pre_b, a.b1, x_b, w1t);
    else at::mm_out(pre_b, x_b, w1t);
    const BF16* pre_p = pre_b.data_ptr<BF16>();
    BF16* g_p = g_b.data_ptr<BF16>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / F), [&](int64_t i0, int64_t i1) {
      std::vector<float> u(F), gv(F);
      for (int64_t i = i0; i < i1; ++i) {
        bf16_to_f32(pre_p + i * F, u.data(), F);
        bias_gelu_row(u.data(), nullptr, gv.data(), F, a.tanh);
        f32_to_bf16(gv.data(), g_p + i * F, F);
      }
    });
    if (a.b2.defined()) at::addmm_out(y_b, a.b2, g_b, w2t);
    else at::mm_out(y_b, g_b, w2t);
    if (!a.dropout.enabled) continue;
    BF16* y_p = y_b.data_ptr<BF16>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / C2), [&](int64_t i0, int64_t i1) {
      std::vector<float> z(C2), u(C2);
      for (int64_t i = i0; i < i1; ++i) {
        dropout_row(a.dropout, static_cast<uint64_t>((r0 + i) * C2), z.data(), C2);
        scale_row_bf16(y_p + i * C2, z.data(), u.data(), C2);
      }
    });
  }
}

void backward_bf16(const BwdArgs& a) {
  const int64_t M = a.x.size(0), F = a.w1.size(0), C2 = a.w2.size(0);
  const int64_t R = block_rows(M, F, sizeof(BF16));
  const bool dropout = a.dropout.enabled;
  at::Tensor dz = dropout ? at::empty({R, C2}, a.dy.options()) : at::Tensor();
  at::Tensor work = scratch(2 * R * F, at::kBFloat16);  // dg (then dpre) and g
  at::Tensor dg = work.narrow(0, 0, R * F).view({R, F});
  at::Tensor g = work.narrow(0, R * F, R * F).view({R, F});
  std::vector<float> db1(a.db1.defined() ? F : 0, 0.f), db2(a.db2.defined() ? C2 : 0, 0.f);
  at::Tensor dw1 = a.dw1, dw2 = a.dw2;

  for (int64_t r0 = 0; r0 < M; r0 += R) {
    const int64_t rows = std::min(R, M - r0);
    const at::Tensor dy_b = a.dy.narrow(0, r0, rows);
    const at::Tensor dz_b = dropout ? dz.narrow(0, 0, rows) : dy_b;
    at::Tensor dg_b = dg.narrow(0, 0, rows), g_b = g.narrow(0, 0, rows);

    // dz = dy * Z (rounded) and db2 += colsum(dz) (of the float32 values): columns over threads.
    if (dropout || !db2.empty()) {
      const BF16* dy_p = dy_b.data_ptr<BF16>();
      BF16* dz_p = dropout ? dz_b.data_ptr<BF16>() : nullptr;
      at::parallel_for(0, C2, column_grain(C2), [&](int64_t c0, int64_t c1) {
        const int64_t n = c1 - c0;
        std::vector<float> z(dropout ? n : 0), u(n);
        for (int64_t i = 0; i < rows; ++i) {
          bf16_to_f32(dy_p + i * C2 + c0, u.data(), n);
          if (dropout) {
            dropout_row(a.dropout, static_cast<uint64_t>((r0 + i) * C2 + c0), z.data(), n);
            scale_row(u.data(), z.data(), u.data(), n);
            f32_to_bf16(u.data(), dz_p + i * C2 + c0, n);
          }
          if (!db2.empty()) accumulate_row(db2.data() + c0, u.data(), n);
        }
      });
    }

    // dg = dz w2; then g = gelu(pre), dpre = dg * gelu'(pre) over dg (rounded), db1 += colsum(dpre).
    at::mm_out(dg_b, dz_b, a.w2);
    const BF16* pre_p = a.pre.data_ptr<BF16>() + r0 * F;
    BF16* dg_p = dg_b.data_ptr<BF16>();
    BF16* g_p = g_b.data_ptr<BF16>();
    // Rows over threads: each thread streams whole rows, and sums its rows' dpre into its own db1
    // row, added up in thread order below (column ranges per thread cost 1.3x here, 4096 x 1536).
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    std::vector<float> db1_part(db1.empty() ? 0 : threads * F, 0.f);
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / F), [&](int64_t i0, int64_t i1) {
      std::vector<float> u(F), d(F), gv(F);
      float* acc = db1.empty() ? nullptr : db1_part.data() + at::get_thread_num() * F;
      for (int64_t i = i0; i < i1; ++i) {
        bf16_to_f32(pre_p + i * F, u.data(), F);
        bf16_to_f32(dg_p + i * F, d.data(), F);
        gelu_bwd_row(u.data(), d.data(), gv.data(), F, a.tanh);
        if (acc) accumulate_row(acc, d.data(), F);
        f32_to_bf16(d.data(), dg_p + i * F, F);
        f32_to_bf16(gv.data(), g_p + i * F, F);
      }
    });
    for (int64_t t = 0; t < (db1.empty() ? 0 : threads); ++t) accumulate_row(db1.data(), db1_part.data() + t * F, F);

    // dw2 += dz^T g, dw1 += dpre^T x (one rounding per row block), dx = dpre w1.
    const at::Tensor x_b = a.x.narrow(0, r0, rows);
    if (r0 == 0) {
      at::mm_out(dw2, dz_b.t(), g_b);
      at::mm_out(dw1, dg_b.t(), x_b);
    } else {
      dw2.addmm_(dz_b.t(), g_b);
      dw1.addmm_(dg_b.t(), x_b);
    }
    at::Tensor dx_b = a.dx.narrow(0, r0, rows);
    at::mm_out(dx_b, dg_b, a.w1);
  }
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  if (!db1.empty()) a.db1.copy_(at::from_blob(db1.data(), {F}, f32));
  if (!db2.empty()) a.db2.copy_(at::from_blob(db2.data(), {C2}, f32));
}

// float32 copy of a tensor (undefined stays undefined).
at::Tensor f32(const at::Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; }

// float32 buffer for a low-precision output (undefined stays undefined).
at::Tensor f32_like(const at::Tensor& t) { return t.defined() ? at::empty(t.sizes(), t.options().dtype(at::kFloat)) : t; }

void copy_out(const at::Tensor& dst, const at::Tensor& src) {
  if (dst.defined()) dst.copy_(src);
}

}  // namespace

// Low precision: bfloat16 takes bf16 GEMMs where common/cpu_gemm.h says the CPU runs them fast.
// Otherwise (and float16 always) the float32 kernels run on float32 copies and the outputs are
// rounded once: on CPUs without bf16 / fp16 dot-product instructions torch's low-precision GEMM is
// several times slower than its float32 one (measured: 4x for bfloat16 on an AVX-512 Xeon, 10x on
// an AVX2 EPYC), and the result is closer to the float64 reference than a low-precision GEMM chain.
void fwd_cpu(const FwdArgs& a) {
  if (a.x.scalar_type() == at::kFloat) return forward_f32(a);
  if (a.x.scalar_type() == at::kBFloat16 && ff::cpu::use_bf16_gemm(ff::cpu::GemmOp::kGeluFfn))
    return forward_bf16(a);
  TORCH_CHECK_TYPE(a.x.scalar_type() == at::kBFloat16 || a.x.scalar_type() == at::kHalf,
                   "gelu_ffn: unsupported dtype ", a.x.scalar_type());
  FwdArgs f{f32(a.x), f32(a.w1), f32(a.b1), f32(a.w2), f32(a.b2), f32_like(a.y), f32_like(a.pre), a.tanh, a.dropout};
  forward_f32(f);
  copy_out(a.y, f.y);
  copy_out(a.pre, f.pre);
}

void bwd_cpu(const BwdArgs& a) {
  if (a.x.scalar_type() == at::kFloat) return backward_f32(a);
  if (a.x.scalar_type() == at::kBFloat16 && ff::cpu::use_bf16_gemm(ff::cpu::GemmOp::kGeluFfn))
    return backward_bf16(a);
  TORCH_CHECK_TYPE(a.x.scalar_type() == at::kBFloat16 || a.x.scalar_type() == at::kHalf,
                   "gelu_ffn: unsupported dtype ", a.x.scalar_type());
  BwdArgs f{f32(a.dy),         f32(a.x),          f32(a.w1),          f32(a.w2), f32(a.pre),
            f32_like(a.dx),    f32_like(a.dw1),   f32_like(a.db1),    f32_like(a.dw2),
            f32_like(a.db2),   a.tanh,            a.dropout};
  backward_f32(f);
  copy_out(a.dx, f.dx);
  copy_out(a.dw1, f.dw1);
  copy_out(a.db1, f.db1);
  copy_out(a.dw2, f.dw2);
  copy_out(a.db2, f.db2);
}

}  // namespace ff::gelu_ffn
