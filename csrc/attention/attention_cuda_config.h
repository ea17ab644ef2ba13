// attention on CUDA: the tile sizes per head-dim bucket and the shared memory each kernel needs —
// plain C++, shared by the kernels (attention_cuda_tiles.cuh) and the host code that checks a
// launch fits the device (attention_cuda.cpp) and tells dispatch (attention_ops.cpp).
#pragma once
#include <cstddef>
#include <cstdint>

namespace ff::attention::gpu {

template <int DP>
struct Tiles {
  static constexpr int kLd = DP + 8;                 // smem row stride of a DP-wide tile
  static constexpr int kBQ = 64;                     // fwd / dq kernel: query rows per CTA
  static constexpr int kBK = DP == 256 ? 32 : 64;    // fwd / dq kernel: keys per pipelined tile
  static constexpr int kBKb = 64;                    // bwd: keys per CTA
  static constexpr int kBQb = DP == 64 ? 64 : 32;    // bwd: query rows per inner step
  static constexpr int kLdS = kBQb + 8;              // bwd: row stride of the dS^T tile

  // Dynamic shared memory in bytes (16-bit elements), see attention_cuda.cuh's kernels.
  static constexpr size_t kFwdSmem = static_cast<size_t>(kBQ + 4 * kBK) * kLd * 2;  // Q, 2 x K, 2 x V
  static constexpr int kQBufs = DP <= 128 ? 2 : 1;   // bwd: Q / dO buffers (double-buffered up to DP 128)
  static constexpr size_t kBwdSmem = static_cast<size_t>(2 * kBKb + 2 * kQBufs * kBQb) * kLd * 2 +  // K, V, Q, dO
                                     static_cast<size_t>(kBKb) * kLdS * 2 + 2 * kBQb * 4;  // dS^T, lse, delta
  static constexpr size_t kDqSmem = static_cast<size_t>(2 * kBQ + 4 * kBK) * kLd * 2;  // Q, dO, 2 x K, 2 x V
};

// The padded head dim serving max(D, Dv), or 0 when it is too large.
inline int head_dim_bucket(int64_t d) { return d <= 64 ? 64 : d <= 128 ? 128 : d <= 256 ? 256 : 0; }

// The most dynamic shared memory one CTA of the forward, or of the backward (its dK / dV kernel
// and, when deterministic, its dQ kernel), asks for at head dims D, Dv (<= 256).
inline size_t fwd_smem_bytes(int64_t d, int64_t dv) {
  switch (head_dim_bucket(d > dv ? d : dv)) {
    case 64: return Tiles<64>::kFwdSmem;
    case 128: return Tiles<128>::kFwdSmem;
    default: return Tiles<256>::kFwdSmem;
  }
}

inline size_t bwd_smem_bytes(int64_t d, int64_t dv, bool deterministic) {
  auto most = [deterministic](size_t bwd, size_t dq) { return deterministic && dq > bwd ? dq : bwd; };
  switch (head_dim_bucket(d > dv ? d : dv)) {
    case 64: return most(Tiles<64>::kBwdSmem, Tiles<64>::kDqSmem);
    case 128: return most(Tiles<128>::kBwdSmem, Tiles<128>::kDqSmem);
    default: return most(Tiles<256>::kBwdSmem, Tiles<256>::kDqSmem);
  }
}

}  // namespace ff::attention::gpu
