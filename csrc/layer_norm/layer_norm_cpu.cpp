// layer_norm on the CPU: the math is in layer_norm.h.
//
// Rows are spread over threads with at::parallel_for. Each row is converted to float32 once into a
// thread-local buffer (skipped for float32 input without dropout/residual), and every pass over it
// is a plain loop that GCC vectorizes (`omp simd`), compiled per ISA by FF_CPU_CLONES. Statistics
// use the two-pass formula (mean, then mean squared deviation) on the cached row: exact enough for
// any width and no slower while the row sits in L1/L2.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/cpu.h"
#include "common/cpu_kernels.h"
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
// a single vector accumulator would serialize on the add latency. The partials are added in a
// fixed order, so a row's statistics do not depend on the clone that ran.
constexpr int64_t kLanes = 64;

// sum_i (x_i - center)^p for p = 1 or 2
template <int P, typename T>
FF_INLINE float row_moment(const T* x, int64_t n, float center) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const float d = load_elem(x, i + j) - center;
      acc[j] += P == 1 ? d : d * d;
    }
  }
  for (int64_t j = 0; i + j < n; ++j) {
    const float d = load_elem(x, i + j) - center;
    acc[j] += P == 1 ? d : d * d;
  }
  float s = 0.f;
  for (int64_t j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

FF_CPU_CLONES float row_sum(const float* x, int64_t n) { return row_moment<1>(x, n, 0.f); }
FF_CPU_CLONES float row_sum(const c10::BFloat16* x, int64_t n) { return row_moment<1>(x, n, 0.f); }
FF_CPU_CLONES float row_sum_sq(const float* x, int64_t n, float c) { return row_moment<2>(x, n, c); }
FF_CPU_CLONES float row_sum_sq(const c10::BFloat16* x, int64_t n, float c) { return row_moment<2>(x, n, c); }

// out = (h - mean) * rstd * w + b
template <typename TI, typename TO>
FF_INLINE void row_normalize_t(const TI* h, const float* w, const float* b, float mean, float rstd, TO* out,
                               int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) store_elem(out, i, (load_elem(h, i) - mean) * rstd * w[i] + b[i]);
}

FF_CPU_CLONES void row_normalize(const float* h, const float* w, const float* b, float mean, float rstd,
                                 float* out, int64_t n) {
  row_normalize_t(h, w, b, mean, rstd, out, n);
}
FF_CPU_CLONES void row_normalize(const float* h, const float* w, const float* b, float mean, float rstd,
                                 c10::BFloat16* out, int64_t n) {
  row_normalize_t(h, w, b, mean, rstd, out, n);
}
FF_CPU_CLONES void row_normalize(const c10::BFloat16* h, const float* w, const float* b, float mean, float rstd,
                                 c10::BFloat16* out, int64_t n) {
  row_normalize_t(h, w, b, mean, rstd, out, n);
}

// Row of the backward: writes dh (including dh_out when given) and accumulates dw, db partials.
FF_CPU_CLONES void row_backward(const float* h, const float* dy, const float* w, const float* dh_out,
                                float mean, float rstd, bool rms, float* dh, float* dw_acc, float* db_acc,
                                int64_t n) {
  float acc_gx[kLanes] = {}, acc_g[kLanes] = {};
  int64_t i0 = 0;
  for (; i0 + kLanes <= n; i0 += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const float xhat = (h[i0 + j] - mean) * rstd;
      const float g = dy[i0 + j] * w[i0 + j];
      acc_gx[j] += g * xhat;
      acc_g[j] += g;
    }
  }
  for (int64_t j = 0; i0 + j < n; ++j) {
    const float xhat = (h[i0 + j] - mean) * rstd;
    const float g = dy[i0 + j] * w[i0 + j];
    acc_gx[j] += g * xhat;
    acc_g[j] += g;
  }
  float s_gx = 0.f, s_g = 0.f;
  for (int64_t j = 0; j < kLanes; ++j) {
    s_gx += acc_gx[j];
    s_g += acc_g[j];
  }
  const float c1 = s_gx / static_cast<float>(n);
  const float c2 = rms ? 0.f : s_g / static_cast<float>(n);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float xhat = (h[i] - mean) * rstd;
    const float g = dy[i] * w[i];
    dh[i] = rstd * (g - xhat * c1 - c2) + (dh_out ? dh_out[i] : 0.f);
    dw_acc[i] += dy[i] * xhat;
    db_acc[i] += dy[i];
  }
}

FF_CPU_CLONES void row_scale(const float* a, const float* m, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] * m[i];
}


// Weight / bias as float32 buffers (ones / zeros when absent), whatever their dtype.
std::vector<float> param_as_float(const void* p, c10::ScalarType t, int64_t n, float fill) {
  std::vector<float> out(n, fill);
  if (p == nullptr) return out;
  switch (t) {
    case c10::kFloat: std::copy_n(static_cast<const float*>(p), n, out.data()); break;
    case c10::kHalf: cpu::load_row(static_cast<const c10::Half*>(p), out.data(), n); break;
    case c10::kBFloat16: cpu::load_row(static_cast<const c10::BFloat16*>(p), out.data(), n); break;
    default: TORCH_CHECK(false, "layer_norm: unsupported parameter dtype ", t);
  }
  return out;
}

