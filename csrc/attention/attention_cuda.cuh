// attention on CUDA GPUs (sm_80+): FlashAttention-2-style forward and backward on tensor cores
// (mma.sync m16n8k16, ldmatrix, cp.async), written against simt/simt.cuh only, so the same
// templates run on the host emulator (tests/emu) and on the GPU. The math is in attention.h.
//
// Head dims. D and Dv are runtime values (multiples of 8, at most 256, Dv may differ from D); the
// kernels are instantiated for a padded head dim DP in {64, 128, 256} (the bucket of max(D, Dv)).
// Shared-memory tiles are DP columns wide; the 16-byte cp.async copies zero-fill columns >= D (or
// Dv) and rows past the sequence, so the padding contributes zeros to every product, and the k
// loops stop at the first 16-column block past the data.
//
// Shared-memory layout. Every tile is row-major with a row stride of DP + 8 elements: the 16-byte
// pad shifts consecutive rows by four banks, so the eight 16-byte row reads of one ldmatrix hit
// distinct banks. Fragments (see simt.cuh): an A operand or a "k-major" B operand (.trans) is
// read with frag_rows16, a B operand stored as (n, k) rows (K for Q K^T) with frag_rows8x2.
//
// Forward (fwd_kernel): one CTA of 4 warps per (64 query rows, batch * head); warp w owns rows
// 16w..16w+15 of the tile. The Q tile is copied once and (DP <= 128) kept in registers as mma
// fragments; K / V tiles of BK keys (64, or 32 for DP = 256) are double-buffered: tile j + 1 is in
// flight while tile j is computed. Per tile:
//   S = Q K^T                      mma, float32 accumulators (16 x BK per warp)
//   scores in log2 units           s * scale * log2(e) + attn_mask * log2(e); -inf where causal,
//                                  key padding or out of range
//   online softmax                 row max / sum over the 4 lanes of a quad (__shfl_xor_sync),
//                                  exp2f, rescale of the accumulator by exp2(m_old - m_new)
//   dropout                        P *= z after the statistics (l is not dropped), one Philox
//                                  block per pair of consecutive keys
//   O += P V                       P rounded to 16 bits in registers and used directly as the A
//                                  operand (the C-fragment -> A-fragment identity), V via
//                                  ldmatrix .trans
// Causal: key tiles entirely right of the tile's last row are never loaded. At the end out =
// acc / l (0 for a fully masked row) and lse = (m + log2 l) ln 2 (-inf for a fully masked row).
// We chose 64 query rows (16 per warp) for every DP instead of 128: with 4 warps and 32 rows per
// warp the DP = 128 accumulators alone need 128 registers per thread and the kernel spills.
//
// Backward, three launches (FlashAttention-2):
//   bwd_delta_kernel   delta_i = dO_i . O_i (float32, (B, H, Sq)), one warp per row; it also
//                      zeroes the row of the float32 dQ accumulator.
//   bwd_kernel         one CTA per (64 keys, batch * kv head); warp w owns keys 16w..16w+15 and
//                      keeps dK / dV for them in registers. K / V are loaded once; the CTA loops
//                      over the query heads of the GQA group and the query tiles of BQb rows
//                      (64 for DP = 64, else 32: register budget), so dK / dV need no atomics:
//                        S^T = K Q^T, P^T = exp2(S^T - lse)      (recomputed from the saved lse)
//                        dP^T = V dO^T, dropout: PZ = P z, dP *= z
//                        dS^T = P^T (dP^T - delta)
//                        dV += PZ^T-as-A-operand x dO,  dK += dS^T x Q  (register reuse again)
//                        dQ += dS K: dS^T goes to shared memory (16-bit), all 4 warps share the
//                        (BQb x D) product in 16 x 16 blocks and atomicAdd into the accumulator.
//                      Causal: query tiles entirely above the key tile's first key are skipped.
//   dq_convert_kernel  dq = scale * accumulator, in q's dtype and dq's strides.
// Deterministic mode (BwdParams::deterministic): bwd_kernel skips dQ and bwd_dq_kernel computes
// it per (64 query rows, batch * head), looping over the key tiles like the forward (recompute
// S, P, dP, dS; dQ += dS K in registers): no atomics, bitwise reproducible.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "simt/simt.cuh"

#include "attention/attention.h"

