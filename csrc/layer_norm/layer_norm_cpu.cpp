// layer_norm on the CPU: the math is in layer_norm.h.
//
// Rows are spread over threads with at::parallel_for. Each row is converted to float32 once into a
// thread-local buffer (skipped for float32 input without dropout/residual), and every pass over it
// is a plain loop that GCC vectorizes (`omp simd`), compiled per ISA by FF_CPU_CLONES. The forward
// takes mean and variance in one pass about a provisional centre, with a second pass for rows where
// that could cancel (row_mean_var); the backward works on groups of rows (group_backward).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/cpu.h"
#include "common/cpu_kernels.h"
#include "common/dtype.h"
#include "layer_norm/layer_norm.h"

namespace ff::layer_norm {
namespace {

using ff::cpu::dropout_row;

// ---------------------------------------------------------------------------------------------
// Row kernels (multi-versioned). Rows of float32 or bfloat16 are read and written in place
// through cpu::load_elem / store_elem; the bodies are templates, the clones thin wrappers.
// ---------------------------------------------------------------------------------------------
using cpu::load_elem;
using cpu::store_elem;

#define FF_INLINE __attribute__((always_inline)) inline

// Row reductions keep kLanes independent partial sums (four AVX-512 registers, eight AVX2 ones):
// a single vector accumulator would serialize on the add latency.
constexpr int64_t kLanes = 64;

// The sum of the kLanes partials, as a fixed tree: 64 -> 16 in vector adds, then 16 -> 1. A
// left-to-right scalar sum is a chain of 63 dependent adds, ~250 cycles per row, which was 15 % of
// the whole float32 forward at width 768. The order is fixed, so a row's statistics do not
// depend on the clone that ran.
FF_INLINE float lane_sum(const float* acc) {
  static_assert(kLanes == 64, "lane_sum adds 64 partials");
  float t[16];
#pragma omp simd
  for (int j = 0; j < 16; ++j) t[j] = (acc[j] + acc[j + 32]) + (acc[j + 16] + acc[j + 48]);
  float u[4];
  for (int j = 0; j < 4; ++j) u[j] = (t[j] + t[j + 8]) + (t[j + 4] + t[j + 12]);
  return (u[0] + u[2]) + (u[1] + u[3]);
}

// sum_i (x_i - c)^2
FF_CPU_CLONES float row_sum_sq(const float* x, int64_t n, float c) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const float d = x[i + j] - c;
      acc[j] += d * d;
    }
  }
  for (int64_t j = 0; i + j < n; ++j) {
    const float d = x[i + j] - c;
    acc[j] += d * d;
  }
  return lane_sum(acc);
}

// s1 = sum_i (x_i - c) and s2 = sum_i (x_i - c)^2, in one pass.
FF_CPU_CLONES void row_moments(const float* x, int64_t n, float c, float* s1, float* s2) {
  float a1[kLanes] = {}, a2[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const float d = x[i + j] - c;
      a1[j] += d;
      a2[j] += d * d;
    }
  }
  for (int64_t j = 0; i + j < n; ++j) {
    const float d = x[i + j] - c;
    a1[j] += d;
    a2[j] += d * d;
  }
  *s1 = lane_sum(a1);
  *s2 = lane_sum(a2);
}

// Mean and (biased) variance of a row, usually in one pass over it: s1, s2 about a provisional
// centre c = x[0] give mean = c + s1/n and var = s2/n - (s1/n)^2. That difference cancels only
// when c is far from the mean: its rounding error is ~eps * s2/n = eps * (var + (s1/n)^2), so
// while (s1/n)^2 <= 16 var it stays within ~17 eps * var, the size of the error of the sums
// themselves (12 sequential adds per lane and a 6-level tree at width 768). Rows whose first value
// is more than 4 standard deviations from their mean (an outlier in channel 0; rare otherwise)
// and non-finite rows get a second pass about the mean instead, so no input loses accuracy to the
// shortcut. Saves one of the three passes of the float32 forward. (The mean of the first 64
// values would be a better centre but costs a reduction per row: ~5 % of the forward at 768.)
FF_INLINE void row_mean_var(const float* x, int64_t n, float* mean, float* var) {
  const float c = x[0];
  float s1, s2;
  row_moments(x, n, c, &s1, &s2);
  const float m1 = s1 / static_cast<float>(n);
  *mean = c + m1;
  *var = s2 / static_cast<float>(n) - m1 * m1;
  if (!(m1 * m1 <= 16.f * *var)) *var = row_sum_sq(x, n, *mean) / static_cast<float>(n);
}

