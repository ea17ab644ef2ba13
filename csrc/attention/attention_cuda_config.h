// attention on CUDA: the tile sizes per head-dim bucket and the shared memory each kernel needs —
// plain C++, shared by the kernels (attention_cuda_tiles.cuh) and the host code that checks a
// launch fits the device (attention_cuda.cpp) and tells dispatch (attention_ops.cpp).
#pragma once
#include <cstddef>
#include <cstdint>

#include "attention/attention.h"

namespace ff::attention::gpu {

// The attn_mask tile of a (query tile, key tile): `rows` x `keys` mask values in the mask's own
// dtype (cp.async copies bytes: `elem` = 4 for float32, 2 for float16 / bfloat16), each row padded
// by 16 bytes like the other tiles. Single-buffered; no bytes without a mask (elem = 0).
constexpr int mask_ld(int keys, int elem) { return keys * elem + 16; }
constexpr size_t mask_tile_bytes(int rows, int keys, int elem) {
  return elem ? static_cast<size_t>(rows) * mask_ld(keys, elem) : 0;
}

// The attn_mask's element size, 0 without one: what the mask tile's shared memory depends on.
inline int mask_elem_bytes(const Problem& pb) {
  return pb.mask.ptr ? (pb.mask_dtype == c10::ScalarType::Float ? 4 : 2) : 0;
}

template <int DP>
struct Tiles {
  static constexpr int kLd = DP + 8;                 // smem row stride of a DP-wide tile
  static constexpr int kBQ = 64;                     // dq kernel: query rows per CTA
  // fwd kernel: warps per CTA, each owning 16 query rows. At DP 128 the registers (about 200-215 a
  // thread) hold an SM to 8 warps, two 4-warp CTAs or one of 8, so one 8-warp CTA of 128 rows keeps
  // the same warps per SM while each K / V tile it copies serves twice the query rows (half the
  // copies and half the K / V shared memory per SM). At DP 64 (about 160 registers, 3 CTAs of 4
  // warps) an 8-warp CTA would leave one per SM, 8 warps instead of 12; at DP 256 Q's tile sits in
  // shared memory and 128 rows of it would not fit sm_86 / sm_89's 99 KiB.
  static constexpr int kFwdWarps = DP == 128 ? 8 : 4;
  static constexpr int kBQf = 16 * kFwdWarps;        // fwd kernel: query rows per CTA
  static constexpr int kBK = DP == 256 ? 32 : 64;    // fwd / dq kernel: keys per pipelined tile
  static constexpr int kBKb = 64;                    // bwd: keys per CTA
  static constexpr int kBQb = DP == 64 ? 64 : 32;    // bwd: query rows per inner step
  static constexpr int kLdS = kBQb + 8;              // bwd: row stride of the dS^T tile
  static constexpr int kQBufs = DP <= 128 ? 2 : 1;   // bwd: Q / dO buffers (double-buffered up to DP 128)
  // bwd: at DP 256 the dK and dV accumulators would take 256 registers a thread: the dK / dV kernel
  // goes over the query steps twice, accumulating dV, then dK, in the same registers.
  static constexpr bool kBwdTwoPasses = DP == 256;

  // The forward keeps Q in registers up to DP 128 (read straight from global memory) and puts the
  // attn_mask tile where Q's tile would be; at DP 256 Q stays in shared memory and the mask is
  // read per score element from global memory (its 99 KiB are already sm_86 / sm_89's limit).
  static constexpr bool kFwdQInRegs = DP <= 128;
  // fwd kernel: the attn_mask tile may be left out (FwdParams::mask_tile; the mask is then read from
  // global memory): at DP 128, where a float32 mask's 128-row tile makes 102 KiB, over sm_86 /
  // sm_89's 99 KiB. At DP 64 the kernel always takes the tile (53 KiB at most); DP 256 has none.
  static constexpr bool kFwdMaskOptional = kFwdQInRegs && kFwdWarps == 8;

