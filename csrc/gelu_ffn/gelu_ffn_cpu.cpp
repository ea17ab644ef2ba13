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
#include <type_traits>
#include <vector>

#include "common/cpu.h"
#include "common/cpu_gemm.h"
#include "common/cpu_kernels.h"
#include "common/dtype.h"
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
// The element-wise passes between the GEMMs, per dtype: float32 rows in place; bfloat16 rows (the
// path with bf16 GEMMs, on CPUs with bf16 dot-product instructions; forced anywhere for tests)
// read into float32 row buffers, through the same float32 row functions, and rounded once.
// Rounded to bfloat16 (as eager PyTorch and the reference): pre, g, y, dz, dg, dpre and the weight
// gradients; in float32: the GELU and its derivative, the bias-gradient sums.
// ---------------------------------------------------------------------------------------------
// pre += b1 (float32 adds the bias here), g = gelu(pre), for the rows of a block.
void bias_gelu_pass(const FwdArgs& a, float* pre_p, float* g_p, int64_t rows) {
  const int64_t F = a.w1.size(0);
  const float* b1 = ptr_or_null(a.b1);
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / F), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) bias_gelu_row(pre_p + i * F, b1, g_p + i * F, F, a.tanh);
  });
}

// g = gelu(pre) (b1 went into the GEMM).
void bias_gelu_pass(const FwdArgs& a, const BF16* pre_p, BF16* g_p, int64_t rows) {
  const int64_t F = a.w1.size(0);
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / F), [&](int64_t i0, int64_t i1) {
    std::vector<float> u(F), gv(F);
    for (int64_t i = i0; i < i1; ++i) {
      bf16_to_f32(pre_p + i * F, u.data(), F);
      bias_gelu_row(u.data(), nullptr, gv.data(), F, a.tanh);
      f32_to_bf16(gv.data(), g_p + i * F, F);
    }
  });
}

// y = (y + b2) * Z for the rows r0 .. r0 + rows - 1 (nothing to do without a b2 or dropout).
void bias_dropout_pass(const FwdArgs& a, float* y_p, int64_t r0, int64_t rows) {
  const int64_t C2 = a.w2.size(0);
  const float* b2 = ptr_or_null(a.b2);
  if (!b2 && !a.dropout.enabled) return;
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / C2), [&](int64_t i0, int64_t i1) {
    std::vector<float> z(a.dropout.enabled ? C2 : 0);
    for (int64_t i = i0; i < i1; ++i) {
      if (a.dropout.enabled) dropout_row(a.dropout, static_cast<uint64_t>((r0 + i) * C2), z.data(), C2);
      bias_scale_row(y_p + i * C2, b2, a.dropout.enabled ? z.data() : nullptr, C2);
    }
  });
}

// y = y * z for a bfloat16 row, through the float32 buffer u.
void scale_row_bf16(BF16* y, const float* z, float* u, int64_t n) {
  bf16_to_f32(y, u, n);
  scale_row(u, z, u, n);
  f32_to_bf16(u, y, n);
}

// y = y * Z (b2 went into the GEMM).
void bias_dropout_pass(const FwdArgs& a, BF16* y_p, int64_t r0, int64_t rows) {
  const int64_t C2 = a.w2.size(0);
  if (!a.dropout.enabled) return;
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / C2), [&](int64_t i0, int64_t i1) {
    std::vector<float> z(C2), u(C2);
    for (int64_t i = i0; i < i1; ++i) {
      dropout_row(a.dropout, static_cast<uint64_t>((r0 + i) * C2), z.data(), C2);
      scale_row_bf16(y_p + i * C2, z.data(), u.data(), C2);
    }
  });
}