// out = (h - mean) * rstd * w + b
template <typename TO>
FF_INLINE void row_normalize_t(const float* h, const float* w, const float* b, float mean, float rstd, TO* out,
                               int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) store_elem(out, i, (h[i] - mean) * rstd * w[i] + b[i]);
}

FF_CPU_CLONES void row_normalize(const float* h, const float* w, const float* b, float mean, float rstd,
                                 float* out, int64_t n) {
  row_normalize_t(h, w, b, mean, rstd, out, n);
}
FF_CPU_CLONES void row_normalize(const float* h, const float* w, const float* b, float mean, float rstd,
                                 c10::BFloat16* out, int64_t n) {
  row_normalize_t(h, w, b, mean, rstd, out, n);
}

// Backward, per row: s_gx = sum g * xhat and s_g = sum g, with g = dy * w, xhat = (h - mean) * rstd.
template <typename T>
FF_INLINE void row_grad_sums_t(const T* h, const T* dy, const float* w, float mean, float rstd, int64_t n,
                               float* s_gx, float* s_g) {
  float acc_gx[kLanes] = {}, acc_g[kLanes] = {};
  int64_t i0 = 0;
  for (; i0 + kLanes <= n; i0 += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const float xhat = (load_elem(h, i0 + j) - mean) * rstd;
      const float g = load_elem(dy, i0 + j) * w[i0 + j];
      acc_gx[j] += g * xhat;
      acc_g[j] += g;
    }
  }
  for (int64_t j = 0; i0 + j < n; ++j) {
    const float xhat = (load_elem(h, i0 + j) - mean) * rstd;
    const float g = load_elem(dy, i0 + j) * w[i0 + j];
    acc_gx[j] += g * xhat;
    acc_g[j] += g;
  }
  *s_gx = lane_sum(acc_gx);
  *s_g = lane_sum(acc_g);
}

FF_CPU_CLONES void row_grad_sums(const float* h, const float* dy, const float* w, float mean, float rstd,
                                 int64_t n, float* s_gx, float* s_g) {
  row_grad_sums_t(h, dy, w, mean, rstd, n, s_gx, s_g);
}
FF_CPU_CLONES void row_grad_sums(const c10::BFloat16* h, const c10::BFloat16* dy, const float* w, float mean,
                                 float rstd, int64_t n, float* s_gx, float* s_g) {
  row_grad_sums_t(h, dy, w, mean, rstd, n, s_gx, s_g);
}

// Backward, elementwise, for kGroup rows at once:
//   dh_r = rstd_r (g_r - xhat_r c1_r - c2_r) [+ dh_out_r],   dx_r = dh_r * mult_r (dropout)
//   dw_acc += sum_r dy_r xhat_r,   db_acc += sum_r dy_r
// Taking rows together reads and writes the dw / db accumulators once per group instead of once
// per row: at width 4096 the rows and the accumulators no longer fit in L1 together, and the
// per-row version spent ~15 % more time than torch's backward there. A group with fewer rows is
// padded with zero rows (zero dy adds nothing; their dh / dx go to a scratch row), so the loop
// always takes kGroup rows.
constexpr int kGroup = 4;

template <typename T>
struct RowGroup {
  const T* h[kGroup];
  const T* dy[kGroup];
  const T* dh_out[kGroup];    // all nullptr without a gradient for the returned pre-norm sum
  const float* mult[kGroup];  // all nullptr without dropout
  T* dh[kGroup];
  T* dx[kGroup];              // with dropout
  float mean[kGroup], rstd[kGroup], c1[kGroup], c2[kGroup];
};