namespace ff::attention::gpu {

constexpr int kThreads = 128;  // 4 warps per CTA in every tensor-core kernel
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int DP>
struct Tiles {
  static constexpr int kLd = DP + 8;                 // smem row stride of a DP-wide tile
  static constexpr int kBQ = 64;                     // fwd / dq kernel: query rows per CTA
  static constexpr int kBK = DP == 256 ? 32 : 64;    // fwd / dq kernel: keys per pipelined tile
  static constexpr int kBKb = 64;                    // bwd: keys per CTA
  static constexpr int kBQb = DP == 64 ? 64 : 32;     // bwd: query rows per inner step
  static constexpr int kLdS = kBQb + 8;              // bwd: row stride of the dS^T tile
};

// The padded head dim serving max(D, Dv), or 0 when it is too large.
inline int head_dim_bucket(int64_t d) { return d <= 64 ? 64 : d <= 128 ? 128 : d <= 256 ? 256 : 0; }

__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float lo, float hi) {
  *reinterpret_cast<uint32_t*>(dst) = ff::simt::pack2<T>(lo, hi);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---------------------------------------------------------------------------------------------
// Tiles and fragments
// ---------------------------------------------------------------------------------------------
// cp.async of ROWS x DP elements of a row-major global matrix (row stride `stride`) into a smem
// tile of row stride DP + 8; rows >= nrows and columns >= ncols are zero-filled.
template <int ROWS, int DP, typename T>
__device__ __forceinline__ void load_tile_async(T* s, const T* g, int64_t stride, int nrows, int ncols) {
  constexpr int kChunks = DP / 8;
  for (int c = threadIdx.x; c < ROWS * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool ok = r < nrows && col < ncols;
    ff::simt::cp_async_16(s + r * (DP + 8) + col, ok ? g + r * stride + col : g, ok);
  }
}

// This lane's ldmatrix .x4 row address for the 16 x 16 block at (r0, c0) in the order
// (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15):
// the A operand without .trans; with .trans, the B operand of two n-tiles (c0, c0 + 8) of a
// matrix stored (k, n), registers {0, 1} and {2, 3}.
template <int LD, typename T>
__device__ __forceinline__ const T* frag_rows16(const T* s, int r0, int c0, int lane) {
  return s + (r0 + (lane & 15)) * LD + c0 + ((lane >> 4) << 3);
}
// The order (rows 0-7, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 0-7), (rows 8-15,
// cols 8-15): without .trans, the B operand of two n-tiles (r0, r0 + 8) of a matrix stored
// (n, k); with .trans, the A operand of a matrix stored transposed, (k, m).
template <int LD, typename T>
__device__ __forceinline__ const T* frag_rows8x2(const T* s, int r0, int c0, int lane) {
  return s + (r0 + (lane & 7) + ((lane >> 4) << 3)) * LD + c0 + (((lane >> 3) & 1) << 3);
}

// acc (16 x 8NT) += A B^T for one warp: A = rows a0..a0+15 of sA, B = rows 0..8NT-1 of sB, both
// stored (row, k) with k < kdim (rounded up to 16; the padding columns are zero).
template <typename T, int NT, int KMAX, int LDA, int LDB>
__device__ __forceinline__ void mma_abt(float (&acc)[NT][4], const T* sA, int a0, const T* sB, int kdim, int lane) {
#pragma unroll
  for (int kk = 0; kk < KMAX / 16; ++kk) {
    if (kk * 16 >= kdim) break;
    uint32_t a[4];
    ff::simt::ldmatrix_x4(a, frag_rows16<LDA>(sA, a0, kk * 16, lane));
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t r[4];
      ff::simt::ldmatrix_x4(r, frag_rows8x2<LDB>(sB, np * 16, kk * 16, lane));
      const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
      ff::simt::mma_m16n8k16<T>(acc[2 * np], a, b0);
      ff::simt::mma_m16n8k16<T>(acc[2 * np + 1], a, b1);
    }
  }
}

// The same with A held in registers: a[kk] is the fragment of columns 16kk..16kk+15.
template <typename T, int NT, int KF, int LDB>
__device__ __forceinline__ void mma_abt(float (&acc)[NT][4], const uint32_t (&a)[KF][4], const T* sB, int kdim,
                                        int lane) {
#pragma unroll
  for (int kk = 0; kk < KF; ++kk) {
    if (kk * 16 >= kdim) break;
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t r[4];
      ff::simt::ldmatrix_x4(r, frag_rows8x2<LDB>(sB, np * 16, kk * 16, lane));
      const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
      ff::simt::mma_m16n8k16<T>(acc[2 * np], a[kk], b0);
      ff::simt::mma_m16n8k16<T>(acc[2 * np + 1], a[kk], b1);
    }
  }
}

