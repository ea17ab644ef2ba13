// attention on CUDA GPUs (sm_80+): FlashAttention-2-style forward and backward on tensor cores
// (mma.sync m16n8k16, ldmatrix, cp.async), written against simt/simt.cuh only, so the same
// templates run on the host emulator (tests/emu) and on the GPU. The math is in attention.h. This
// file holds the backward kernels and the launchers; the forward kernel is attention_cuda_fwd.cuh,
// what the kernels do to scores attention_cuda_scores.cuh, their tile machinery
// attention_cuda_tiles.cuh and their shared-memory sizes attention_cuda_config.h.
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
// What varies per call, and what it costs. Dropout is a template parameter (the Philox draws and
// their registers exist only in the dropout instantiations). Causal masking, key padding, an
// attn_mask and the key bound are decided per key tile, uniformly for the CTA (TilePath): a tile
// nothing can hide takes the plain path, whose scores are only scaled; the tiles the causal
// diagonal, a padding boundary, an attn_mask or the last partial key tile cut take the general path
// (attention.h's masked_score per element, attn_mask from a tile in shared memory: MaskTile, in
// attention_cuda_scores.cuh, copied beside K with cp.async). Key padding is read once per CTA as a key range
// (KeyRange: keys past the last unpadded one are never visited; keys before the first padded one
// are plain), so right padding costs one general tile per row and saves the tiles past its length.
// scripts/attention_sass.py counts each path's instructions (docs/cuda_kernels.md).
//
// Forward (fwd_kernel): one CTA per (query tile, batch * head), 4 warps and 64 query rows (8 warps
// and 128 rows at DP = 128, below); warp w owns rows 16w..16w+15 of the tile. Grid: query tiles fastest, so the CTAs that run together read one
// head's K / V (L2 reuse), and under causal masking the longest rows first. Up to DP = 128 each
// warp reads its Q rows once, straight from global memory into mma fragments kept in registers
// (that shared memory holds the mask tile); DP = 256 copies the Q tile to shared memory. K / V
// tiles of BK keys (64, or 32 for DP = 256) are double-buffered, K, V and the mask tile in separate
// cp.async groups: tile j + 1 is in flight while tile j is computed, Q K^T waits for K(j) only and
// the scores for the mask tile. Per tile:
//   S = Q K^T                      mma, float32 accumulators (16 x BK per warp)
//   scores in log2 units           plain: s * scale * log2(e); general: + attn_mask * log2(e),
//                                  -inf where causal, key padding or out of range
//   online softmax                 row max / sum over the 4 lanes of a quad (__shfl_xor_sync),
//                                  exp2f, rescale of the accumulator by exp2(m_old - m_new)
//   dropout                        P *= keep after the statistics (l is not dropped); a quad's
//                                  four lanes share the Philox blocks of two n-tiles' keys, one
//                                  call per 8 scores (dropout_row_octs); 1 / (1 - p) is applied
//                                  with 1 / l
//   O += P V                       P rounded to 16 bits in registers and used directly as the A
//                                  operand (the C-fragment -> A-fragment identity), V via
//                                  ldmatrix .trans
// Key tiles past the last visible key (causal: right of the tile's last row; padding: past the
// row's last unpadded key) are never loaded. At the end out = acc / l (0 for a fully masked row)
// and lse = (m + log2 l) ln 2 (-inf for a fully masked row).
// Each warp owns 16 query rows: 32 rows a warp would put the DP = 128 accumulators alone at 128
// registers a thread, and the kernel spills. A CTA has 4 warps (64 rows), but 8 (128 rows) at
// DP = 128, where the registers hold an SM to 8 warps either way and the larger CTA copies each
// K / V tile once for twice the rows (Tiles::kFwdWarps).
//
// Backward, three launches (FlashAttention-2):
//   bwd_delta_kernel   delta_i = dO_i . O_i (float32, (B, H, Sq)), one warp per row; it also
//                      zeroes the row of the float32 dQ accumulator.
//   bwd_kernel         one CTA per (64 keys, batch * kv head), key tiles fastest in the grid;
//                      warp w owns keys 16w..16w+15 and keeps dK / dV for them in registers. K / V
//                      are loaded once; the CTA loops over the query heads of the GQA group and
//                      the query tiles of BQb rows (64 for DP = 64, else 32: register budget), so
//                      dK / dV need no atomics:
//                        S^T = K Q^T, P^T = exp2(S^T - lse)      (recomputed from the saved lse)
//                        dP^T = V dO^T, dropout: PK = P keep, dP *= z (eight lanes share
//                        the Philox blocks of two n-tiles, one call per 8 scores:
//                        dropout_col_octs)
//                        dS^T = P^T (dP^T - delta)
//                        dV += PK^T-as-A-operand x dO,  dK += dS^T x Q  (register reuse again)
//                        dQ += dS K: dS^T goes to shared memory (16-bit), all 4 warps share the
//                        (BQb x D) product in 16 x 16 blocks and atomicAdd into the accumulator.
//                      Causal: query tiles entirely above the key tile's first key are skipped;
//                      a key tile that padding hides entirely skips every query tile (dK = dV = 0).
//                      At DP = 256 dK and dV together would need 256 registers a thread: the
//                      query steps run twice, accumulating dV (no dP^T, dS^T, dQ), then dK, in the
//                      same registers (Tiles::kBwdTwoPasses).
//   dq_convert_kernel  dq = scale * accumulator, in q's dtype and dq's strides.
// Deterministic mode (BwdParams::deterministic): bwd_kernel skips dQ and bwd_dq_kernel computes
// it per (64 query rows, batch * head), looping over the key tiles like the forward (recompute
// S, P, dP, dS; dQ += dS K in registers): no atomics, bitwise reproducible.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "attention/attention.h"
#include "attention/attention_cuda_fwd.cuh"
#include "attention/attention_cuda_scores.cuh"
#include "attention/attention_cuda_tiles.cuh"

