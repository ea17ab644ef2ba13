// attention on CUDA GPUs: the forward kernel (fwd_kernel). What it computes, its tiles and its
// launch are described in attention_cuda.cuh, which includes this file beside the backward kernels
// and the launchers. simt.cuh only (through the headers below), so it runs on the host emulator too.
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "attention/attention.h"
#include "attention/attention_cuda_scores.cuh"
#include "attention/attention_cuda_tiles.cuh"

namespace ff::attention::gpu {

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
template <typename T, int DP, bool kDropout, TilePath kPath = TilePath::kAuto>
__global__ void __launch_bounds__(32 * Tiles<DP>::kFwdWarps) fwd_kernel(const FwdParams p) {
  using C = Tiles<DP>;
  constexpr int LD = C::kLd, BQ = C::kBQf, BK = C::kBK, NT = BK / 8, NO = DP / 8;
  constexpr int NTHREADS = 32 * C::kFwdWarps;
  constexpr bool kQInRegs = C::kFwdQInRegs;
  FF_DYNAMIC_SMEM(T, smem);
  T* sK = smem;              // 2 buffers of BK rows
  T* sV = sK + 2 * BK * LD;  // 2 buffers of BK rows
  T* sQ = sV + 2 * BK * LD;  // then the Q tile at DP 256, else the mask tile (Tiles::fwd_smem)
  char* sMask = reinterpret_cast<char*>(sQ);
  int* scratch = reinterpret_cast<int*>(sK + DP);  // key_range's ints: the pad of K's row 0 (never copied)
  const Problem& pb = p.pb;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int Sq = static_cast<int>(pb.Sq), Sk = static_cast<int>(pb.Sk);
  const int D = static_cast<int>(pb.D), Dv = static_cast<int>(pb.Dv);
  const QueryTile tile = query_tile(pb, BQ);
  const int q0 = tile.q0;
  const int64_t bh = tile.bh, b = tile.b, h = tile.h, hk = tile.hk;
  const T* Q = static_cast<const T*>(pb.q.ptr) + b * pb.q.stride_b + h * pb.q.stride_h + q0 * pb.q.stride_s;
  const T* K = static_cast<const T*>(pb.k.ptr) + b * pb.k.stride_b + hk * pb.k.stride_h;
  const T* V = static_cast<const T*>(pb.v.ptr) + b * pb.v.stride_b + hk * pb.v.stride_h;
  const Slice sl = make_slice(pb, b, h);
  const int row_w = warp * 16;
  const int rows[2] = {q0 + row_w + g, q0 + row_w + g + 8};

  // The warp's Q rows as mma A fragments (DP <= 128: read once, straight from global memory; at
  // DP = 256 they would take 64 more registers, so that bucket reads them from shared memory per
  // key tile).
  uint32_t qf[kQInRegs ? DP / 16 : 1][4];
  if constexpr (kQInRegs) {
    load_a_frags(qf, Q + row_w * pb.q.stride_s, pb.q.stride_s, Sq - q0 - row_w, D, lane);
  } else {
    load_tile_async<BQ, DP, NTHREADS>(sQ, Q, pb.q.stride_s, Sq - q0, D);  // in K(0)'s group
  }
  // The attn_mask tile (DP <= 128), in the space Q's tile would take; this warp copies and reads
  // its own 16 rows: mrow[r] is row rows[r] of the tile. At DP 128 the launch may leave it out
  // (FwdParams::mask_tile: a float32 mask's 128 rows over sm_86 / sm_89's limit); the mask is then
  // read from global memory, as at DP 256.
#ifdef FF_ATTENTION_COUNT_MASK_TILE  // scripts/attention_sass.py: the static count of the tiled case alone
  constexpr bool kMaskFallback = false;
#else
  constexpr bool kMaskFallback = C::kFwdMaskOptional;
#endif
  const bool mask_tiled = kQInRegs && sl.mask && (!kMaskFallback || p.mask_tile);
  const MaskTile mt = make_mask_tile(sl, sMask, BK);
  const char* mrow[2] = {mt.row(row_w, g), mt.row(row_w, g + 8)};
  auto mask_fill = [&](int it) {
    if (mask_tiled) mt.fill<BK>(sl, q0, it * BK, row_w, 16, 0, lane);
    ff::simt::cp_async_commit();
  };

  const KeyTiles kt = key_tiles(pb, key_range(sl.pad, Sk, scratch), q0, BQ, BK);
  if (kt.ntiles > 0) {  // K(0) (and Q at DP 256), V(0), M(0)
    load_tile_async<BK, DP, NTHREADS>(sK, K, pb.k.stride_s, Sk, D);
    ff::simt::cp_async_commit();
    load_tile_async<BK, DP, NTHREADS>(sV, V, pb.v.stride_s, Sk, Dv);
    ff::simt::cp_async_commit();
    mask_fill(0);
  }
  const bool shared = shared_draws(pb);

  float acc[NO][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  for (int it = 0; it < kt.ntiles; ++it) {
    const int k0 = it * BK;
    const bool last = it + 1 == kt.ntiles;
    kv_prefetch<BK, DP, NTHREADS>(sK, sV, K, V, pb, it, kt.ntiles);
    pipe_wait<Copy::kK>(last);
    const T* cK = sK + (it & 1) * BK * LD;
    const T* cV = sV + (it & 1) * BK * LD;

    float s[NT][4] = {};
    if constexpr (kQInRegs) {
      mma_abt<T, NT, DP / 16, LD>(s, qf, cK, D, lane);
    } else {
      mma_abt<T, NT, DP, LD, LD>(s, sQ, row_w, cK, D, lane);
    }

    // Scores in log2 units: the plain path only scales; the general one masks (attention.h), with
    // attn_mask from the tile (DP <= 128) or from global memory.
    const bool plain = plain_tile<kPath>(k0 + BK <= kt.plain_end);
    if (plain) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] *= sl.scale_log2;
      }
    } else {
      if (mask_tiled) pipe_wait<Copy::kMask>(last);
      auto general = [&](auto tiled) {  // attn_mask from the tile, or from global memory
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = e >> 1, c = nt * 8 + 2 * t + (e & 1);
            if constexpr (decltype(tiled)::value) {
              s[nt][e] = sl.score(rows[r], k0 + c, s[nt][e], [&] { return mask_value(mrow[r], c, sl.mask_kind); });
            } else {
              s[nt][e] = sl.score(rows[r], k0 + c, s[nt][e]);
            }
          }
        }
      };
      if constexpr (kQInRegs && !kMaskFallback) {
        general(std::true_type{});
      } else if constexpr (!kQInRegs) {
        general(std::false_type{});
      } else if (mask_tiled) {
        general(std::true_type{});
      } else {
        general(std::false_type{});
      }
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
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
    }
    if constexpr (kDropout) {  // P *= z after the statistics (l is not dropped); 1 / (1 - p) at the end
      const uint64_t base0 = static_cast<uint64_t>(bh * Sq + rows[0]) * Sk;
      const uint64_t base1 = static_cast<uint64_t>(bh * Sq + rows[1]) * Sk;
#pragma unroll
      for (int nt = 0; nt < NT; nt += 2) {
        bool keep[8];
        dropout_row_octs(pb.dropout, base0, base1, k0 + nt * 8 + 2 * t, t, shared, keep);
#pragma unroll
        for (int e = 0; e < 8; ++e) s[nt + (e >> 2)][e & 3] = keep[e] ? s[nt + (e >> 2)][e & 3] : 0.f;
      }
    }

    pipe_wait<Copy::kV>(last);
    if (!last) {  // this warp has read M(it): its rows of M(it + 1) (a mask puts every tile on the general path)
      if (plain) {
        ff::simt::cp_async_commit();
      } else {
        mask_fill(it + 1);
      }
    }
    mma_cb<T, NO, NT, LD>(acc, s, cV, Dv, lane);
    __syncthreads();  // the K / V buffer is refilled by the next iteration's prefetch
  }
  ff::simt::cp_async_commit();  // every copy retired before the exit (Q at DP 256 when every key is hidden)
  ff::simt::cp_async_wait<0>();

  T* out = static_cast<T*>(p.out.ptr) + b * p.out.stride_b + h * p.out.stride_h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const int i = rows[r];
    if (i >= Sq) continue;
    const float inv = l[r] > 0.f ? (kDropout ? pb.dropout.scale : 1.f) / l[r] : 0.f;
    T* orow = out + i * p.out.stride_s;
#pragma unroll
    for (int no = 0; no < NO; ++no) {
      const int c = no * 8 + 2 * t;
      if (c < Dv) store_pair(orow + c, acc[no][2 * r] * inv, acc[no][2 * r + 1] * inv);
    }
    if (t == 0) p.lse[bh * Sq + i] = l[r] > 0.f ? (m[r] + log2f(l[r])) * kLn2 : -INFINITY;
  }
}

}  // namespace ff::attention::gpu