// acc (16 x 8NT) += C B for one warp: C (16 x 8KT) is a float32 accumulator tile, rounded to T
// and reused as the A operand in registers; B = rows 0..8KT-1 of sB stored (k, n), n < ndim
// (rounded up to 16).
template <typename T, int NT, int KT, int LDB>
__device__ __forceinline__ void mma_cb(float (&acc)[NT][4], const float (&c)[KT][4], const T* sB, int ndim,
                                       int lane) {
#pragma unroll
  for (int kk = 0; kk < KT / 2; ++kk) {
    const uint32_t a[4] = {ff::simt::pack2<T>(c[2 * kk][0], c[2 * kk][1]),
                           ff::simt::pack2<T>(c[2 * kk][2], c[2 * kk][3]),
                           ff::simt::pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]),
                           ff::simt::pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3])};
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      if (np * 16 >= ndim) break;
      uint32_t r[4];
      ff::simt::ldmatrix_x4_trans(r, frag_rows16<LDB>(sB, kk * 16, np * 16, lane));
      const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
      ff::simt::mma_m16n8k16<T>(acc[2 * np], a, b0);
      ff::simt::mma_m16n8k16<T>(acc[2 * np + 1], a, b1);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Scores, masks and dropout
// ---------------------------------------------------------------------------------------------
// The (batch, head) slice a CTA works on and its score transform, in log2 units:
//   x -> x * scale * log2(e) + attn_mask[i, j] * log2(e) (masked_score: masking values), -inf where
//   a mask hides (i, j) or (i, j) is outside (Sq, Sk).
struct Slice {
  const char* mask = nullptr;  // attn_mask at (b, h), or nullptr
  int mask_kind = 0;           // 0: float32, 1: float16, 2: bfloat16
  int64_t mask_ss = 0, mask_sk = 0;
  const bool* pad = nullptr;   // key_padding_mask row b, or nullptr
  int Sq = 0, Sk = 0;
  float scale_log2 = 0.f;
  bool causal = false;

  __device__ __forceinline__ float score(int i, int j, float x) const {
    if (i >= Sq || j >= Sk || (causal && j > i) || (pad && pad[j])) return -INFINITY;
    float s = x * scale_log2;
    if (mask) {
      const int64_t idx = i * mask_ss + j * mask_sk;
      const float m = mask_kind == 0   ? reinterpret_cast<const float*>(mask)[idx]
                      : mask_kind == 1 ? to_f32(reinterpret_cast<const __half*>(mask)[idx])
                                       : to_f32(reinterpret_cast<const __nv_bfloat16*>(mask)[idx]);
      s = masked_score(s, m, kLog2e);  // attention.h: masking values
    }
    return s;
  }
};

__device__ __forceinline__ Slice make_slice(const Problem& pb, int64_t b, int64_t h) {
  Slice s;
  if (pb.mask.ptr) {
    const bool f32 = pb.mask_dtype == c10::ScalarType::Float;
    s.mask_kind = f32 ? 0 : pb.mask_dtype == c10::ScalarType::Half ? 1 : 2;
    s.mask = static_cast<const char*>(pb.mask.ptr) + (f32 ? 4 : 2) * (b * pb.mask.stride_b + h * pb.mask.stride_h);
    s.mask_ss = pb.mask.stride_s;
    s.mask_sk = pb.mask_stride_k;
  }
  s.pad = pb.key_padding ? pb.key_padding + b * pb.Sk : nullptr;
  s.Sq = static_cast<int>(pb.Sq);
  s.Sk = static_cast<int>(pb.Sk);
  s.scale_log2 = pb.scale * kLog2e;
  s.causal = pb.causal;
  return s;
}

// Dropout: dropout_multiplier / dropout_pair (common/philox.h), the one definition of the mask.