// dz = dy * Z (dz_p null without dropout) and db2 += colsum(dz) (db2 empty: not asked for), for the
// rows r0 .. r0 + rows - 1: columns split over threads, rows summed in order.
void dropout_db2_pass(const BwdArgs& a, const float* dy_p, float* dz_p, std::vector<float>& db2, int64_t r0,
                      int64_t rows) {
  const int64_t C2 = a.w2.size(0);
  const bool dropout = a.dropout.enabled;
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

// The same for bfloat16: dz rounded, db2 summed over the float32 values.
void dropout_db2_pass(const BwdArgs& a, const BF16* dy_p, BF16* dz_p, std::vector<float>& db2, int64_t r0,
                      int64_t rows) {
  const int64_t C2 = a.w2.size(0);
  const bool dropout = a.dropout.enabled;
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

// g = gelu(pre), dpre = dg * gelu'(pre) over dg, db1 += colsum(dpre) (db1 empty: not asked for),
// for the rows of a block: columns split over threads, rows summed in order.
void gelu_grad_pass(const BwdArgs& a, const float* pre_p, float* dg_p, float* g_p, std::vector<float>& db1,
                    int64_t rows) {
  const int64_t F = a.w1.size(0);
  at::parallel_for(0, F, column_grain(F), [&](int64_t f0, int64_t f1) {
    const int64_t n = f1 - f0;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t at = i * F + f0;
      gelu_bwd_row(pre_p + at, dg_p + at, g_p + at, n, a.tanh);
      if (!db1.empty()) accumulate_row(db1.data() + f0, dg_p + at, n);
    }
  });
}

// The same for bfloat16 (dpre and g rounded), rows over threads: each thread streams whole rows,
// and sums its rows' dpre into its own db1 row, added up in thread order at the end (column ranges
// per thread cost 1.3x here, 4096 x 1536).
void gelu_grad_pass(const BwdArgs& a, const BF16* pre_p, BF16* dg_p, BF16* g_p, std::vector<float>& db1,
                    int64_t rows) {
  const int64_t F = a.w1.size(0);
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
}

// ---------------------------------------------------------------------------------------------
// forward and backward: the GEMMs and the loop over row blocks, for T = float and for T = BF16
// with bfloat16 GEMMs. The GEMMs are torch's on the T tensors (at::mm_out / addmm_ straight into
// the outputs); float32 adds the biases in the passes after its GEMMs, bfloat16 inside them
// (at::addmm: one rounding, as F.linear).
// ---------------------------------------------------------------------------------------------
// out = x wt, + bias inside the GEMM when bias is defined.
void linear_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& wt, const at::Tensor& bias) {
  if (bias.defined()) at::addmm_out(out, bias, x, wt);
  else at::mm_out(out, x, wt);
}

template <typename T>
void forward(const FwdArgs& a) {
  constexpr bool kBiasInGemm = !std::is_same_v<T, float>;
  const int64_t M = a.x.size(0), F = a.w1.size(0);
  const int64_t R = block_rows(M, F, sizeof(T));
  at::Tensor g = scratch(R * F, DtypeOf<T>::value).view({R, F});
  const at::Tensor w1t = a.w1.t(), w2t = a.w2.t(), none;

  for (int64_t r0 = 0; r0 < M; r0 += R) {
    const int64_t rows = std::min(R, M - r0);
    at::Tensor pre_b = a.pre.narrow(0, r0, rows), g_b = g.narrow(0, 0, rows), y_b = a.y.narrow(0, r0, rows);
    linear_out(pre_b, a.x.narrow(0, r0, rows), w1t, kBiasInGemm ? a.b1 : none);
    bias_gelu_pass(a, pre_b.data_ptr<T>(), g_b.data_ptr<T>(), rows);
    linear_out(y_b, g_b, w2t, kBiasInGemm ? a.b2 : none);
    bias_dropout_pass(a, y_b.data_ptr<T>(), r0, rows);
  }
}

// The bias gradient summed in float32 (sum) into its output, rounded to the output's dtype; nothing
// when it was not asked for (sum empty).
void store_bias_grad(const at::Tensor& out, std::vector<float>& sum) {
  if (sum.empty()) return;
  out.copy_(at::from_blob(sum.data(), {static_cast<int64_t>(sum.size())}, at::TensorOptions().dtype(at::kFloat)));
}

