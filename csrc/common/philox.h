// Philox4x32-10, the project's dropout RNG (the mapping is documented once, in
// python/fusedformer/rng.py). Host and device code share this header.
//
//   element with logical linear index n, i = offset + n:
//     key     = (lo32(seed), hi32(seed))
//     counter = (lo32(i >> 3), hi32(i >> 3), 0, 0)
//     w       = Philox4x32_10(counter, key)[(i >> 1) & 3]
//     r       = 16-bit half i & 1 of w (0: the low half)
//     keep   <=> r >= threshold,  threshold = floor(p * 2^16)
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FF_HOST_DEVICE __host__ __device__ __forceinline__
#define FF_UNROLL_10 _Pragma("unroll")
#else
#define FF_HOST_DEVICE inline
#define FF_UNROLL_10 _Pragma("GCC unroll 10")
#endif

namespace ff {

struct Philox4 {
  uint32_t w[4];
};

FF_HOST_DEVICE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// Ten rounds of Philox4x32 on counter (c0, c1, 0, 0) with key (k0, k1).
FF_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  uint32_t c2 = 0, c3 = 0;
  FF_UNROLL_10
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(0xD2511F53u, c0, &hi0);
    const uint32_t lo1 = mulhilo32(0xCD9E8D57u, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Dropout parameters as every kernel takes them.
struct DropoutParams {
  uint64_t seed = 0;
  uint64_t offset = 0;
  uint32_t threshold = 0;  // drop iff the 16-bit draw r < threshold
  float scale = 1.f;       // 1 / (1 - p)
  bool enabled = false;
};

// The Philox block holding logical index n: its four words are the draws of the counter indices
// 8 (i >> 3) .. 8 (i >> 3) + 7, i = offset + n, two 16-bit halves a word.
FF_HOST_DEVICE Philox4 philox_block(const DropoutParams& d, uint64_t n) {
  const uint64_t block = (d.offset + n) >> 3;
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                       static_cast<uint32_t>(d.seed), static_cast<uint32_t>(d.seed >> 32));
}

// Word k (0..3) of a Philox block, selected without indexing the array at run time: on a GPU a
// run-time index puts the block in local memory (a stack frame in every kernel that draws).
FF_HOST_DEVICE uint32_t philox_word(const Philox4& b, uint32_t k) {
  return k == 0 ? b.w[0] : k == 1 ? b.w[1] : k == 2 ? b.w[2] : b.w[3];
}

// Keep bits of the two draws of word w: its low half (the even index) and its high half (the odd
// one), each compared as the top 16 bits of a 32-bit value (one compare, no extraction).
FF_HOST_DEVICE bool keep_low(uint32_t w, uint32_t threshold) { return (w << 16) >= (threshold << 16); }
FF_HOST_DEVICE bool keep_high(uint32_t w, uint32_t threshold) { return w >= (threshold << 16); }

// Whether logical element n is kept.
FF_HOST_DEVICE bool dropout_keep(const DropoutParams& d, uint64_t n) {
  const uint64_t i = d.offset + n;
  const uint32_t w = philox_word(philox_block(d, n), static_cast<uint32_t>(i >> 1) & 3);
  return (i & 1) ? keep_high(w, d.threshold) : keep_low(w, d.threshold);
}

// The dropout multiplier of logical element n: 0 or 1 / (1 - p).
FF_HOST_DEVICE float dropout_multiplier(const DropoutParams& d, uint64_t n) {
  return dropout_keep(d, n) ? d.scale : 0.f;
}

// The multipliers of logical elements n and n + 1 (the same values as dropout_multiplier(d, n)
// and (d, n + 1)): one word when i = offset + n is even, else the high half of word k and the low
// half of word k + 1 (of the next block when k = 3).
FF_HOST_DEVICE void dropout_pair(const DropoutParams& d, uint64_t n, float& z0, float& z1) {
  const uint64_t i = d.offset + n;
  const uint32_t k = static_cast<uint32_t>(i >> 1) & 3;
  const Philox4 b = philox_block(d, n);
  const uint32_t w0 = philox_word(b, k);
  bool keep0, keep1;
  if (i & 1) {
    const uint32_t w1 = k == 3 ? philox_block(d, n + 1).w[0] : philox_word(b, k + 1);
    keep0 = keep_high(w0, d.threshold);
    keep1 = keep_low(w1, d.threshold);
  } else {
    keep0 = keep_low(w0, d.threshold);
    keep1 = keep_high(w0, d.threshold);
  }
  z0 = keep0 ? d.scale : 0.f;
  z1 = keep1 ? d.scale : 0.f;
}

// Build DropoutParams from the op-level arguments (p in [0, 1)).
inline DropoutParams make_dropout(double p, int64_t seed, int64_t offset) {
  DropoutParams d;
  d.enabled = p > 0.0;
  d.seed = static_cast<uint64_t>(seed);
  d.offset = static_cast<uint64_t>(offset);
  d.threshold = static_cast<uint32_t>(p * 65536.0);
  d.scale = static_cast<float>(1.0 / (1.0 - p));
  return d;
}

}  // namespace ff