// The K / V pipeline of the forward and dQ kernels (double buffer, tile `it` of `ntiles` in
// buffer it & 1): start the copies of tile it + 1 into the other buffer, then wait until tile
// `it` has landed and every thread can read it.
template <int BK, int DP, typename T>
__device__ __forceinline__ void next_kv_tile(T* sK, T* sV, const T* K, const T* V, const Problem& pb, int it,
                                             int ntiles) {
  constexpr int LD = Tiles<DP>::kLd;
  if (it + 1 < ntiles) {
    const int kn = (it + 1) * BK, buf = (it + 1) & 1, Sk = static_cast<int>(pb.Sk);
    load_tile_async<BK, DP>(sK + buf * BK * LD, K + kn * pb.k.stride_s, pb.k.stride_s, Sk - kn,
                            static_cast<int>(pb.D));
    load_tile_async<BK, DP>(sV + buf * BK * LD, V + kn * pb.v.stride_s, pb.v.stride_s, Sk - kn,
                            static_cast<int>(pb.Dv));
    ff::simt::cp_async_commit();
    ff::simt::cp_async_wait<1>();
  } else {
    ff::simt::cp_async_wait<0>();
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const FwdParams p) {
  using C = Tiles<DP>;
  constexpr int LD = C::kLd, BQ = C::kBQ, BK = C::kBK, NT = BK / 8, NO = DP / 8;
  FF_DYNAMIC_SMEM(T, smem);
  T* sQ = smem;
  T* sK = sQ + BQ * LD;      // 2 buffers of BK rows
  T* sV = sK + 2 * BK * LD;  // 2 buffers of BK rows
  const Problem& pb = p.pb;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int64_t bh = blockIdx.x, b = bh / pb.H, h = bh % pb.H, hk = h / (pb.H / pb.Hk);
  const int q0 = blockIdx.y * BQ, Sq = static_cast<int>(pb.Sq), Sk = static_cast<int>(pb.Sk);
  const int D = static_cast<int>(pb.D), Dv = static_cast<int>(pb.Dv);
  const T* Q = static_cast<const T*>(pb.q.ptr) + b * pb.q.stride_b + h * pb.q.stride_h + q0 * pb.q.stride_s;
  const T* K = static_cast<const T*>(pb.k.ptr) + b * pb.k.stride_b + hk * pb.k.stride_h;
  const T* V = static_cast<const T*>(pb.v.ptr) + b * pb.v.stride_b + hk * pb.v.stride_h;
  const Slice sl = make_slice(pb, b, h);
  const int kend = pb.causal && q0 + BQ < Sk ? q0 + BQ : Sk;
  const int ntiles = (kend + BK - 1) / BK;

  load_tile_async<BQ, DP>(sQ, Q, pb.q.stride_s, Sq - q0, D);
  load_tile_async<BK, DP>(sK, K, pb.k.stride_s, Sk, D);
  load_tile_async<BK, DP>(sV, V, pb.v.stride_s, Sk, Dv);
  ff::simt::cp_async_commit();

  // The warp's Q rows as mma A fragments, loaded once (DP <= 128; for DP = 256 they would take 64
  // more registers, so that bucket reads them from shared memory per key tile).
  constexpr bool kQInRegs = DP <= 128;
  uint32_t qf[kQInRegs ? DP / 16 : 1][4];
  float acc[NO][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const int row_w = warp * 16;
  const int rows[2] = {q0 + row_w + g, q0 + row_w + g + 8};

  for (int it = 0; it < ntiles; ++it) {
    const int k0 = it * BK;
    next_kv_tile<BK, DP>(sK, sV, K, V, pb, it, ntiles);
    const T* cK = sK + (it & 1) * BK * LD;
    const T* cV = sV + (it & 1) * BK * LD;

    float s[NT][4] = {};
    if constexpr (kQInRegs) {
      if (it == 0) {
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk) ff::simt::ldmatrix_x4(qf[kk], frag_rows16<LD>(sQ, row_w, kk * 16, lane));
      }
      mma_abt<T, NT, DP / 16, LD>(s, qf, cK, D, lane);
    } else {
      mma_abt<T, NT, DP, LD, LD>(s, sQ, row_w, cK, D, lane);
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = rows[r];
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = s[nt][2 * r + e];
          x = sl.score(i, k0 + nt * 8 + 2 * t + e, x);
          mx = fmaxf(mx, x);
        }
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[r], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: p = 0, alpha = 0
      const float alpha = exp2f(m[r] - m_use);
      m[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = s[nt][2 * r + e];
          x = exp2f(x - m_use);
          sum += x;
        }
      }
      l[r] = l[r] * alpha + sum;  // this lane's partial sum; the quad is summed at the end
#pragma unroll
      for (int no = 0; no < NO; ++no) {
        acc[no][2 * r] *= alpha;
        acc[no][2 * r + 1] *= alpha;
      }
      if (pb.dropout.enabled && i < Sq) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int j = k0 + nt * 8 + 2 * t;
          if (j < Sk) {
            float z0, z1;
            dropout_pair(pb.dropout, static_cast<uint64_t>((bh * Sq + i) * Sk + j), z0, z1);
            s[nt][2 * r] *= z0;
            s[nt][2 * r + 1] *= z1;
          }
        }
      }
    }

    mma_cb<T, NO, NT, LD>(acc, s, cV, Dv, lane);
    __syncthreads();  // the buffer is refilled by the next iteration's prefetch
  }

  T* out = static_cast<T*>(p.out.ptr) + b * p.out.stride_b + h * p.out.stride_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const int i = rows[r];
    if (i >= Sq) continue;
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    T* orow = out + i * p.out.stride_s;
#pragma unroll
    for (int no = 0; no < NO; ++no) {
      const int c = no * 8 + 2 * t;
      if (c < Dv) store_pair(orow + c, acc[no][2 * r] * inv, acc[no][2 * r + 1] * inv);
    }
    if (t == 0) p.lse[bh * Sq + i] = l[r] > 0.f ? (m[r] + log2f(l[r])) * kLn2 : -INFINITY;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------