template <bool kDhOut, bool kDropout, typename T>
FF_INLINE void group_backward_t(const RowGroup<T>& g, const float* w, float* dw_acc, float* db_acc,
                                int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float dw = 0.f, db = 0.f;
#pragma GCC unroll 4
    for (int r = 0; r < kGroup; ++r) {
      const float dy = load_elem(g.dy[r], i);
      const float xhat = (load_elem(g.h[r], i) - g.mean[r]) * g.rstd[r];
      float dh = g.rstd[r] * (dy * w[i] - xhat * g.c1[r] - g.c2[r]);
      if constexpr (kDhOut) dh += load_elem(g.dh_out[r], i);
      if constexpr (kDropout) store_elem(g.dx[r], i, dh * g.mult[r][i]);
      store_elem(g.dh[r], i, dh);
      dw += dy * xhat;
      db += dy;
    }
    dw_acc[i] += dw;
    db_acc[i] += db;
  }
}

// The variants as separate loops: a runtime test inside the vector loop kept GCC from
// vectorizing it (4x slower with dropout in bfloat16).
template <typename T>
FF_INLINE void group_backward_any(const RowGroup<T>& g, const float* w, float* dw_acc, float* db_acc,
                                  int64_t n) {
  const bool dh_out = g.dh_out[0] != nullptr, dropout = g.mult[0] != nullptr;
  if (dh_out && dropout) {
    group_backward_t<true, true>(g, w, dw_acc, db_acc, n);
  } else if (dh_out) {
    group_backward_t<true, false>(g, w, dw_acc, db_acc, n);
  } else if (dropout) {
    group_backward_t<false, true>(g, w, dw_acc, db_acc, n);
  } else {
    group_backward_t<false, false>(g, w, dw_acc, db_acc, n);
  }
}

FF_CPU_CLONES void group_backward(const RowGroup<float>& g, const float* w, float* dw_acc, float* db_acc,
                                  int64_t n) {
  group_backward_any(g, w, dw_acc, db_acc, n);
}
FF_CPU_CLONES void group_backward(const RowGroup<c10::BFloat16>& g, const float* w, float* dw_acc,
                                  float* db_acc, int64_t n) {
  group_backward_any(g, w, dw_acc, db_acc, n);
}

FF_CPU_CLONES void row_scale(const float* a, const float* m, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] * m[i];
}


// Weight / bias as float32 buffers (ones / zeros when absent), whatever their dtype.
std::vector<float> param_as_float(const void* p, c10::ScalarType t, int64_t n, float fill) {
  std::vector<float> out(n, fill);
  if (p == nullptr) return out;
  visit_dtype(t, "layer_norm (cpu) weight / bias", [&]<typename W>(TypeTag<W>) {
    cpu::load_row(static_cast<const W*>(p), out.data(), n);
  });
  return out;
}

