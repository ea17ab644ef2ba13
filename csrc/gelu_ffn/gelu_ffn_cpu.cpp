// gelu_ffn on the CPU: the math is in gelu_ffn.h.
//
// The rows are processed in blocks of R rows, R chosen so that a block of activations (R x F)
// stays in the last-level cache between the GEMM that writes it and the one that reads it:
//
//   forward, per block:   pre_b = x_b w1^T                     (torch GEMM, into pre's rows)
//                         pre_b += b1; g_b = gelu(pre_b)       (one pass; g_b is block scratch)
//                         y_b = g_b w2^T                       (torch GEMM, into y's rows)
//                         y_b = (y_b + b2) * Z                 (one pass, when there is a b2 or dropout)
//   backward, per block:  dz_b = dy_b * Z; db2 += colsum(dz_b) (one pass)
//                         dg_b = dz_b w2                       (torch GEMM, block scratch)
//                         g_b = gelu(pre_b); dpre_b = dg_b * gelu'(pre_b); db1 += colsum(dpre_b)
//                                                              (one pass, dpre_b over dg_b)
//                         dw2 += dz_b^T g_b; dw1 += dpre_b^T x_b; dx_b = dpre_b w1   (torch GEMMs)
//
// so g, dg and dpre never exist for all M rows (no M x F allocations besides the saved pre) and
// each element-wise step reads what the previous GEMM left in cache. The GEMMs use torch's intra-op
// threads; the passes split rows (forward) or columns (backward, so each bias-gradient column is
// summed by one thread, in row order: deterministic whatever the thread count).
//
// Low precision: pre, g, dz, dpre are rounded to the input dtype where the reference rounds them,
// and the element-wise math runs in float32. The weight gradients of a bfloat16 / float16 problem
// are computed in one block (one GEMM each, float32 accumulation inside torch's BLAS) rather than
// summed block by block in the low-precision dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "common/cpu.h"
#include "gelu_ffn/gelu_ffn.h"