void store_param(const std::vector<float>& src, void* dst, c10::ScalarType t) {
  const int64_t n = static_cast<int64_t>(src.size());
  switch (t) {
    case c10::kFloat: std::copy_n(src.data(), n, static_cast<float*>(dst)); break;
    case c10::kHalf: cpu::store_row(src.data(), static_cast<c10::Half*>(dst), n); break;
    case c10::kBFloat16: cpu::store_row(src.data(), static_cast<c10::BFloat16*>(dst), n); break;
    default: TORCH_CHECK(false, "layer_norm: unsupported parameter dtype ", t);
  }
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

  // Without dropout or residual, h is x itself: float32 and bfloat16 rows are then normalized in
  // place (no staging copy); otherwise h is formed in a float32 buffer first.
  const bool h_is_x = !p.dropout.enabled && !res;
  constexpr bool direct = cpu::kDirectElem<T>;
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> hbuf(h_is_x && direct ? 0 : N), ybuf(direct ? 0 : N);
    std::vector<float> mult(p.dropout.enabled ? N : 0), rbuf(res ? N : 0);
    for (int64_t m = begin; m < end; ++m) {
      const T* xr = x + m * N;
      T* yr = y + m * N;
      if (!h_is_x || !direct) {
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
      const auto normalize_row = [&](const auto* h) {
        float mean = 0.f, rstd;
        if (p.rms) {
          rstd = 1.f / std::sqrt(row_sum_sq(h, N, 0.f) / static_cast<float>(N) + p.eps);
        } else {
          mean = row_sum(h, N) / static_cast<float>(N);
          rstd = 1.f / std::sqrt(row_sum_sq(h, N, mean) / static_cast<float>(N) + p.eps);
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
      if constexpr (direct) {
        if (h_is_x) {
          normalize_row(xr);
          continue;
        }
      }
      normalize_row(static_cast<const float*>(hbuf.data()));
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
  const int64_t rows_per_block = (M + kMaxRowBlocks - 1) / kMaxRowBlocks;
  const int64_t nblocks = (M + rows_per_block - 1) / rows_per_block;
  std::vector<float> dw_part(nblocks * N, 0.f), db_part(nblocks * N, 0.f);
  const T* h = static_cast<const T*>(p.h);
  const T* dy = static_cast<const T*>(p.dy);
  const T* dh_out = static_cast<const T*>(p.dh_out);
  T* dh = static_cast<T*>(p.dh);
  T* dx = static_cast<T*>(p.dx);
  constexpr bool is_f32 = std::is_same_v<T, float>;

  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> hbuf(is_f32 ? 0 : N), dybuf(is_f32 ? 0 : N), dhoutbuf(dh_out && !is_f32 ? N : 0);
    std::vector<float> dhbuf(is_f32 ? 0 : N), mult(p.dropout.enabled ? N : 0), dxbuf(p.dropout.enabled ? N : 0);
    for (int64_t blk = b0; blk < b1; ++blk) {
      float* dw_acc = dw_part.data() + blk * N;
      float* db_acc = db_part.data() + blk * N;
      const int64_t row_end = std::min(M, (blk + 1) * rows_per_block);
      for (int64_t m = blk * rows_per_block; m < row_end; ++m) {
        const float *hr, *dyr, *dhor = nullptr;
        float* dhr;
        if constexpr (is_f32) {
          hr = h + m * N;
          dyr = dy + m * N;
          dhor = dh_out ? dh_out + m * N : nullptr;
          dhr = dh + m * N;
        } else {
          cpu::load_row(h + m * N, hbuf.data(), N);
          cpu::load_row(dy + m * N, dybuf.data(), N);
          if (dh_out) {
            cpu::load_row(dh_out + m * N, dhoutbuf.data(), N);
            dhor = dhoutbuf.data();
          }
          hr = hbuf.data();
          dyr = dybuf.data();
          dhr = dhbuf.data();
        }
        const float mean = p.rms ? 0.f : p.mean[m];
        row_backward(hr, dyr, w.data(), dhor, mean, p.rstd[m], p.rms, dhr, dw_acc, db_acc, N);
        if (!is_f32) cpu::store_row(dhr, dh + m * N, N);
        if (p.dropout.enabled) {
          dropout_row(p.dropout, static_cast<uint64_t>(m * N), mult.data(), N);
          if constexpr (is_f32) {
            row_scale(dhr, mult.data(), dx + m * N, N);
          } else {
            row_scale(dhr, mult.data(), dxbuf.data(), N);
            cpu::store_row(dxbuf.data(), dx + m * N, N);
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
  switch (p.dtype) {
    case c10::kFloat: forward<float>(p); break;
    case c10::kHalf: forward<c10::Half>(p); break;
    case c10::kBFloat16: forward<c10::BFloat16>(p); break;
    default: TORCH_CHECK_TYPE(false, "layer_norm: unsupported dtype ", p.dtype);
  }
}

void bwd_cpu(const BwdParams& p) {
  switch (p.dtype) {
    case c10::kFloat: backward<float>(p); break;
    case c10::kHalf: backward<c10::Half>(p); break;
    case c10::kBFloat16: backward<c10::BFloat16>(p); break;
    default: TORCH_CHECK_TYPE(false, "layer_norm: unsupported dtype ", p.dtype);
  }
}

}  // namespace ff::layer_norm