namespace ff::attention::gpu {

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
  for (int64_t c = lane; c < pb.Dv; c += 32) s += to_float(dO[c]) * to_float(O[c]);
  s = warp_sum(s);
  if (lane == 0) delta[row] = s;
  if (dq_acc) {
    for (int64_t c = lane; c < pb.D; c += 32) dq_acc[row * pb.D + c] = 0.f;
  }
}

// dK / dV of one key tile (and, with dq_acc, the atomic dQ contributions); see the header.
template <typename T, int DP, bool kDropout, TilePath kPath = TilePath::kAuto>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const BwdParams p, const float* delta, float* dq_acc) {
  using C = Tiles<DP>;
  constexpr int LD = C::kLd, BKb = C::kBKb, BQb = C::kBQb, LDS = C::kLdS, NQ = BQb / 8, NO = DP / 8;
  FF_DYNAMIC_SMEM(T, smem);
  T* sK = smem;
  T* sV = sK + BKb * LD;
  T* sQ = sV + BKb * LD;  // NBUF buffers of (Q, dO), BQb rows each
  T* sdS = sQ + 2 * C::kQBufs * BQb * LD;  // dS^T, (keys, queries)
  float* sLse = reinterpret_cast<float*>(sdS + BKb * LDS);
  float* sDelta = sLse + BQb;
  char* sMask = reinterpret_cast<char*>(sDelta + BQb);  // the mask tile, (queries, keys) (Tiles::bwd_smem)
  int* scratch = reinterpret_cast<int*>(sQ + DP);  // key_range's ints: the pad of Q's row 0 (never copied)
  const Problem& pb = p.pb;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int Sq = static_cast<int>(pb.Sq), Sk = static_cast<int>(pb.Sk);
  const int D = static_cast<int>(pb.D), Dv = static_cast<int>(pb.Dv);
  // Grid: key tiles fastest (the CTAs running together share one head's Q / dO in L2); under
  // causal masking the first key tiles, which see the most queries, come first anyway.
  const int nk = (Sk + BKb - 1) / BKb;
  const int64_t bhk = blockIdx.x / nk, b = bhk / pb.Hk, hk = bhk % pb.Hk, group = pb.H / pb.Hk;
  const int k0 = static_cast<int>(blockIdx.x % nk) * BKb;
  const T* K = static_cast<const T*>(pb.k.ptr) + b * pb.k.stride_b + hk * pb.k.stride_h + k0 * pb.k.stride_s;
  const T* V = static_cast<const T*>(pb.v.ptr) + b * pb.v.stride_b + hk * pb.v.stride_h + k0 * pb.v.stride_s;
  load_tile_async<BKb, DP>(sK, K, pb.k.stride_s, Sk - k0, D);
  load_tile_async<BKb, DP>(sV, V, pb.v.stride_s, Sk - k0, Dv);
  ff::simt::cp_async_commit();

  // This CTA's keys under key padding: all hidden (dK = dV = 0, nothing to compute), or none.
  const int nkeys = Sk - k0 < BKb ? Sk - k0 : BKb;
  const KeyRange kr = key_range(pb.key_padding ? pb.key_padding + b * Sk + k0 : nullptr, nkeys, scratch);
  const bool keys_plain = !pb.mask.ptr && kr.clean == BKb;  // every key of the tile exists, none padded
  const bool shared = shared_draws(pb);

  // dK and dV of the warp's keys in float32 registers. With two passes (DP 256: both would need
  // 256 registers a thread) the first pass accumulates dV in dk and stores it, the second dK.
  constexpr bool kTwoPasses = C::kBwdTwoPasses;
  float dk[NO][4] = {}, dv[kTwoPasses ? 1 : NO][4] = {};
  const int key_w = warp * 16;
  const int key0 = k0 + key_w + g;  // this lane's keys: key0 and key0 + 8
  const int q_first = pb.causal ? (k0 / BQb) * BQb : 0;  // earlier rows see none of these keys
  const int q_end = kr.end > 0 ? Sq : q_first;           // no visible key: no query step

  // The query steps: every query tile of every query head of the GQA group. Q / dO of step s sit in
  // buffer s % NBUF; with two buffers (DP <= 128) step s + 1's copies are in flight while step s
  // computes. At DP = 256 a second buffer would cost the second CTA per SM (137 KiB of smem).
  // The attn_mask tile of step s (single-buffered) is copied by the warps, each its own 16 key
  // columns: with two buffers once the warp has read step s - 1's (its own cp.async group, waited
  // with Q / dO(s)), with one together with Q / dO(s).
  constexpr int NBUF = C::kQBufs;
  const int nsteps = (q_end - q_first + BQb - 1) / BQb, total = static_cast<int>(group) * nsteps;
  struct Step {
    int64_t h;  // query head
    int q0;     // first query row
  };
  auto next_of = [&](Step s) {  // steps go over the query tiles of a head, then to the next head
    return s.q0 + BQb < q_end ? Step{s.h, s.q0 + BQb} : Step{s.h + 1, q_first};
  };
  auto issue = [&](Step s, int step) {  // Q / dO of a step into buffer step % NBUF (not committed)
    const int buf = step % NBUF;
    const T* Qh = static_cast<const T*>(pb.q.ptr) + b * pb.q.stride_b + s.h * pb.q.stride_h;
    const T* dOh = static_cast<const T*>(p.dout.ptr) + b * p.dout.stride_b + s.h * p.dout.stride_h;
    load_tile_async<BQb, DP>(sQ + buf * 2 * BQb * LD, Qh + s.q0 * pb.q.stride_s, pb.q.stride_s, Sq - s.q0, D);
    load_tile_async<BQb, DP>(sQ + (buf * 2 + 1) * BQb * LD, dOh + s.q0 * p.dout.stride_s, p.dout.stride_s,
                             Sq - s.q0, Dv);
  };
  auto mask_fill = [&](Step s) {  // this warp's columns of a step's mask tile (not committed)
    if (!pb.mask.ptr) return;
    const Slice sl = make_slice(pb, b, s.h);
    make_mask_tile(sl, sMask, BKb).fill<16>(sl, s.q0, k0, 0, BQb, key_w, lane);
  };
  // A mask puts every query tile on the general path, the only one that reads the mask tile.
  auto plain_step = [&](int q0) { return plain_tile<kPath>(keys_plain && (!pb.causal || k0 + BKb <= q0 + 1)); };
  const Step first{hk * group, q_first};
  if constexpr (NBUF == 2) {
    if (total > 0) {  // Q / dO(0), then M(0)
      issue(first, 0);
      ff::simt::cp_async_commit();
      if (!plain_step(first.q0)) mask_fill(first);
      ff::simt::cp_async_commit();
    }
  }

  const float zs = kDropout ? pb.dropout.scale : 1.f;  // dV = 1 / (1 - p) sum (P keep)^T dO
  auto store = [&](const Strided4& out, const float (&acc)[NO][4], float factor, int ncols) {  // this lane's keys
    T* dst = static_cast<T*>(out.ptr) + b * out.stride_b + hk * out.stride_h;
    const int64_t stride = out.stride_s;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int j = key0 + 8 * r;
      if (j >= Sk) continue;
#pragma unroll
      for (int no = 0; no < NO; ++no) {
        const int c = no * 8 + 2 * t;
        if (c < ncols) store_pair(dst + j * stride + c, acc[no][2 * r] * factor, acc[no][2 * r + 1] * factor);
      }
    }
  };

  // One pass over the query steps, or two: dV (P^T only: no dP^T, dS^T, dK, dQ), then dK.
  static_assert(!kTwoPasses || NBUF == 1, "bwd_kernel: two passes prefetch no query step across passes");
