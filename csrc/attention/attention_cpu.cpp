// attention on the CPU: the math is in attention.h.
//
// Tiling. The forward walks one tile of BQ query rows at a time against tiles of BK keys:
//   S = scale * Q_i K_j^T                  (BLAS, BQ x BK, float32)
//   S += bias; online-softmax step         (vectorized passes over the tile, still in L1/L2)
//   acc = acc * alpha + (P Z) V_j          (BLAS, BQ x Dv)
// so memory is O(threads * BQ * BK) on top of the inputs and outputs. Work items are
// (batch, head, query tile), handed to torch's intra-op threads from a shared counter (a causal
// problem's tiles differ in cost; the costliest go first).
//
// The backward is FlashAttention-2's: P is recomputed from the saved lse, delta = rowsum(dO * O)
// is computed first, and a work item owns (batch, key/value head, a set of key tiles). For each
// of its key tiles it loops over the query heads of the group and over the query tiles,
//   S, P; dP = dO_i V_j^T; dV_j += (P Z)^T dO_i; dS = P (dP Z - delta);
//   dK_j += scale dS^T Q_i; dQ_i += scale dS K_j,
// so dK_j / dV_j are finished in one item (no races) and dQ goes to a float32 buffer per "key
// chunk". There is one chunk when batch x kv-heads alone keeps the threads busy; otherwise the
// key tiles are dealt round-robin to a few chunks (which also balances causal work) and their dQ
// buffers are added in chunk order. Results never depend on which thread ran which item.
//
// GEMMs on tiles go to torch's BLAS (the sgemm of the MKL torch links, called directly because a
// tile GEMM takes tens of microseconds; at::addmm_ on views of the tiles where torch has no MKL),
// one thread each inside the parallel region. The element-wise passes are plain loops that GCC
// vectorizes (`omp simd`, multi-versioned by FF_CPU_CLONES), with a polynomial exp.
// Low precision (common/cpu_gemm.h decides, once per process): bfloat16 inputs on a CPU whose
// bf16 tile GEMMs measure fast (avx512_bf16 / amx_bf16) are read in place by MKL's
// gemm_bf16bf16f32 — scores, softmax and accumulators in float32, P and dS rounded to bfloat16 as
// GEMM operands; otherwise bfloat16 / float16 inputs are converted to float32 once (O(S D) memory).
// Either way the outputs are rounded once at the end; the additive mask is read in its own dtype,
// row by row, through its strides.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention/attention.h"
#include "attention/attention_problem.h"
#include "common/cpu.h"
#include "common/cpu_gemm.h"
#include "common/cpu_kernels.h"
#include "common/dtype.h"

namespace ff::attention {
namespace {

using ff::cpu::dropout_row;
using ff::cpu::exp_f32;
using ff::cpu::f32_to_bf16;
using ff::cpu::load_elem;
using BF16 = c10::BFloat16;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// GEMM on tiles
// ---------------------------------------------------------------------------------------------
// Row-major C (m x n, row stride ldc) = alpha * op(A) op(B) + beta * C, where op(A) is m x k
// (A stored m x k, or k x m when trans_a) and op(B) is k x n (B stored k x n, or n x k when
// trans_b); every stored matrix has unit column stride. beta = 0 ignores C's contents.
//
// Tiles are small (a GEMM is tens of microseconds), so the call itself must be cheap: when torch
// is linked with MKL, its Fortran-interface sgemm is called directly (one thread inside torch's
// parallel region, as torch's own flash-attention kernel does); otherwise at::addmm_ on views of
// the tiles. A row-major product is the column-major product of the transposes: C^T = B^T A^T.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

bool use_direct_blas() {
  static const bool direct = sgemm_ != nullptr && at::hasMKL();
  return direct;
}

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (use_direct_blas()) {
    // BLAS wants each leading dim >= the stored row length even for a single row.
    const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
    const int ilda = static_cast<int>(std::max<int64_t>(lda, trans_a ? m : k));
    const int ildb = static_cast<int>(std::max<int64_t>(ldb, trans_b ? k : n));
    const int ildc = static_cast<int>(std::max<int64_t>(ldc, n));
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    sgemm_(&tb, &ta, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
    return;
  }
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  auto view = [&](const float* ptr, int64_t rows, int64_t cols, int64_t ld) {
    return at::from_blob(const_cast<float*>(ptr), {rows, cols}, {ld, 1}, opts);
  };
  const at::Tensor A = trans_a ? view(a, k, m, lda).t() : view(a, m, k, lda);
  const at::Tensor Bm = trans_b ? view(b, n, k, ldb).t() : view(b, k, n, ldb);
  at::Tensor C = view(c, m, n, ldc);
  C.addmm_(A, Bm, beta, alpha);
}

// The same with bfloat16 A and B (float32 C): MKL's gemm_bf16bf16f32.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const BF16* a, int64_t lda,
          const BF16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  ff::cpu::gemm_bf16_f32(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// ---------------------------------------------------------------------------------------------
// Element-wise passes (float32, multi-versioned)
// ---------------------------------------------------------------------------------------------

FF_CPU_CLONES float row_max(const float* x, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// Whether x holds a NaN (row_max skips NaNs: a row of NaN scores looks fully masked to it).
bool row_has_nan(const float* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    if (std::isnan(x[j])) return true;
  return false;
}

// x = exp(x - m); returns the sum of the new x.
FF_CPU_CLONES float row_exp_sum(float* x, int64_t n, float m) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp_f32(x[j] - m);
    x[j] = e;
    s += e;
  }
  return s;
}

// x = exp(x - m)
FF_CPU_CLONES void row_exp(float* x, int64_t n, float m) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] = exp_f32(x[j] - m);
}