void store_param(const std::vector<float>& src, void* dst, c10::ScalarType t) {
  const int64_t n = static_cast<int64_t>(src.size());
  visit_dtype(t, "layer_norm (cpu) weight / bias", [&]<typename W>(TypeTag<W>) {
    cpu::store_row(src.data(), static_cast<W*>(dst), n);
  });
}

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------
template <typename T>
void forward(const FwdParams& p) {
  const int64_t M = p.M, N = p.N;
  const std::vector<float> w = param_as_float(p.weight, p.wtype, N, 1.f);
  const std::vector<float> b = param_as_float(p.bias, p.wtype, N, 0.f);
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  T* hout = static_cast<T*>(p.h);
  constexpr bool is_f32 = std::is_same_v<T, float>;
  const int64_t grain = std::max<int64_t>(1, 16384 / N);

  // Without dropout or residual, h is x itself, and float32 rows are normalized in place. Every
  // other row is formed in a float32 buffer first: for bfloat16 one conversion there is cheaper
  // than converting on each of the three passes (statistics, then the normalization), which made
  // the in-place bfloat16 forward ~15 % slower than F.layer_norm at width 768.
  const bool h_is_x = !p.dropout.enabled && !res;
  constexpr bool direct = cpu::kDirectElem<T>;
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> hbuf(h_is_x && is_f32 ? 0 : N), ybuf(direct ? 0 : N);
    std::vector<float> mult(p.dropout.enabled ? N : 0), rbuf(res ? N : 0);
    for (int64_t m = begin; m < end; ++m) {
      const T* xr = x + m * N;
      T* yr = y + m * N;
      if (!h_is_x || !is_f32) {
        cpu::load_row(xr, hbuf.data(), N);
        if (p.dropout.enabled) {
          dropout_row(p.dropout, static_cast<uint64_t>(m * N), mult.data(), N);
          row_scale(hbuf.data(), mult.data(), hbuf.data(), N);
        }
        if (res) {
          cpu::load_row(res + m * N, rbuf.data(), N);
          for (int64_t i = 0; i < N; ++i) hbuf[i] += rbuf[i];
        }
        if (hout) {
          T* hr = hout + m * N;
          cpu::store_row(hbuf.data(), hr, N);
          if (!is_f32) cpu::load_row(hr, hbuf.data(), N);  // normalize exactly the stored (rounded) h
        }
      }
      const auto normalize_row = [&](const float* h) {
        float mean = 0.f, rstd;
        if (p.rms) {
          rstd = 1.f / std::sqrt(row_sum_sq(h, N, 0.f) / static_cast<float>(N) + p.eps);
        } else {
          float var;
          row_mean_var(h, N, &mean, &var);
          rstd = 1.f / std::sqrt(var + p.eps);
          p.mean[m] = mean;
        }
        p.rstd[m] = rstd;
        if constexpr (direct) {
          row_normalize(h, w.data(), b.data(), mean, rstd, yr, N);
        } else {
          row_normalize(h, w.data(), b.data(), mean, rstd, ybuf.data(), N);
          cpu::store_row(ybuf.data(), yr, N);
        }
      };
      if constexpr (is_f32) {
        if (h_is_x) {
          normalize_row(xr);
          continue;
        }
      }
      normalize_row(hbuf.data());
    }
  });
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------
constexpr int64_t kMaxRowBlocks = 64;  // fixed for a given M: the dw/db sums do not depend on threads