#pragma unroll 1
  for (int pass = 0; pass < (kTwoPasses ? 2 : 1); ++pass) {
    const bool dv_pass = kTwoPasses && pass == 0;
    Step cur = first;
    for (int step = 0; step < total; ++step) {
      const int64_t h = cur.h;
      const int q0 = cur.q0;
      const Step next = next_of(cur);
      const bool plain = plain_step(q0);
      const Slice sl = make_slice(pb, b, h);
      const int64_t bh = b * pb.H + h;
      const uint64_t base = static_cast<uint64_t>(bh) * Sq * Sk;
      {
        __syncthreads();  // the previous step is done with its Q / dO buffer, sdS, sLse, sDelta
        const bool more = NBUF == 2 && step + 1 < total;
        if (more) {
          issue(next, step + 1);
          ff::simt::cp_async_commit();
        } else if (NBUF == 1) {
          issue(cur, step);
          if (!plain) mask_fill(cur);
          ff::simt::cp_async_commit();
        }
        for (int r = threadIdx.x; r < BQb; r += kThreads) {
          const int i = q0 + r;
          sLse[r] = i < Sq ? p.lse[bh * Sq + i] * kLog2e : INFINITY;  // rows past Sq: P = 0 on both paths
          sDelta[r] = i < Sq ? delta[bh * Sq + i] : 0.f;
        }
        if (more) {  // in flight: Q / dO(step + 1)
          ff::simt::cp_async_wait<1>();
        } else {
          ff::simt::cp_async_wait<0>();
        }
        __syncthreads();
        const MaskTile mt = make_mask_tile(sl, sMask, BKb);
        const T* cQ = sQ + (step % NBUF) * 2 * BQb * LD;
        const T* cdO = cQ + BQb * LD;

        // Dropout keeps: with two passes the step's keep bits (bit 4 nt + e), drawn before S^T and
        // dP^T take their registers (the DP 256 kernel has none to spare); else per n-tile, below.
        [[maybe_unused]] uint32_t keep_bits = ~0u;
        if constexpr (kDropout && kTwoPasses) {
          static_assert(NQ * 4 <= 32, "bwd_kernel: a step's keep bits fit 32 bits");
          // Not unrolled: two draws interleaved beside the dK accumulators put sm_80 at 255
          // registers and a stack frame (check_cubins.py); one at a time, 245 and none.
#pragma unroll 1
          for (int nt = 0; nt < NQ; nt += 2) {
            keep_bits &= ~(static_cast<uint32_t>(~dropout_col_octs(pb.dropout, base, Sk, q0 + nt * 8 + 2 * t, key0,
                                                                     lane, shared) & 0xFFu) << (4 * nt));
          }
        }
        float st[NQ][4] = {};   // S^T, then P^T z
        float dpt[NQ][4] = {};  // dP^T, then dS^T (in the dV pass of two, P^T z)
        mma_abt<T, NQ, DP, LD, LD>(st, sK, key_w, cQ, D, lane);
        if (!dv_pass) mma_abt<T, NQ, DP, LD, LD>(dpt, sV, key_w, cdO, Dv, lane);
        // P^T from the saved lse: plain tiles only scale, the general path masks (attention.h).
        auto probabilities = [&](auto plain) {
          [[maybe_unused]] uint32_t keep8 = 0;  // tiles nt and nt + 1 (bit 4 u + e of tile nt + u), drawn at even nt
#pragma unroll
          for (int nt = 0; nt < NQ; ++nt) {
            if constexpr (kDropout && !kTwoPasses) {
              if (nt % 2 == 0) keep8 = dropout_col_octs(pb.dropout, base, Sk, q0 + nt * 8 + 2 * t, key0, lane, shared);
            }
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int ii = nt * 8 + 2 * t + (e & 1);
              const float lse2 = sLse[ii];
              float pr;
              if constexpr (decltype(plain)::value) {
                pr = exp2f(st[nt][e] * sl.scale_log2 - lse2);
              } else {
                const int c = key_w + g + 8 * (e >> 1);
                const float x =
                    sl.score(q0 + ii, k0 + c, st[nt][e], [&] { return mask_value(mt.row(0, ii), c, sl.mask_kind); });
                pr = lse2 == -INFINITY ? 0.f : exp2f(x - lse2);
              }
              float dp = dpt[nt][e], pz = pr;
              if constexpr (kDropout) {  // dV's 1 / (1 - p) at the end
                const bool kept = (kTwoPasses ? keep_bits >> (4 * nt + e) : keep8 >> (4 * (nt % 2) + e)) & 1u;
                pz = kept ? pr : 0.f;
                dp = kept ? dp * pb.dropout.scale : 0.f;
              }
              st[nt][e] = pz;
              dpt[nt][e] = dv_pass ? pz : pr * (dp - sDelta[ii]);
            }
          }
        };
        if (plain) {
          probabilities(std::true_type{});
        } else {
          probabilities(std::false_type{});
        }
        if constexpr (!kTwoPasses) mma_cb<T, NO, NQ, LD>(dv, st, cdO, Dv, lane);  // dV += (P z)^T dO
        // dS^T (in the dV pass P^T z) rounded to T once: the A operand of dK += dS^T Q (of dV += (P z)^T
        // dO) and, with atomics, the tile the dQ product reads.
        uint32_t ds[NQ / 2][4];
        pack_a<T>(ds, dpt);
        if (dq_acc && !dv_pass) {
#pragma unroll
          for (int nt = 0; nt < NQ; ++nt) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              uint32_t* dst = reinterpret_cast<uint32_t*>(sdS + (key_w + g + 8 * r) * LDS + nt * 8 + 2 * t);
              *dst = ds[nt / 2][2 * (nt & 1) + r];
            }
          }
        }
        mma_ab<T, NO, NQ / 2, LD>(dk, ds, dv_pass ? cdO : cQ, dv_pass ? Dv : D, lane);  // dK scaled at the end
        if (more) {  // this warp has read M(step): its columns of M(step + 1)
          if (!plain) mask_fill(next);
          ff::simt::cp_async_commit();
        }
        if (dq_acc && !dv_pass) {
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
      cur = next;
    }
    if (dv_pass) {  // dV done: store it, and dk starts again for dK
      store(p.dv, dk, zs, Dv);
#pragma unroll
      for (int no = 0; no < NO; ++no) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[no][e] = 0.f;
      }
    }
  }

  ff::simt::cp_async_wait<0>();  // K / V are still in flight when no query row sees this key tile

  store(p.dk, dk, pb.scale, D);
  if constexpr (!kTwoPasses) store(p.dv, dv, zs, Dv);
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