FF_CPU_CLONES void row_scale(float* x, int64_t n, float a) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

FF_CPU_CLONES void row_add(float* x, const float* b, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] += b[j];
}

// out = x * z
FF_CPU_CLONES void row_mul(const float* x, const float* z, float* out, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = x[j] * z[j];
}

// dp = p * (dp - delta)
FF_CPU_CLONES void row_dsoftmax(float* dp, const float* p, float delta, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}

FF_CPU_CLONES float row_dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

FF_CPU_CLONES float row_dot(const BF16* a, const BF16* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += load_elem(a, j) * load_elem(b, j);
  return s;
}

// out = a * s   (out may be strided elsewhere; n contiguous elements)
FF_CPU_CLONES void row_scaled_copy(const float* a, float s, float* out, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = a[j] * s;
}

// x = masked_score(x, mask[j * stride]), the mask in its own dtype (attention.h: masking values).
template <typename M>
void add_mask_row_typed(float* x, const M* mask, int64_t stride, int64_t n) {
  if (stride == 1) {
    for (int64_t j = 0; j < n; ++j) x[j] = masked_score(x[j], static_cast<float>(mask[j]));
  } else {
    for (int64_t j = 0; j < n; ++j) x[j] = masked_score(x[j], static_cast<float>(mask[j * stride]));
  }
}

// The same for the mask row starting `first` elements into `mask`, of dtype t.
void add_mask_row(float* x, const void* mask, int64_t first, c10::ScalarType t, int64_t stride, int64_t n) {
  visit_dtype(t, "attention (cpu) attn_mask", [&]<typename M>(TypeTag<M>) {
    add_mask_row_typed(x, static_cast<const M*>(mask) + first, stride, n);
  });
}


// ---------------------------------------------------------------------------------------------
// Work distribution
// ---------------------------------------------------------------------------------------------
// Runs body(task, scratch) for every task in [0, ntasks) on torch's intra-op threads; each worker
// builds its scratch once and takes tasks from a shared counter until none are left.
template <typename MakeScratch, typename Body>
void run_tasks(int64_t ntasks, const MakeScratch& make_scratch, const Body& body) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t t = next.fetch_add(1); t < ntasks; t = next.fetch_add(1)) body(t, scratch);
  });
}

// ---------------------------------------------------------------------------------------------
// Masking of one score tile: rows q0 .. q0 + mq - 1, keys k0 .. k0 + nk - 1, row stride ld.
// ---------------------------------------------------------------------------------------------
struct TileMask {
  const Problem& pb;
  int64_t b, h;

  // kbias[j] = -inf where key k0 + j is padding, else 0. Returns false when every key is padding
  // (the tile contributes nothing). Without a key_padding_mask, kbias is untouched.
  bool key_bias(int64_t k0, int64_t nk, float* kbias) const {
    if (!pb.key_padding) return true;
    const bool* pad = pb.key_padding + b * pb.Sk + k0;
    bool any = false;
    for (int64_t j = 0; j < nk; ++j) {
      kbias[j] = pad[j] ? kNegInf : 0.f;
      any |= !pad[j];
    }
    return any;
  }