// delta = rowsum(dO * O), one warp per query row; zeroes the row of dq_acc unless it is null.
template <typename T>
__global__ void bwd_delta_kernel(const BwdParams p, float* delta, float* dq_acc) {
  const Problem& pb = p.pb;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (row >= pb.B * pb.H * pb.Sq) return;  // the whole warp
  const int64_t i = row % pb.Sq, bh = row / pb.Sq, b = bh / pb.H, h = bh % pb.H;
  const T* dO = static_cast<const T*>(p.dout.ptr) + b * p.dout.stride_b + h * p.dout.stride_h + i * p.dout.stride_s;
  const T* O = static_cast<const T*>(p.out.ptr) + b * p.out.stride_b + h * p.out.stride_h + i * p.out.stride_s;
  float s = 0.f;
  for (int64_t c = lane; c < pb.Dv; c += 32) s += to_f32(dO[c]) * to_f32(O[c]);
  s = warp_sum(s);
  if (lane == 0) delta[row] = s;
  if (dq_acc) {
    for (int64_t c = lane; c < pb.D; c += 32) dq_acc[row * pb.D + c] = 0.f;
  }
}

// dK / dV of one key tile (and, with dq_acc, the atomic dQ contributions); see the header.
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const BwdParams p, const float* delta, float* dq_acc) {
  using C = Tiles<DP>;
  constexpr int LD = C::kLd, BKb = C::kBKb, BQb = C::kBQb, LDS = C::kLdS, NQ = BQb / 8, NO = DP / 8;
  FF_DYNAMIC_SMEM(T, smem);
  T* sK = smem;
  T* sV = sK + BKb * LD;
  T* sQ = sV + BKb * LD;
  T* sdO = sQ + BQb * LD;
  T* sdS = sdO + BQb * LD;  // dS^T, (keys, queries)
  float* sLse = reinterpret_cast<float*>(sdS + BKb * LDS);
  float* sDelta = sLse + BQb;
  const Problem& pb = p.pb;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int64_t bhk = blockIdx.x, b = bhk / pb.Hk, hk = bhk % pb.Hk, group = pb.H / pb.Hk;
  const int k0 = blockIdx.y * BKb, Sq = static_cast<int>(pb.Sq), Sk = static_cast<int>(pb.Sk);
  const int D = static_cast<int>(pb.D), Dv = static_cast<int>(pb.Dv);
  const T* K = static_cast<const T*>(pb.k.ptr) + b * pb.k.stride_b + hk * pb.k.stride_h + k0 * pb.k.stride_s;
  const T* V = static_cast<const T*>(pb.v.ptr) + b * pb.v.stride_b + hk * pb.v.stride_h + k0 * pb.v.stride_s;
  load_tile_async<BKb, DP>(sK, K, pb.k.stride_s, Sk - k0, D);
  load_tile_async<BKb, DP>(sV, V, pb.v.stride_s, Sk - k0, Dv);
  ff::simt::cp_async_commit();

  float dk[NO][4] = {}, dv[NO][4] = {};
  const int key_w = warp * 16;
  const int key0 = k0 + key_w + g;  // this lane's keys: key0 and key0 + 8
  const int q_first = pb.causal ? (k0 / BQb) * BQb : 0;  // earlier rows see none of these keys

  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const Slice sl = make_slice(pb, b, h);
    const int64_t bh = b * pb.H + h;
    const T* Qh = static_cast<const T*>(pb.q.ptr) + b * pb.q.stride_b + h * pb.q.stride_h;
    const T* dOh = static_cast<const T*>(p.dout.ptr) + b * p.dout.stride_b + h * p.dout.stride_h;
    for (int q0 = q_first; q0 < Sq; q0 += BQb) {
      __syncthreads();  // the previous step is done with sQ, sdO, sdS, sLse, sDelta
      load_tile_async<BQb, DP>(sQ, Qh + q0 * pb.q.stride_s, pb.q.stride_s, Sq - q0, D);
      load_tile_async<BQb, DP>(sdO, dOh + q0 * p.dout.stride_s, p.dout.stride_s, Sq - q0, Dv);
      ff::simt::cp_async_commit();
      for (int r = threadIdx.x; r < BQb; r += kThreads) {
        const int i = q0 + r;
        sLse[r] = i < Sq ? p.lse[bh * Sq + i] * kLog2e : -INFINITY;
        sDelta[r] = i < Sq ? delta[bh * Sq + i] : 0.f;
      }
      ff::simt::cp_async_wait<0>();
      __syncthreads();

      float st[NQ][4] = {};   // S^T, then P^T z
      float dpt[NQ][4] = {};  // dP^T, then dS^T
      mma_abt<T, NQ, DP, LD, LD>(st, sK, key_w, sQ, D, lane);
      mma_abt<T, NQ, DP, LD, LD>(dpt, sV, key_w, sdO, Dv, lane);
#pragma unroll
      for (int nt = 0; nt < NQ; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int ii = nt * 8 + 2 * t + (e & 1), i = q0 + ii, j = key0 + 8 * (e >> 1);
          const float lse2 = sLse[ii];
          const float x = sl.score(i, j, st[nt][e]);
          const float pr = lse2 == -INFINITY ? 0.f : exp2f(x - lse2);
          float dp = dpt[nt][e], pz = pr;
          if (pb.dropout.enabled && pr != 0.f) {
            const float z = dropout_multiplier(pb.dropout, static_cast<uint64_t>((bh * Sq + i) * Sk + j));
            pz = pr * z;
            dp *= z;
          }
          st[nt][e] = pz;
          dpt[nt][e] = pr * (dp - sDelta[ii]);
        }
      }
      mma_cb<T, NO, NQ, LD>(dv, st, sdO, Dv, lane);  // dV += (P z)^T dO
      mma_cb<T, NO, NQ, LD>(dk, dpt, sQ, D, lane);   // dK += dS^T Q   (scaled at the end)

      if (dq_acc) {
#pragma unroll
        for (int nt = 0; nt < NQ; ++nt) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            store_pair(sdS + (key_w + g + 8 * r) * LDS + nt * 8 + 2 * t, dpt[nt][2 * r], dpt[nt][2 * r + 1]);
          }
        }
        __syncthreads();
        // dQ (BQb x D) += dS K in blocks of 16 queries x 16 columns dealt to the warps.
        const int nd = (D + 15) / 16, items = (BQb / 16) * nd;
        for (int item = warp; item < items; item += kThreads / 32) {
          const int mq = item / nd, cd = item % nd;
          float a2[2][4] = {};
#pragma unroll
          for (int kk = 0; kk < BKb / 16; ++kk) {
            uint32_t a[4], r[4];
            ff::simt::ldmatrix_x4_trans(a, frag_rows8x2<LDS>(sdS, kk * 16, mq * 16, lane));
            ff::simt::ldmatrix_x4_trans(r, frag_rows16<LD>(sK, kk * 16, cd * 16, lane));
            const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
            ff::simt::mma_m16n8k16<T>(a2[0], a, b0);
            ff::simt::mma_m16n8k16<T>(a2[1], a, b1);
          }
#pragma unroll
          for (int half = 0; half < 2; ++half) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int i = q0 + mq * 16 + g + 8 * (e >> 1), c = cd * 16 + half * 8 + 2 * t + (e & 1);
              if (i < Sq && c < D) atomicAdd(dq_acc + (bh * Sq + i) * D + c, a2[half][e]);
            }
          }
        }
      }
    }
  }

  ff::simt::cp_async_wait<0>();  // K / V are still in flight when no query row sees this key tile

  T* dK = static_cast<T*>(p.dk.ptr) + b * p.dk.stride_b + hk * p.dk.stride_h;
  T* dV = static_cast<T*>(p.dv.ptr) + b * p.dv.stride_b + hk * p.dv.stride_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = key0 + 8 * r;
    if (j >= Sk) continue;