// Deterministic dQ: one CTA per (64 query rows, batch * head), looping over the key tiles like the
// forward (same grid order, key range, tile paths and K / V pipeline).
// (__launch_bounds__ with one CTA per SM: with the plain bound, ptxas capped the sm_80 dropout
// instantiation at DP 64 at 168 registers and spilled 4 bytes; it takes 179 without a spill.)
template <typename T, int DP, bool kDropout, TilePath kPath = TilePath::kAuto>
__global__ void __launch_bounds__(kThreads, 1) bwd_dq_kernel(const BwdParams p, const float* delta) {
  using C = Tiles<DP>;
  constexpr int LD = C::kLd, BQ = C::kBQ, BK = C::kBK, NT = BK / 8, NO = DP / 8;
  FF_DYNAMIC_SMEM(T, smem);
  T* sQ = smem;
  T* sdO = sQ + BQ * LD;
  T* sK = sdO + BQ * LD;     // 2 buffers of BK rows
  T* sV = sK + 2 * BK * LD;  // 2 buffers of BK rows
  char* sMask = reinterpret_cast<char*>(sV + 2 * BK * LD);  // the mask tile (Tiles::dq_smem)
  int* scratch = reinterpret_cast<int*>(sQ + DP);  // key_range's ints: the pad of Q's row 0 (never copied)
  const Problem& pb = p.pb;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int Sq = static_cast<int>(pb.Sq), Sk = static_cast<int>(pb.Sk);
  const int D = static_cast<int>(pb.D), Dv = static_cast<int>(pb.Dv);
  const QueryTile tile = query_tile(pb, BQ);
  const int q0 = tile.q0;
  const int64_t bh = tile.bh, b = tile.b, h = tile.h, hk = tile.hk;
  const T* Q = static_cast<const T*>(pb.q.ptr) + b * pb.q.stride_b + h * pb.q.stride_h + q0 * pb.q.stride_s;
  const T* dO = static_cast<const T*>(p.dout.ptr) + b * p.dout.stride_b + h * p.dout.stride_h +
                q0 * p.dout.stride_s;
  const T* K = static_cast<const T*>(pb.k.ptr) + b * pb.k.stride_b + hk * pb.k.stride_h;
  const T* V = static_cast<const T*>(pb.v.ptr) + b * pb.v.stride_b + hk * pb.v.stride_h;
  const Slice sl = make_slice(pb, b, h);

  const int row_w = warp * 16;
  const int rows[2] = {q0 + row_w + g, q0 + row_w + g + 8};
  // The attn_mask tile: this warp copies and reads its own 16 rows (mrow[r]: row rows[r]).
  const MaskTile mt = make_mask_tile(sl, sMask, BK);
  const char* mrow[2] = {mt.row(row_w, g), mt.row(row_w, g + 8)};
  auto mask_fill = [&](int it) {
    if (sl.mask) mt.fill<BK>(sl, q0, it * BK, row_w, 16, 0, lane);
    ff::simt::cp_async_commit();
  };

  load_tile_async<BQ, DP>(sQ, Q, pb.q.stride_s, Sq - q0, D);
  load_tile_async<BQ, DP>(sdO, dO, p.dout.stride_s, Sq - q0, Dv);
  const KeyTiles kt = key_tiles(pb, key_range(sl.pad, Sk, scratch), q0, BQ, BK);
  if (kt.ntiles > 0) {  // Q, dO and K(0) one group, then V(0), M(0)
    load_tile_async<BK, DP>(sK, K, pb.k.stride_s, Sk, D);
    ff::simt::cp_async_commit();
    load_tile_async<BK, DP>(sV, V, pb.v.stride_s, Sk, Dv);
    ff::simt::cp_async_commit();
    mask_fill(0);
  }
  const bool shared = shared_draws(pb);

  float lse2[2], dlt[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool in = rows[r] < Sq;
    lse2[r] = in ? p.lse[bh * Sq + rows[r]] * kLog2e : INFINITY;  // rows past Sq: P = 0 on both paths
    dlt[r] = in ? delta[bh * Sq + rows[r]] : 0.f;
  }
  float dq[NO][4] = {};

  for (int it = 0; it < kt.ntiles; ++it) {
    const int k0 = it * BK;
    const bool last = it + 1 == kt.ntiles;
    kv_prefetch<BK, DP>(sK, sV, K, V, pb, it, kt.ntiles);
    pipe_wait<Copy::kK>(last);
    const T* cK = sK + (it & 1) * BK * LD;
    const T* cV = sV + (it & 1) * BK * LD;

    float s[NT][4] = {}, dp[NT][4] = {};
    mma_abt<T, NT, DP, LD, LD>(s, sQ, row_w, cK, D, lane);
    pipe_wait<Copy::kV>(last);
    mma_abt<T, NT, DP, LD, LD>(dp, sdO, row_w, cV, Dv, lane);
    const uint64_t base0 = static_cast<uint64_t>(bh * Sq + rows[0]) * Sk;
    const uint64_t base1 = static_cast<uint64_t>(bh * Sq + rows[1]) * Sk;
    auto grads = [&](auto plain) {  // s <- dS = P (dP z - delta)
      [[maybe_unused]] bool keep[8];  // tiles nt and nt + 1 (keep[4 u + e] of tile nt + u), drawn at even nt
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int j = k0 + nt * 8 + 2 * t;
        if constexpr (kDropout) {
          if (nt % 2 == 0) dropout_row_octs(pb.dropout, base0, base1, j, t, shared, keep);
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          float pr;
          if constexpr (decltype(plain)::value) {
            pr = exp2f(s[nt][e] * sl.scale_log2 - lse2[r]);
          } else {
            const int c = j - k0 + (e & 1);
            const float sc =
                sl.score(rows[r], k0 + c, s[nt][e], [&] { return mask_value(mrow[r], c, sl.mask_kind); });
            pr = lse2[r] == -INFINITY ? 0.f : exp2f(sc - lse2[r]);
          }
          const float dpz = kDropout ? (keep[4 * (nt % 2) + e] ? dp[nt][e] * pb.dropout.scale : 0.f) : dp[nt][e];
          s[nt][e] = pr * (dpz - dlt[r]);
        }
      }
    };
    if (plain_tile<kPath>(k0 + BK <= kt.plain_end)) {
      grads(std::true_type{});
      if (!last) ff::simt::cp_async_commit();
    } else {
      if (sl.mask) pipe_wait<Copy::kMask>(last);
      grads(std::false_type{});
      if (!last) mask_fill(it + 1);  // this warp has read M(it): its rows of M(it + 1)
    }
    mma_cb<T, NO, NT, LD>(dq, s, cK, D, lane);  // dQ += dS K
    __syncthreads();
  }
  ff::simt::cp_async_commit();  // every copy retired before the exit (Q, dO when every key is hidden)
  ff::simt::cp_async_wait<0>();

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
template <typename T, int DP, bool kDropout>
void launch_fwd(const FwdParams& p, cudaStream_t stream) {
  using C = Tiles<DP>;
  const size_t smem = C::fwd_smem(!C::kFwdMaskOptional || p.mask_tile ? mask_elem_bytes(p.pb) : 0);
  // One-dimensional grids: B H ceil(Sq / kBQf) CTAs stay far below 2^31 for any tensor that fits in
  // memory (attention_problem.cpp bounds Sq and Sk).
  const int64_t nq = (p.pb.Sq + C::kBQf - 1) / C::kBQf;
  ff::simt::launch(fwd_kernel<T, DP, kDropout>, dim3(static_cast<unsigned>(p.pb.B * p.pb.H * nq)),
                   dim3(32 * C::kFwdWarps), smem, stream, p);
}