  // Dynamic shared memory in bytes (16-bit tiles) one CTA asks for, with an attn_mask of
  // `mask_elem` bytes per value (0: none); see attention_cuda.cuh's kernels.
  static constexpr size_t fwd_smem(int mask_elem) {  // 2 x K, 2 x V, then Q or the mask tile
    return static_cast<size_t>(4 * kBK) * kLd * 2 +
           (kFwdQInRegs ? mask_tile_bytes(kBQf, kBK, mask_elem) : static_cast<size_t>(kBQf) * kLd * 2);
  }
  static constexpr size_t bwd_smem(int mask_elem) {  // K, V, Q, dO, dS^T, lse, delta, the mask tile
    return static_cast<size_t>(2 * kBKb + 2 * kQBufs * kBQb) * kLd * 2 + static_cast<size_t>(kBKb) * kLdS * 2 +
           2 * kBQb * 4 + mask_tile_bytes(kBQb, kBKb, mask_elem);
  }
  static constexpr size_t dq_smem(int mask_elem) {   // Q, dO, 2 x K, 2 x V, the mask tile
    return static_cast<size_t>(2 * kBQ + 4 * kBK) * kLd * 2 + mask_tile_bytes(kBQ, kBK, mask_elem);
  }
};

// The padded head dim serving max(D, Dv), or 0 when it is too large.
inline int head_dim_bucket(int64_t d) { return d <= 64 ? 64 : d <= 128 ? 128 : d <= 256 ? 256 : 0; }

// The dynamic shared memory one CTA of the forward, or of the backward (its dK / dV kernel and,
// when deterministic, its dQ kernel), asks for at head dims D, Dv (<= 256) with an attn_mask of
// mask_elem bytes per value (0: none). The default, a float32 mask, is the most it ever asks for;
// dispatch compares the backward's with the device, and the forward's least (fwd_smem_least: the DP
// 128 forward leaves its mask tile out where the tile does not fit, FwdParams::mask_tile).
inline size_t fwd_smem_bytes(int64_t d, int64_t dv, int mask_elem = 4) {
  switch (head_dim_bucket(d > dv ? d : dv)) {
    case 64: return Tiles<64>::fwd_smem(mask_elem);
    case 128: return Tiles<128>::fwd_smem(mask_elem);
    default: return Tiles<256>::fwd_smem(mask_elem);
  }
}

// Whether the forward at head dims D, Dv may run without its mask tile (Tiles::kFwdMaskOptional).
inline bool fwd_mask_tile_optional(int64_t d, int64_t dv) {
  switch (head_dim_bucket(d > dv ? d : dv)) {
    case 64: return Tiles<64>::kFwdMaskOptional;
    case 128: return Tiles<128>::kFwdMaskOptional;
    default: return Tiles<256>::kFwdMaskOptional;
  }
}

// The least the forward asks for at head dims D, Dv with a mask of mask_elem bytes a value: without
// the mask tile where the kernel can do without it.
inline size_t fwd_smem_least(int64_t d, int64_t dv, int mask_elem = 4) {
  return fwd_smem_bytes(d, dv, fwd_mask_tile_optional(d, dv) ? 0 : mask_elem);
}

inline size_t bwd_smem_bytes(int64_t d, int64_t dv, bool deterministic, int mask_elem = 4) {
  auto most = [deterministic](size_t bwd, size_t dq) { return deterministic && dq > bwd ? dq : bwd; };
  switch (head_dim_bucket(d > dv ? d : dv)) {
    case 64: return most(Tiles<64>::bwd_smem(mask_elem), Tiles<64>::dq_smem(mask_elem));
    case 128: return most(Tiles<128>::bwd_smem(mask_elem), Tiles<128>::dq_smem(mask_elem));
    default: return most(Tiles<256>::bwd_smem(mask_elem), Tiles<256>::dq_smem(mask_elem));
  }
}

}  // namespace ff::attention::gpu