#pragma unroll
    for (int no = 0; no < NO; ++no) {
      const int c = no * 8 + 2 * t;
      if (c < D) store_pair(dK + j * p.dk.stride_s + c, dk[no][2 * r] * pb.scale, dk[no][2 * r + 1] * pb.scale);
      if (c < Dv) store_pair(dV + j * p.dv.stride_s + c, dv[no][2 * r], dv[no][2 * r + 1]);
    }
  }
}

// dq = scale * dq_acc in q's dtype, element pairs in a grid-stride loop.
template <typename T>
__global__ void dq_convert_kernel(const BwdParams p, const float* dq_acc) {
  const Problem& pb = p.pb;
  const int64_t pairs = pb.B * pb.H * pb.Sq * pb.D / 2;
  for (int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; x < pairs;
       x += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = 2 * x, row = e / pb.D, c = e % pb.D;
    const int64_t i = row % pb.Sq, bh = row / pb.Sq, b = bh / pb.H, h = bh % pb.H;
    T* dst = static_cast<T*>(p.dq.ptr) + b * p.dq.stride_b + h * p.dq.stride_h + i * p.dq.stride_s + c;
    store_pair(dst, dq_acc[e] * pb.scale, dq_acc[e + 1] * pb.scale);
  }
}

// Deterministic dQ: one CTA per (64 query rows, batch * head), looping over the key tiles.
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) bwd_dq_kernel(const BwdParams p, const float* delta) {
  using C = Tiles<DP>;
  constexpr int LD = C::kLd, BQ = C::kBQ, BK = C::kBK, NT = BK / 8, NO = DP / 8;
  FF_DYNAMIC_SMEM(T, smem);
  T* sQ = smem;
  T* sdO = sQ + BQ * LD;
  T* sK = sdO + BQ * LD;     // 2 buffers of BK rows
  T* sV = sK + 2 * BK * LD;  // 2 buffers of BK rows
  const Problem& pb = p.pb;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int64_t bh = blockIdx.x, b = bh / pb.H, h = bh % pb.H, hk = h / (pb.H / pb.Hk);
  const int q0 = blockIdx.y * BQ, Sq = static_cast<int>(pb.Sq), Sk = static_cast<int>(pb.Sk);
  const int D = static_cast<int>(pb.D), Dv = static_cast<int>(pb.Dv);
  const T* Q = static_cast<const T*>(pb.q.ptr) + b * pb.q.stride_b + h * pb.q.stride_h + q0 * pb.q.stride_s;
  const T* dO = static_cast<const T*>(p.dout.ptr) + b * p.dout.stride_b + h * p.dout.stride_h +
                q0 * p.dout.stride_s;
  const T* K = static_cast<const T*>(pb.k.ptr) + b * pb.k.stride_b + hk * pb.k.stride_h;
  const T* V = static_cast<const T*>(pb.v.ptr) + b * pb.v.stride_b + hk * pb.v.stride_h;
  const Slice sl = make_slice(pb, b, h);
  const int kend = pb.causal && q0 + BQ < Sk ? q0 + BQ : Sk;
  const int ntiles = (kend + BK - 1) / BK;

  load_tile_async<BQ, DP>(sQ, Q, pb.q.stride_s, Sq - q0, D);
  load_tile_async<BQ, DP>(sdO, dO, p.dout.stride_s, Sq - q0, Dv);
  load_tile_async<BK, DP>(sK, K, pb.k.stride_s, Sk, D);
  load_tile_async<BK, DP>(sV, V, pb.v.stride_s, Sk, Dv);
  ff::simt::cp_async_commit();

  const int row_w = warp * 16;
  const int rows[2] = {q0 + row_w + g, q0 + row_w + g + 8};
  float lse2[2], dlt[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool in = rows[r] < Sq;
    lse2[r] = in ? p.lse[bh * Sq + rows[r]] * kLog2e : -INFINITY;
    dlt[r] = in ? delta[bh * Sq + rows[r]] : 0.f;
  }
  float dq[NO][4] = {};

  for (int it = 0; it < ntiles; ++it) {
    const int k0 = it * BK;
    next_kv_tile<BK, DP>(sK, sV, K, V, pb, it, ntiles);
    const T* cK = sK + (it & 1) * BK * LD;
    const T* cV = sV + (it & 1) * BK * LD;

    float s[NT][4] = {}, dp[NT][4] = {};
    mma_abt<T, NT, DP, LD, LD>(s, sQ, row_w, cK, D, lane);
    mma_abt<T, NT, DP, LD, LD>(dp, sdO, row_w, cV, Dv, lane);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = rows[r];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int j = k0 + nt * 8 + 2 * t;
        float z[2] = {1.f, 1.f};
        if (pb.dropout.enabled && i < Sq && j < Sk) {
          dropout_pair(pb.dropout, static_cast<uint64_t>((bh * Sq + i) * Sk + j), z[0], z[1]);
        }
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = s[nt][2 * r + e];
          const float sc = sl.score(i, j + e, x);
          const float pr = lse2[r] == -INFINITY ? 0.f : exp2f(sc - lse2[r]);
          x = pr * (dp[nt][2 * r + e] * z[e] - dlt[r]);  // dS
        }
      }
    }
    mma_cb<T, NO, NT, LD>(dq, s, cK, D, lane);  // dQ += dS K
    __syncthreads();
  }

  T* dQ = static_cast<T*>(p.dq.ptr) + b * p.dq.stride_b + h * p.dq.stride_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = rows[r];
    if (i >= Sq) continue;