// delta: (B, H, Sq) float32 scratch. dq_acc: (B, H, Sq, D) float32 scratch (need not be zeroed);
// unused (may be null) when p.deterministic.
template <typename T, int DP, bool kDropout>
void launch_bwd(const BwdParams& p, float* delta, float* dq_acc, cudaStream_t stream) {
  using C = Tiles<DP>;
  const Problem& pb = p.pb;
  float* acc = p.deterministic ? nullptr : dq_acc;
  const int64_t rows = pb.B * pb.H * pb.Sq;
  ff::simt::launch(bwd_delta_kernel<T>, dim3(static_cast<unsigned>((rows + 3) / 4)), dim3(kThreads), 0, stream, p,
                   delta, acc);
  const size_t smem = C::bwd_smem(mask_elem_bytes(pb));
  const int64_t nk = (pb.Sk + C::kBKb - 1) / C::kBKb;
  ff::simt::launch(bwd_kernel<T, DP, kDropout>, dim3(static_cast<unsigned>(pb.B * pb.Hk * nk)), dim3(kThreads), smem,
                   stream, p, static_cast<const float*>(delta), acc);
  if (p.deterministic) {
    const size_t smem_dq = C::dq_smem(mask_elem_bytes(pb));
    const int64_t nq = (pb.Sq + C::kBQ - 1) / C::kBQ;
    ff::simt::launch(bwd_dq_kernel<T, DP, kDropout>, dim3(static_cast<unsigned>(pb.B * pb.H * nq)), dim3(kThreads),
                     smem_dq, stream, p, static_cast<const float*>(delta));
  } else {
    const int64_t pairs = rows * pb.D / 2;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((pairs + kThreads - 1) / kThreads, 4096));
    ff::simt::launch(dq_convert_kernel<T>, dim3(blocks), dim3(kThreads), 0, stream, p,
                     static_cast<const float*>(acc));
  }
}