  void apply(float* s, int64_t ld, int64_t q0, int64_t mq, int64_t k0, int64_t nk, const float* kbias) const {
    for (int64_t i = 0; i < mq; ++i) {
      float* row = s + i * ld;
      if (pb.mask.ptr) {
        const int64_t first =
            b * pb.mask.stride_b + h * pb.mask.stride_h + (q0 + i) * pb.mask.stride_s + k0 * pb.mask_stride_k;
        add_mask_row(row, pb.mask.ptr, first, pb.mask_dtype, pb.mask_stride_k, nk);
      }
      if (pb.key_padding) row_add(row, kbias, nk);
      if (pb.causal) {  // key j is visible to query q0 + i iff j <= q0 + i
        const int64_t visible = std::clamp<int64_t>(q0 + i - k0 + 1, 0, nk);
        std::fill(row + visible, row + nk, kNegInf);
      }
    }
  }
};

// Row s of (b, h) of a GEMM operand of element type T (float32, or bfloat16 read in place).
template <typename T>
const T* row_of(const Strided4& t, int64_t b, int64_t h, int64_t s) {
  return static_cast<const T*>(t.ptr) + b * t.stride_b + h * t.stride_h + s * t.stride_s;
}

// A float32 tile (mq rows of n, row stride ld) as a GEMM operand of type T: itself for float32;
// for bfloat16, rounded into `low` (same layout).
template <typename T>
const T* tile_operand(const float* tile, std::vector<BF16>& low, int64_t mq, int64_t n, int64_t ld) {
  if constexpr (std::is_same_v<T, float>) {
    return tile;
  } else {
    for (int64_t i = 0; i < mq; ++i) f32_to_bf16(tile + i * ld, low.data() + i * ld, n);
    return low.data();
  }
}
float* f32_mut(const Strided4& t, int64_t b, int64_t h, int64_t s) {
  return static_cast<float*>(t.ptr) + b * t.stride_b + h * t.stride_h + s * t.stride_s;
}

// Tile sizes: BQ query rows x BK keys. The score tile (and, backward, its companions) should stay
// in L2; BLAS wants them not too thin.
struct Tiles {
  int64_t bq, bk;
};
// Tile sizes, measured on a 2-core AVX-512 Xeon (docs/cpu_kernels.md): 128 x 512 forward,
// 64 x 256 backward (three BQ x BK float32 tiles). Anything from 64 x 256 up was within a few
// percent; smaller tiles make the BLAS calls too thin.
Tiles forward_tiles(const Problem& pb) { return {std::min<int64_t>(pb.Sq, 128), std::min<int64_t>(pb.Sk, 512)}; }
Tiles backward_tiles(const Problem& pb) { return {std::min<int64_t>(pb.Sq, 64), std::min<int64_t>(pb.Sk, 256)}; }

// ---------------------------------------------------------------------------------------------
// forward (q, k, v of type T: float32, or bfloat16 with bf16 tile GEMMs; float32 out)
// ---------------------------------------------------------------------------------------------
struct FwdScratch {
  std::vector<float> s, acc, m, l, kbias, z;
  std::vector<BF16> p_low;  // P rounded for the P V GEMM (bfloat16 only)
};