#pragma unroll
    for (int no = 0; no < NO; ++no) {
      const int c = no * 8 + 2 * t;
      if (c < D) store_pair(dQ + i * p.dq.stride_s + c, dq[no][2 * r] * pb.scale, dq[no][2 * r + 1] * pb.scale);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host launchers (pointers are device pointers; under emulation, host memory)
// ---------------------------------------------------------------------------------------------
template <typename T, int DP>
void launch_fwd(const FwdParams& p, cudaStream_t stream) {
  using C = Tiles<DP>;
  const size_t smem = static_cast<size_t>(C::kBQ + 4 * C::kBK) * C::kLd * sizeof(T);
  const dim3 grid(static_cast<unsigned>(p.pb.B * p.pb.H), static_cast<unsigned>((p.pb.Sq + C::kBQ - 1) / C::kBQ));
  ff::simt::launch(fwd_kernel<T, DP>, grid, dim3(kThreads), smem, stream, p);
}

// delta: (B, H, Sq) float32 scratch. dq_acc: (B, H, Sq, D) float32 scratch (need not be zeroed);
// unused (may be null) when p.deterministic.
template <typename T, int DP>
void launch_bwd(const BwdParams& p, float* delta, float* dq_acc, cudaStream_t stream) {
  using C = Tiles<DP>;
  const Problem& pb = p.pb;
  float* acc = p.deterministic ? nullptr : dq_acc;
  const int64_t rows = pb.B * pb.H * pb.Sq;
  ff::simt::launch(bwd_delta_kernel<T>, dim3(static_cast<unsigned>((rows + 3) / 4)), dim3(kThreads), 0, stream, p,
                   delta, acc);
  const size_t smem = static_cast<size_t>(2 * C::kBKb + 2 * C::kBQb) * C::kLd * sizeof(T) +
                      static_cast<size_t>(C::kBKb) * C::kLdS * sizeof(T) + 2 * C::kBQb * sizeof(float);
  const dim3 grid(static_cast<unsigned>(pb.B * pb.Hk), static_cast<unsigned>((pb.Sk + C::kBKb - 1) / C::kBKb));
  ff::simt::launch(bwd_kernel<T, DP>, grid, dim3(kThreads), smem, stream, p, static_cast<const float*>(delta), acc);
  if (p.deterministic) {
    const size_t smem_dq = static_cast<size_t>(2 * C::kBQ + 4 * C::kBK) * C::kLd * sizeof(T);
    const dim3 grid_dq(static_cast<unsigned>(pb.B * pb.H), static_cast<unsigned>((pb.Sq + C::kBQ - 1) / C::kBQ));
    ff::simt::launch(bwd_dq_kernel<T, DP>, grid_dq, dim3(kThreads), smem_dq, stream, p,
                     static_cast<const float*>(delta));
  } else {
    const int64_t pairs = rows * pb.D / 2;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((pairs + kThreads - 1) / kThreads, 4096));
    ff::simt::launch(dq_convert_kernel<T>, dim3(blocks), dim3(kThreads), 0, stream, p,
                     static_cast<const float*>(acc));
  }
}

// The launchers for the bucket of max(D, Dv) (the caller has checked it is at most 256).
template <typename T>
void launch_fwd_any(const FwdParams& p, cudaStream_t stream) {
  switch (head_dim_bucket(p.pb.D > p.pb.Dv ? p.pb.D : p.pb.Dv)) {
    case 64: return launch_fwd<T, 64>(p, stream);
    case 128: return launch_fwd<T, 128>(p, stream);
    default: return launch_fwd<T, 256>(p, stream);
  }
}

template <typename T>
void launch_bwd_any(const BwdParams& p, float* delta, float* dq_acc, cudaStream_t stream) {
  switch (head_dim_bucket(p.pb.D > p.pb.Dv ? p.pb.D : p.pb.Dv)) {
    case 64: return launch_bwd<T, 64>(p, delta, dq_acc, stream);
    case 128: return launch_bwd<T, 128>(p, delta, dq_acc, stream);
    default: return launch_bwd<T, 256>(p, delta, dq_acc, stream);
  }
}

}  // namespace ff::attention::gpu