// The launchers for the bucket of max(D, Dv) (the caller has checked it is at most 256) and for
// dropout on or off.
template <typename T, int DP>
void launch_fwd_dp(const FwdParams& p, cudaStream_t stream) {
  if (p.pb.dropout.enabled) return launch_fwd<T, DP, true>(p, stream);
  launch_fwd<T, DP, false>(p, stream);
}

template <typename T>
void launch_fwd_any(const FwdParams& p, cudaStream_t stream) {
  switch (head_dim_bucket(p.pb.D > p.pb.Dv ? p.pb.D : p.pb.Dv)) {
    case 64: return launch_fwd_dp<T, 64>(p, stream);
    case 128: return launch_fwd_dp<T, 128>(p, stream);
    default: return launch_fwd_dp<T, 256>(p, stream);
  }
}

template <typename T, int DP>
void launch_bwd_dp(const BwdParams& p, float* delta, float* dq_acc, cudaStream_t stream) {
  if (p.pb.dropout.enabled) return launch_bwd<T, DP, true>(p, delta, dq_acc, stream);
  launch_bwd<T, DP, false>(p, delta, dq_acc, stream);
}

template <typename T>
void launch_bwd_any(const BwdParams& p, float* delta, float* dq_acc, cudaStream_t stream) {
  switch (head_dim_bucket(p.pb.D > p.pb.Dv ? p.pb.D : p.pb.Dv)) {
    case 64: return launch_bwd_dp<T, 64>(p, delta, dq_acc, stream);
    case 128: return launch_bwd_dp<T, 128>(p, delta, dq_acc, stream);
    default: return launch_bwd_dp<T, 256>(p, delta, dq_acc, stream);
  }
}

}  // namespace ff::attention::gpu
