// Float32 building blocks shared by the CPU kernels: a vectorizable exp and the dropout row.
// Functions are `static`: each kernel file gets its own FF_CPU_CLONES copies (GCC's target_clones
// dispatches per translation unit).
#pragma once
#include <bit>
#include <cstdint>

#include "common/cpu.h"
#include "common/philox.h"

namespace ff::cpu {

// exp(x) for x <= 88 in plain arithmetic that vectorizes: x = n ln2 + r with |r| <= ln2 / 2
// (Cody-Waite split of ln2), exp(r) by Cephes' degree-6 polynomial (relative error < 1e-7 over
// [-87, 0]), 2^n through the exponent bits. x < -87 (including -inf) gives exactly 0, through an
// integer mask rather than a branch so that GCC if-converts it; NaN stays NaN. Every caller
// passes x <= 0 up to rounding (a score minus the row max or the log-sum-exp).
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
  const int32_t keep = -static_cast<int32_t>(!(x < -87.f));  // all ones, or 0 below -87
  return std::bit_cast<float>(std::bit_cast<int32_t>(e) & keep);
}

// z[c] = dropout multiplier (0 or 1 / (1 - p)) of logical element first + c, for c < n. Whole
// Philox blocks (eight draws each, two a word) are generated in a vectorizable loop; ragged ends
// one by one.
FF_CPU_CLONES static void dropout_row(const DropoutParams& d, uint64_t first, float* z, int64_t n) {
  const uint32_t k0 = static_cast<uint32_t>(d.seed), k1 = static_cast<uint32_t>(d.seed >> 32);
  const uint32_t thr = d.threshold;
  const float keep = d.scale;
  const uint64_t i0 = d.offset + first;  // the counter index of z[0]
  int64_t c = 0;
  for (; c < n && ((i0 + static_cast<uint64_t>(c)) & 7); ++c) z[c] = dropout_multiplier(d, first + c);
  const int64_t blocks = (n - c) / 8;
  const uint64_t block0 = (i0 + static_cast<uint64_t>(c)) >> 3;
  float* zb = z + c;
#pragma omp simd
  for (int64_t t = 0; t < blocks; ++t) {
    const uint64_t blk = block0 + static_cast<uint64_t>(t);
    const Philox4 w = philox4x32_10(static_cast<uint32_t>(blk), static_cast<uint32_t>(blk >> 32), k0, k1);
    // Written out: GCC vectorizes the block loop with these eight stores, not with a loop over k.
    zb[8 * t + 0] = keep_low(w.w[0], thr) ? keep : 0.f;
    zb[8 * t + 1] = keep_high(w.w[0], thr) ? keep : 0.f;
    zb[8 * t + 2] = keep_low(w.w[1], thr) ? keep : 0.f;
    zb[8 * t + 3] = keep_high(w.w[1], thr) ? keep : 0.f;
    zb[8 * t + 4] = keep_low(w.w[2], thr) ? keep : 0.f;
    zb[8 * t + 5] = keep_high(w.w[2], thr) ? keep : 0.f;
    zb[8 * t + 6] = keep_low(w.w[3], thr) ? keep : 0.f;
    zb[8 * t + 7] = keep_high(w.w[3], thr) ? keep : 0.f;
  }
  for (c += 8 * blocks; c < n; ++c) z[c] = dropout_multiplier(d, first + c);
}

}  // namespace ff::cpu