namespace ff::gelu_ffn {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;
constexpr float kTanhC = 0.044715f;

// ---------------------------------------------------------------------------------------------
// Vectorizable float32 math (the same exp as attention_cpu.cpp)
// ---------------------------------------------------------------------------------------------
// exp(x) for x <= 88: x = n ln2 + r, Cephes' degree-6 polynomial for exp(r), 2^n through the
// exponent bits; x < -87 (and -inf) gives 0 through an integer mask, so GCC if-converts it.
__attribute__((always_inline)) inline float exp_f32(float x) {
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.f;
  const float e = y * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  const int32_t keep = -static_cast<int32_t>(!(x < -87.f));
  return std::bit_cast<float>(std::bit_cast<int32_t>(e) & keep);
}

__attribute__((always_inline)) inline float abs_f32(float x) {
  return std::bit_cast<float>(std::bit_cast<uint32_t>(x) & 0x7fffffffu);
}

// |x| carrying the sign of s.
__attribute__((always_inline)) inline float with_sign_of(float ax, float s) {
  return std::bit_cast<float>(std::bit_cast<uint32_t>(ax) | (std::bit_cast<uint32_t>(s) & 0x80000000u));
}

// erf(x) = 1 - t (a1 + t (a2 + ...)) exp(-x^2), t = 1 / (1 + p |x|), sign restored
// (Abramowitz & Stegun 7.1.26; absolute error <= 1.5e-7).
__attribute__((always_inline)) inline float erf_f32(float x) {
  const float ax = abs_f32(x);
  const float t = 1.f / (1.f + 0.3275911f * ax);
  float poly = 1.061405429f;
  poly = poly * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  return with_sign_of(1.f - poly * t * exp_f32(-ax * ax), x);
}

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
      const float x = u[j];
      const float cdf = 0.5f * (1.f + erf_f32(x * kInvSqrt2));
      g[j] = x * cdf;
      d[j] *= cdf + x * exp_f32(-0.5f * x * x) * kInvSqrt2Pi;
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

// z[c] = dropout multiplier (0 or 1 / (1 - p)) of logical element first + c, for c < n; whole
// Philox blocks in a vectorizable loop, ragged ends one by one.
FF_CPU_CLONES void dropout_row(const DropoutParams& d, uint64_t first, float* z, int64_t n) {
  const uint32_t k0 = static_cast<uint32_t>(d.seed), k1 = static_cast<uint32_t>(d.seed >> 32);
  const uint64_t i0 = d.offset + first;
  int64_t c = 0;
  for (; c < n && ((i0 + static_cast<uint64_t>(c)) & 3); ++c) z[c] = dropout_multiplier(d, first + c);
  const int64_t blocks = (n - c) / 4;
  const uint64_t block0 = (i0 + static_cast<uint64_t>(c)) >> 2;
  float* zb = z + c;
#pragma omp simd
  for (int64_t t = 0; t < blocks; ++t) {
    const uint64_t blk = block0 + static_cast<uint64_t>(t);
    const Philox4 w = philox4x32_10(static_cast<uint32_t>(blk), static_cast<uint32_t>(blk >> 32), k0, k1);
    zb[4 * t + 0] = w.w[0] >= d.threshold ? d.scale : 0.f;
    zb[4 * t + 1] = w.w[1] >= d.threshold ? d.scale : 0.f;
    zb[4 * t + 2] = w.w[2] >= d.threshold ? d.scale : 0.f;
    zb[4 * t + 3] = w.w[3] >= d.threshold ? d.scale : 0.f;
  }
  for (c += 4 * blocks; c < n; ++c) z[c] = dropout_multiplier(d, first + c);
}

// ---------------------------------------------------------------------------------------------
// Rows of T seen as float32: float rows are used in place, others go through a buffer.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct FloatRow {
  std::vector<float> buf;
  explicit FloatRow(int64_t n) : buf(std::is_same_v<T, float> ? 0 : n) {}
  float* load(T* src, int64_t n) {
    if constexpr (std::is_same_v<T, float>) {
      return src;
    } else {
      cpu::load_row(src, buf.data(), n);
      return buf.data();
    }
  }
  // Write back (rounding to T) and reload, so later math sees exactly the stored value.
  void store(float* row, T* dst, int64_t n) {
    if constexpr (!std::is_same_v<T, float>) {
      cpu::store_row(row, dst, n);
      cpu::load_row(dst, row, n);
    }
  }
};

template <typename T>
std::vector<float> as_float(const at::Tensor& t) {
  std::vector<float> out;
  if (!t.defined()) return out;
  out.resize(t.numel());
  cpu::load_row(t.data_ptr<T>(), out.data(), t.numel());
  return out;
}

template <typename T>
void store_float(const std::vector<float>& src, const at::Tensor& dst) {
  cpu::store_row(src.data(), dst.data_ptr<T>(), dst.numel());
}

// Rows per block: a block of activations (R x F floats) of about 2 MiB, at least 64 rows (thin
// GEMMs are slow), at most M.
int64_t block_rows(int64_t M, int64_t F) {
  if (const char* e = std::getenv("FF_FFN_BLOCK")) return std::min<int64_t>(M, std::atoll(e));
  return std::min<int64_t>(M, std::max<int64_t>(64, (int64_t{1} << 19) / F));
}