template <typename T>
void backward(const BwdArgs& a) {
  const int64_t M = a.x.size(0), F = a.w1.size(0), C2 = a.w2.size(0);
  const int64_t R = block_rows(M, F, sizeof(T));
  const bool dropout = a.dropout.enabled;
  at::Tensor dz = dropout ? at::empty({R, C2}, a.dy.options()) : at::Tensor();
  at::Tensor work = scratch(2 * R * F, DtypeOf<T>::value);  // dg (then dpre) and g
  at::Tensor dg = work.narrow(0, 0, R * F).view({R, F});
  at::Tensor g = work.narrow(0, R * F, R * F).view({R, F});
  std::vector<float> db1(a.db1.defined() ? F : 0, 0.f), db2(a.db2.defined() ? C2 : 0, 0.f);
  at::Tensor dw1 = a.dw1, dw2 = a.dw2;

  for (int64_t r0 = 0; r0 < M; r0 += R) {
    const int64_t rows = std::min(R, M - r0);
    const at::Tensor dy_b = a.dy.narrow(0, r0, rows);
    const at::Tensor dz_b = dropout ? dz.narrow(0, 0, rows) : dy_b;
    at::Tensor dg_b = dg.narrow(0, 0, rows), g_b = g.narrow(0, 0, rows);

    if (dropout || !db2.empty())
      dropout_db2_pass(a, dy_b.data_ptr<T>(), dropout ? dz_b.data_ptr<T>() : nullptr, db2, r0, rows);
    // dg = dz w2, then dpre over dg (and g).
    at::mm_out(dg_b, dz_b, a.w2);
    gelu_grad_pass(a, a.pre.data_ptr<T>() + r0 * F, dg_b.data_ptr<T>(), g_b.data_ptr<T>(), db1, rows);

    // dw2 += dz^T g, dw1 += dpre^T x (bfloat16: one rounding per row block), dx = dpre w1.
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
  store_bias_grad(a.db1, db1);
  store_bias_grad(a.db2, db2);
}

// float32 copy of a tensor (undefined stays undefined).
at::Tensor f32(const at::Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; }

// float32 buffer for a low-precision output (undefined stays undefined).
at::Tensor f32_like(const at::Tensor& t) { return t.defined() ? at::empty(t.sizes(), t.options().dtype(at::kFloat)) : t; }

void copy_out(const at::Tensor& dst, const at::Tensor& src) {
  if (dst.defined()) dst.copy_(src);
}

}  // namespace

// Low precision (common/cpu_gemm.h: gemm_path, the same rule as attention's): bfloat16 takes bf16
// GEMMs where the CPU runs them fast. Otherwise (and float16 always) the float32 kernels run on
// float32 copies and the outputs are rounded once: on CPUs without bf16 / fp16 dot-product
// instructions torch's low-precision GEMM is several times slower than its float32 one (measured:
// 4x for bfloat16 on an AVX-512 Xeon, 10x on an AVX2 EPYC), and the result is closer to the float64
// reference than a low-precision GEMM chain.
void fwd_cpu(const FwdArgs& a) {
  const cpu::GemmPath path = cpu::gemm_path(a.x.scalar_type(), cpu::GemmOp::kGeluFfn, "gelu_ffn (cpu)");
  if (path == cpu::GemmPath::kFloat32) return forward<float>(a);
  if (path == cpu::GemmPath::kBf16Gemm) return forward<BF16>(a);
  FwdArgs f{f32(a.x), f32(a.w1), f32(a.b1), f32(a.w2), f32(a.b2), f32_like(a.y), f32_like(a.pre), a.tanh, a.dropout};
  forward<float>(f);
  copy_out(a.y, f.y);
  copy_out(a.pre, f.pre);
}

void bwd_cpu(const BwdArgs& a) {
  const cpu::GemmPath path = cpu::gemm_path(a.x.scalar_type(), cpu::GemmOp::kGeluFfn, "gelu_ffn (cpu)");
  if (path == cpu::GemmPath::kFloat32) return backward<float>(a);
  if (path == cpu::GemmPath::kBf16Gemm) return backward<BF16>(a);
  BwdArgs f{f32(a.dy),         f32(a.x),          f32(a.w1),          f32(a.w2), f32(a.pre),
            f32_like(a.dx),    f32_like(a.dw1),   f32_like(a.db1),    f32_like(a.dw2),
            f32_like(a.db2),   a.tanh,            a.dropout};
  backward<float>(f);
  copy_out(a.dx, f.dx);
  copy_out(a.dw1, f.dw1);
  copy_out(a.db1, f.db1);
  copy_out(a.dw2, f.dw2);
  copy_out(a.db2, f.db2);
}

}  // namespace ff::gelu_ffn