template <typename T>
void forward_tiles(const FwdParams& p) {
  const Problem& pb = p.pb;
  const int64_t H = pb.H, Sq = pb.Sq, Sk = pb.Sk, D = pb.D, Dv = pb.Dv, group = pb.H / pb.Hk;
  const auto [BQ, BK] = forward_tiles(pb);
  const int64_t nqb = ceil_div(Sq, BQ);

  auto make_scratch = [&] {
    FwdScratch w;
    w.s.resize(BQ * BK);
    w.acc.resize(BQ * Dv);
    w.m.resize(BQ);
    w.l.resize(BQ);
    w.kbias.resize(BK);
    w.z.resize(pb.dropout.enabled ? BK : 0);
    w.p_low.resize(std::is_same_v<T, float> ? 0 : BQ * BK);
    return w;
  };

  run_tasks(pb.B * H * nqb, make_scratch, [&](int64_t task, FwdScratch& w) {
    const int64_t bh = task / nqb;
    const int64_t qb = nqb - 1 - task % nqb;  // the last (under is_causal, costliest) tiles first
    const int64_t b = bh / H, h = bh % H, hk = h / group;
    const int64_t q0 = qb * BQ, mq = std::min(BQ, Sq - q0);
    const TileMask mask{pb, b, h};
    const T* Q = row_of<T>(pb.q, b, h, q0);
    std::fill(w.acc.begin(), w.acc.begin() + mq * Dv, 0.f);
    std::fill(w.m.begin(), w.m.end(), kNegInf);
    std::fill(w.l.begin(), w.l.end(), 0.f);
    const int64_t kend = pb.causal ? std::min(Sk, q0 + mq) : Sk;

    for (int64_t k0 = 0; k0 < kend; k0 += BK) {
      const int64_t nk = std::min(BK, kend - k0);
      if (!mask.key_bias(k0, nk, w.kbias.data())) continue;
      float* s = w.s.data();
      gemm(false, true, mq, nk, D, pb.scale, Q, pb.q.stride_s, row_of<T>(pb.k, b, hk, k0), pb.k.stride_s, 0.f, s, BK);
      mask.apply(s, BK, q0, mq, k0, nk, w.kbias.data());
      for (int64_t i = 0; i < mq; ++i) {
        float* row = s + i * BK;
        const float m_new = std::max(w.m[i], row_max(row, nk));
        if (m_new == kNegInf) {  // nothing visible to this row yet
          if (row_has_nan(row, nk)) w.l[i] = std::numeric_limits<float>::quiet_NaN();  // NaN out, as torch
          std::fill(row, row + nk, 0.f);
          continue;
        }
        const float alpha = exp_f32(w.m[i] - m_new);  // 0 on the first visible tile
        w.l[i] = w.l[i] * alpha + row_exp_sum(row, nk, m_new);
        w.m[i] = m_new;
        if (alpha != 1.f) row_scale(w.acc.data() + i * Dv, Dv, alpha);
        if (pb.dropout.enabled) {
          const uint64_t first = static_cast<uint64_t>(((b * H + h) * Sq + q0 + i) * Sk + k0);
          dropout_row(pb.dropout, first, w.z.data(), nk);
          row_mul(row, w.z.data(), row, nk);
        }
      }
      const T* P = tile_operand<T>(s, w.p_low, mq, nk, BK);
      gemm(false, false, mq, Dv, nk, 1.f, P, BK, row_of<T>(pb.v, b, hk, k0), pb.v.stride_s, 1.f, w.acc.data(), Dv);
    }

    float* lse = p.lse + (b * H + h) * Sq + q0;
    for (int64_t i = 0; i < mq; ++i) {
      const bool empty = w.l[i] == 0.f;
      lse[i] = empty ? kNegInf : w.m[i] + std::log(w.l[i]);
      row_scaled_copy(w.acc.data() + i * Dv, empty ? 0.f : 1.f / w.l[i], f32_mut(p.out, b, h, q0 + i), Dv);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// backward (q, k, v, dout, out of type T as in the forward; float32 dq, dk, dv)
// ---------------------------------------------------------------------------------------------
struct BwdScratch {
  std::vector<float> p, dp, pz, dk, dv, kbias, z;
  std::vector<BF16> pz_low, ds_low;  // P Z and dS rounded for their GEMMs (bfloat16 only)
};

template <typename T>
void backward_tiles(const BwdParams& p) {
  const Problem& pb = p.pb;
  const int64_t B = pb.B, H = pb.H, Hk = pb.Hk, Sq = pb.Sq, Sk = pb.Sk, D = pb.D, Dv = pb.Dv;
  const int64_t group = H / Hk;
  const auto [BQ, BK] = backward_tiles(pb);
  const int64_t nkb = ceil_div(Sk, BK);
  const float scale = pb.scale;

  // delta_i = rowsum(dO * O), one float per query row.
  std::vector<float> delta(B * H * Sq);
  at::parallel_for(0, B * H * Sq, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % Sq, bh = r / Sq;
      delta[r] = row_dot(row_of<T>(p.dout, bh / H, bh % H, i), row_of<T>(p.out, bh / H, bh % H, i), Dv);
    }
  });

  // Key chunks: enough work items for the threads; dQ gets one float32 buffer per chunk.
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = B * Hk >= 4 * threads ? 1 : std::min(nkb, ceil_div(4 * threads, B * Hk));
  at::Tensor dq_acc = at::zeros({chunks, B, H, Sq, D}, at::TensorOptions().dtype(at::kFloat));
  float* dq_part = dq_acc.data_ptr<float>();

  auto make_scratch = [&] {
    BwdScratch w;
    w.p.resize(BQ * BK);
    w.dp.resize(BQ * BK);
    w.pz.resize(pb.dropout.enabled ? BQ * BK : 0);
    w.dk.resize(BK * D);
    w.dv.resize(BK * Dv);
    w.kbias.resize(BK);
    w.z.resize(pb.dropout.enabled ? BK : 0);
    w.pz_low.resize(std::is_same_v<T, float> ? 0 : BQ * BK);
    w.ds_low.resize(std::is_same_v<T, float> ? 0 : BQ * BK);
    return w;
  };

  run_tasks(B * Hk * chunks, make_scratch, [&](int64_t task, BwdScratch& w) {
    const int64_t chunk = task % chunks, bhk = task / chunks;
    const int64_t b = bhk / Hk, hk = bhk % Hk;
    float* dq_chunk = dq_part + chunk * B * H * Sq * D;
    for (int64_t kb = chunk; kb < nkb; kb += chunks) {
      const int64_t k0 = kb * BK, nk = std::min(BK, Sk - k0);
      const T* K = row_of<T>(pb.k, b, hk, k0);
      const T* V = row_of<T>(pb.v, b, hk, k0);
      std::fill(w.dk.begin(), w.dk.end(), 0.f);
      std::fill(w.dv.begin(), w.dv.end(), 0.f);
      const bool visible = TileMask{pb, b, 0}.key_bias(k0, nk, w.kbias.data());
      for (int64_t h = hk * group; visible && h < (hk + 1) * group; ++h) {
        const TileMask mask{pb, b, h};
        const int64_t qstart = pb.causal ? (k0 / BQ) * BQ : 0;  // rows before k0 see none of these keys
        for (int64_t q0 = qstart; q0 < Sq; q0 += BQ) {
          const int64_t mq = std::min(BQ, Sq - q0);
          const T* Q = row_of<T>(pb.q, b, h, q0);
          const T* dO = row_of<T>(p.dout, b, h, q0);
          const float* lse = p.lse + (b * H + h) * Sq + q0;
          const float* dlt = delta.data() + (b * H + h) * Sq + q0;
          float* P = w.p.data();
          float* dP = w.dp.data();
          gemm(false, true, mq, nk, D, scale, Q, pb.q.stride_s, K, pb.k.stride_s, 0.f, P, BK);
          mask.apply(P, BK, q0, mq, k0, nk, w.kbias.data());
          for (int64_t i = 0; i < mq; ++i) {
            if (lse[i] == kNegInf) std::fill(P + i * BK, P + i * BK + nk, 0.f);  // fully masked row
            else row_exp(P + i * BK, nk, lse[i]);
          }
          gemm(false, true, mq, nk, Dv, 1.f, dO, p.dout.stride_s, V, pb.v.stride_s, 0.f, dP, BK);
          const float* PZ = P;
          if (pb.dropout.enabled) {
            for (int64_t i = 0; i < mq; ++i) {
              const uint64_t first = static_cast<uint64_t>(((b * H + h) * Sq + q0 + i) * Sk + k0);
              dropout_row(pb.dropout, first, w.z.data(), nk);
              row_mul(P + i * BK, w.z.data(), w.pz.data() + i * BK, nk);
              row_mul(dP + i * BK, w.z.data(), dP + i * BK, nk);
            }
            PZ = w.pz.data();
          }
          gemm(true, false, nk, Dv, mq, 1.f, tile_operand<T>(PZ, w.pz_low, mq, nk, BK), BK, dO, p.dout.stride_s,
               1.f, w.dv.data(), Dv);
          for (int64_t i = 0; i < mq; ++i) row_dsoftmax(dP + i * BK, P + i * BK, dlt[i], nk);
          const T* dS = tile_operand<T>(dP, w.ds_low, mq, nk, BK);
          gemm(true, false, nk, D, mq, scale, dS, BK, Q, pb.q.stride_s, 1.f, w.dk.data(), D);
          gemm(false, false, mq, D, nk, scale, dS, BK, K, pb.k.stride_s, 1.f,
               dq_chunk + ((b * H + h) * Sq + q0) * D, D);
        }
      }
      for (int64_t j = 0; j < nk; ++j) {
        std::memcpy(f32_mut(p.dk, b, hk, k0 + j), w.dk.data() + j * D, D * sizeof(float));
        std::memcpy(f32_mut(p.dv, b, hk, k0 + j), w.dv.data() + j * Dv, Dv * sizeof(float));
      }
    }
  });

  // dQ = the chunk buffers added in chunk order.
  at::parallel_for(0, B * H * Sq, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* dst = f32_mut(p.dq, r / (H * Sq), (r / Sq) % H, r % Sq);
      std::memcpy(dst, dq_part + r * D, D * sizeof(float));
      for (int64_t c = 1; c < chunks; ++c) row_add(dst, dq_part + (c * B * H * Sq + r) * D, D);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Low-precision inputs: float32 copies in, one rounding out.
// ---------------------------------------------------------------------------------------------
using Sizes4 = std::array<int64_t, 4>;
Sizes4 q_sizes(const Problem& pb) { return {pb.B, pb.H, pb.Sq, pb.D}; }   // q, dq
Sizes4 k_sizes(const Problem& pb) { return {pb.B, pb.Hk, pb.Sk, pb.D}; }  // k, dk
Sizes4 v_sizes(const Problem& pb) { return {pb.B, pb.Hk, pb.Sk, pb.Dv}; } // v, dv
Sizes4 o_sizes(const Problem& pb) { return {pb.B, pb.H, pb.Sq, pb.Dv}; }  // out, dout

at::Tensor wrap(const Strided4& t, const Sizes4& sizes, c10::ScalarType dtype) {
  return at::from_blob(t.ptr, sizes, {t.stride_b, t.stride_h, t.stride_s, 1}, at::TensorOptions().dtype(dtype));
}

// Float32 stand-ins for a call's low-precision operands (of one dtype): input() points an operand at
// a float32 copy of it, output() at a float32 buffer, which round_outputs() rounds into the operand
// it stands for once the kernel has run.
class Float32Operands {
 public:
  explicit Float32Operands(c10::ScalarType dtype) : dtype_(dtype) {}

  void input(Strided4& t, const Sizes4& sizes) {
    copies_.push_back(wrap(t, sizes, dtype_).to(at::kFloat).contiguous());
    t = strided(copies_.back());
  }

  void output(Strided4& t, const Sizes4& sizes) {
    outputs_.push_back({t, sizes, at::empty(sizes, at::TensorOptions().dtype(at::kFloat))});
    t = strided(outputs_.back().f32);
  }

  void round_outputs() const {
    for (const Output& o : outputs_) wrap(o.dst, o.sizes, dtype_).copy_(o.f32);
  }

 private:
  struct Output {
    Strided4 dst;
    Sizes4 sizes;
    at::Tensor f32;
  };
  c10::ScalarType dtype_;
  std::vector<at::Tensor> copies_;
  std::vector<Output> outputs_;
};

}  // namespace

// Which kernel runs: common/cpu_gemm.h's gemm_path, the same rule as gelu_ffn's.
void fwd_cpu(const FwdParams& p) {
  const Problem& pb = p.pb;
  const cpu::GemmPath path = cpu::gemm_path(pb.dtype, cpu::GemmOp::kAttention, "attention (cpu)");
  if (path == cpu::GemmPath::kFloat32) return forward_tiles<float>(p);
  // out accumulated in float32 and rounded once; q, k, v read in place by the bf16 tile GEMMs, or
  // as float32 copies.
  FwdParams f = p;
  Float32Operands f32(pb.dtype);
  f32.output(f.out, o_sizes(pb));
  if (path == cpu::GemmPath::kBf16Gemm) {
    forward_tiles<BF16>(f);
  } else {
    f32.input(f.pb.q, q_sizes(pb));
    f32.input(f.pb.k, k_sizes(pb));
    f32.input(f.pb.v, v_sizes(pb));
    forward_tiles<float>(f);
  }
  f32.round_outputs();
}

void bwd_cpu(const BwdParams& p) {
  const Problem& pb = p.pb;
  const cpu::GemmPath path = cpu::gemm_path(pb.dtype, cpu::GemmOp::kAttention, "attention (cpu)");
  if (path == cpu::GemmPath::kFloat32) return backward_tiles<float>(p);
  // dq, dk, dv accumulated in float32 and rounded once; q, k, v, dout, out read in place by the bf16
  // tile GEMMs, or as float32 copies.
  BwdParams f = p;
  Float32Operands f32(pb.dtype);
  f32.output(f.dq, q_sizes(pb));
  f32.output(f.dk, k_sizes(pb));
  f32.output(f.dv, v_sizes(pb));
  if (path == cpu::GemmPath::kBf16Gemm) {
    backward_tiles<BF16>(f);
  } else {
    f32.input(f.pb.q, q_sizes(pb));
    f32.input(f.pb.k, k_sizes(pb));
    f32.input(f.pb.v, v_sizes(pb));
    f32.input(f.dout, o_sizes(pb));
    f32.input(f.out, o_sizes(pb));
    backward_tiles<float>(f);
  }
  f32.round_outputs();
}

}  // namespace ff::attention