// [begin, end) column ranges of about equal width (multiples of 16) for a column-parallel pass.
int64_t column_grain(int64_t n) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(16, (n / threads + 15) / 16 * 16);
}

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------
template <typename T>
void forward(const FwdArgs& a) {
  const int64_t M = a.x.size(0), F = a.w1.size(0), C2 = a.w2.size(0);
  const int64_t R = block_rows(M, F);
  const std::vector<float> b1 = as_float<T>(a.b1), b2 = as_float<T>(a.b2);
  const bool epilogue = a.b2.defined() || a.dropout.enabled;
  at::Tensor g = at::empty({R, F}, a.x.options());
  const at::Tensor w1t = a.w1.t(), w2t = a.w2.t();

  for (int64_t r0 = 0; r0 < M; r0 += R) {
    const int64_t rows = std::min(R, M - r0);
    at::Tensor pre_b = a.pre.narrow(0, r0, rows), g_b = g.narrow(0, 0, rows), y_b = a.y.narrow(0, r0, rows);
    at::mm_out(pre_b, a.x.narrow(0, r0, rows), w1t);
    T* pre_p = pre_b.data_ptr<T>();
    T* g_p = g_b.data_ptr<T>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / F), [&](int64_t i0, int64_t i1) {
      FloatRow<T> u(F);
      std::vector<float> gr(std::is_same_v<T, float> ? 0 : F);
      for (int64_t i = i0; i < i1; ++i) {
        float* uf = u.load(pre_p + i * F, F);
        if constexpr (std::is_same_v<T, float>) {
          bias_gelu_row(uf, b1.empty() ? nullptr : b1.data(), g_p + i * F, F, a.tanh);
        } else {  // round pre before the GELU reads it, as the reference does
          bias_scale_row(uf, b1.empty() ? nullptr : b1.data(), nullptr, F);
          u.store(uf, pre_p + i * F, F);
          bias_gelu_row(uf, nullptr, gr.data(), F, a.tanh);
          cpu::store_row(gr.data(), g_p + i * F, F);
        }
      }
    });
    at::mm_out(y_b, g_b, w2t);
    if (!epilogue) continue;
    T* y_p = y_b.data_ptr<T>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / C2), [&](int64_t i0, int64_t i1) {
      FloatRow<T> yr(C2);
      std::vector<float> z(a.dropout.enabled ? C2 : 0);
      for (int64_t i = i0; i < i1; ++i) {
        float* yf = yr.load(y_p + i * C2, C2);
        if (a.dropout.enabled) {
          // round y + b2 first: the reference applies dropout to the rounded linear output
          if (!std::is_same_v<T, float> && !b2.empty()) {
            bias_scale_row(yf, b2.data(), nullptr, C2);
            yr.store(yf, y_p + i * C2, C2);
            dropout_row(a.dropout, static_cast<uint64_t>((r0 + i) * C2), z.data(), C2);
            bias_scale_row(yf, nullptr, z.data(), C2);
          } else {
            dropout_row(a.dropout, static_cast<uint64_t>((r0 + i) * C2), z.data(), C2);
            bias_scale_row(yf, b2.empty() ? nullptr : b2.data(), z.data(), C2);
          }
        } else {
          bias_scale_row(yf, b2.data(), nullptr, C2);
        }
        if constexpr (!std::is_same_v<T, float>) cpu::store_row(yf, y_p + i * C2, C2);
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------
template <typename T>
void backward(const BwdArgs& a) {
  const int64_t M = a.x.size(0), F = a.w1.size(0), C2 = a.w2.size(0);
  constexpr bool is_f32 = std::is_same_v<T, float>;
  const int64_t R = is_f32 ? block_rows(M, F) : M;  // see the header comment: low precision, one block
  const bool need_dz = a.dropout.enabled;
  at::Tensor dz = need_dz ? at::empty({R, C2}, a.dy.options()) : at::Tensor();
  at::Tensor dg = at::empty({R, F}, a.x.options());
  at::Tensor g = at::empty({R, F}, a.x.options());
  std::vector<float> db1(a.db1.defined() ? F : 0, 0.f), db2(a.db2.defined() ? C2 : 0, 0.f);

  for (int64_t r0 = 0; r0 < M; r0 += R) {
    const int64_t rows = std::min(R, M - r0);
    at::Tensor dy_b = a.dy.narrow(0, r0, rows);
    at::Tensor dz_b = need_dz ? dz.narrow(0, 0, rows) : dy_b;
    at::Tensor dg_b = dg.narrow(0, 0, rows), g_b = g.narrow(0, 0, rows);

    // dz = dy * Z (rounded to T) and db2 += colsum(dz): columns split over threads.
    if (need_dz || !db2.empty()) {
      const T* dy_p = dy_b.data_ptr<T>();
      T* dz_p = dz_b.data_ptr<T>();
      at::parallel_for(0, C2, column_grain(C2), [&](int64_t c0, int64_t c1) {
        const int64_t n = c1 - c0;
        std::vector<float> row(n), z(need_dz ? n : 0);
        for (int64_t i = 0; i < rows; ++i) {
          cpu::load_row(dy_p + i * C2 + c0, row.data(), n);
          if (need_dz) {
            dropout_row(a.dropout, static_cast<uint64_t>((r0 + i) * C2 + c0), z.data(), n);
            bias_scale_row(row.data(), nullptr, z.data(), n);
            cpu::store_row(row.data(), dz_p + i * C2 + c0, n);
            if constexpr (!is_f32) cpu::load_row(dz_p + i * C2 + c0, row.data(), n);
          }
          if (!db2.empty()) accumulate_row(db2.data() + c0, row.data(), n);
        }
      });
    }

    // dg = dz w2; then g = gelu(pre), dpre = dg * gelu'(pre) over dg, db1 += colsum(dpre).
    at::mm_out(dg_b, dz_b, a.w2);
    const T* pre_p = a.pre.data_ptr<T>() + r0 * F;
    T* dg_p = dg_b.data_ptr<T>();
    T* g_p = g_b.data_ptr<T>();
    at::parallel_for(0, F, column_grain(F), [&](int64_t f0, int64_t f1) {
      const int64_t n = f1 - f0;
      std::vector<float> u(is_f32 ? 0 : n), d(is_f32 ? 0 : n), gr(is_f32 ? 0 : n);
      for (int64_t i = 0; i < rows; ++i) {
        const float* uf;
        if constexpr (is_f32) {
          uf = pre_p + i * F + f0;
        } else {
          cpu::load_row(pre_p + i * F + f0, u.data(), n);
          uf = u.data();
        }
        float* df = is_f32 ? reinterpret_cast<float*>(dg_p + i * F + f0) : d.data();
        float* gf = is_f32 ? reinterpret_cast<float*>(g_p + i * F + f0) : gr.data();
        if constexpr (!is_f32) cpu::load_row(dg_p + i * F + f0, df, n);
        gelu_bwd_row(uf, df, gf, n, a.tanh);
        if constexpr (!is_f32) {
          cpu::store_row(gf, g_p + i * F + f0, n);
          cpu::store_row(df, dg_p + i * F + f0, n);
          cpu::load_row(dg_p + i * F + f0, df, n);  // db1 sums the rounded dpre, as the reference
        }
        if (!db1.empty()) accumulate_row(db1.data() + f0, df, n);
      }
    });

    // dw2 += dz^T g, dw1 += dpre^T x, dx = dpre w1.
    const at::Tensor x_b = a.x.narrow(0, r0, rows);
    at::Tensor dw1 = a.dw1, dw2 = a.dw2;
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
  if (!db1.empty()) store_float<T>(db1, a.db1);
  if (!db2.empty()) store_float<T>(db2, a.db2);
}

}  // namespace

void fwd_cpu(const FwdArgs& a) {
  switch (a.x.scalar_type()) {
    case c10::kFloat: forward<float>(a); break;
    case c10::kBFloat16: forward<c10::BFloat16>(a); break;
    case c10::kHalf: forward<c10::Half>(a); break;
    default: TORCH_CHECK_TYPE(false, "gelu_ffn: unsupported dtype ", a.x.scalar_type());
  }
}

void bwd_cpu(const BwdArgs& a) {
  switch (a.x.scalar_type()) {
    case c10::kFloat: backward<float>(a); break;
    case c10::kBFloat16: backward<c10::BFloat16>(a); break;
    case c10::kHalf: backward<c10::Half>(a); break;
    default: TORCH_CHECK_TYPE(false, "gelu_ffn: unsupported dtype ", a.x.scalar_type());
  }
}

}  // namespace ff::gelu_ffn