template <typename T>
void backward(const BwdParams& p) {
  const int64_t M = p.M, N = p.N;
  const std::vector<float> w = param_as_float(p.weight, p.wtype, N, 1.f);
  // Blocks of whole row groups (only a block's last group may be short), at most kMaxRowBlocks.
  const int64_t rows_per_block = (M + kMaxRowBlocks * kGroup - 1) / (kMaxRowBlocks * kGroup) * kGroup;
  const int64_t nblocks = (M + rows_per_block - 1) / rows_per_block;
  std::vector<float> dw_part(nblocks * N, 0.f), db_part(nblocks * N, 0.f);
  // float32 and bfloat16 rows are read and written in place; float16 ones are staged as float32.
  constexpr bool direct = cpu::kDirectElem<T>;
  using E = std::conditional_t<direct, T, float>;

  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    // Per group row: staged h, dy, dh_out, dh, dx (float16 only) and dropout multipliers; and the
    // zero row (h, dy, dh_out) and scratch row (dh, dx) that pad a short group.
    enum { kH, kDy, kDhOut, kDh, kDx, kStaged };
    std::vector<float> staged(direct ? 0 : kStaged * kGroup * N);
    std::vector<float> mult(p.dropout.enabled ? kGroup * N : 0);
    std::vector<E> pad(2 * N, E(0.f));
    const auto slot = [&](int which, int r) { return staged.data() + (which * kGroup + r) * N; };

    for (int64_t blk = b0; blk < b1; ++blk) {
      float* dw_acc = dw_part.data() + blk * N;
      float* db_acc = db_part.data() + blk * N;
      const int64_t row_end = std::min(M, (blk + 1) * rows_per_block);
      for (int64_t m0 = blk * rows_per_block; m0 < row_end; m0 += kGroup) {
        RowGroup<E> g;
        for (int r = 0; r < kGroup; ++r) {
          const int64_t m = m0 + r;
          if (m >= row_end) {
            g.h[r] = g.dy[r] = pad.data();
            g.dh_out[r] = p.dh_out ? pad.data() : nullptr;
            g.dh[r] = g.dx[r] = pad.data() + N;
            g.mult[r] = p.dropout.enabled ? mult.data() + r * N : nullptr;
            g.mean[r] = g.rstd[r] = g.c1[r] = g.c2[r] = 0.f;
            continue;
          }
          const T* dh_out = p.dh_out ? static_cast<const T*>(p.dh_out) + m * N : nullptr;
          if constexpr (direct) {
            g.h[r] = static_cast<const T*>(p.h) + m * N;
            g.dy[r] = static_cast<const T*>(p.dy) + m * N;
            g.dh_out[r] = dh_out;
            g.dh[r] = static_cast<T*>(p.dh) + m * N;
            g.dx[r] = p.dx ? static_cast<T*>(p.dx) + m * N : nullptr;
          } else {
            cpu::load_row(static_cast<const T*>(p.h) + m * N, slot(kH, r), N);
            cpu::load_row(static_cast<const T*>(p.dy) + m * N, slot(kDy, r), N);
            if (dh_out) cpu::load_row(dh_out, slot(kDhOut, r), N);
            g.h[r] = slot(kH, r);
            g.dy[r] = slot(kDy, r);
            g.dh_out[r] = dh_out ? slot(kDhOut, r) : nullptr;
            g.dh[r] = slot(kDh, r);
            g.dx[r] = slot(kDx, r);
          }
          g.mult[r] = nullptr;
          if (p.dropout.enabled) {
            g.mult[r] = mult.data() + r * N;
            dropout_row(p.dropout, static_cast<uint64_t>(m * N), mult.data() + r * N, N);
          }
          g.mean[r] = p.rms ? 0.f : p.mean[m];
          g.rstd[r] = p.rstd[m];
          float s_gx, s_g;
          row_grad_sums(g.h[r], g.dy[r], w.data(), g.mean[r], g.rstd[r], N, &s_gx, &s_g);
          g.c1[r] = s_gx / static_cast<float>(N);
          g.c2[r] = p.rms ? 0.f : s_g / static_cast<float>(N);
        }
        group_backward(g, w.data(), dw_acc, db_acc, N);
        if constexpr (!direct) {
          for (int r = 0; r < kGroup && m0 + r < row_end; ++r) {
            cpu::store_row(slot(kDh, r), static_cast<T*>(p.dh) + (m0 + r) * N, N);
            if (p.dx) cpu::store_row(slot(kDx, r), static_cast<T*>(p.dx) + (m0 + r) * N, N);
          }
        }
      }
    }
  });

  // Stage two: add the block partials in block order, columns in parallel.
  if (p.dweight || p.dbias) {
    std::vector<float> dw(N, 0.f), db(N, 0.f);
    at::parallel_for(0, N, 1024, [&](int64_t c0, int64_t c1) {
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        const float* pw = dw_part.data() + blk * N;
        const float* pb = db_part.data() + blk * N;
        for (int64_t c = c0; c < c1; ++c) {
          dw[c] += pw[c];
          db[c] += pb[c];
        }
      }
    });
    if (p.dweight) store_param(dw, p.dweight, p.wtype);
    if (p.dbias) store_param(db, p.dbias, p.wtype);
  }
}

}  // namespace

void fwd_cpu(const FwdParams& p) {
  visit_dtype(p.dtype, "layer_norm (cpu)", [&]<typename T>(TypeTag<T>) { forward<T>(p); });
}

void bwd_cpu(const BwdParams& p) {
  visit_dtype(p.dtype, "layer_norm (cpu)", [&]<typename T>(TypeTag<T>) { backward<T>(p); });
}

}  // namespace ff::layer_norm
