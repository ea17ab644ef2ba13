// Philox4x32-10 (csrc/common/philox.h) against the Random123 known-answer vectors, and the
// project's index mapping (python/fusedformer/rng.py) for offsets that straddle blocks.
#include <cstdio>
#include <cstdlib>

#include "common/philox.h"

namespace {
int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what);
    ++failures;
  }
}

// Philox with a full four-word counter (the library fixes c2 = c3 = 0; known answers need all four).
ff::Philox4 philox_full(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t hi0, hi1;
    const uint32_t lo0 = ff::mulhilo32(0xD2511F53u, c0, &hi0);
    const uint32_t lo1 = ff::mulhilo32(0xCD9E8D57u, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0, c1 = lo1, c2 = n2, c3 = lo0;
  }
  return ff::Philox4{{c0, c1, c2, c3}};
}
}  // namespace

int main() {
  const ff::Philox4 z = ff::philox4x32_10(0, 0, 0, 0);
  expect(z.w[0] == 0x6627E8D5u && z.w[1] == 0xE169C58Du && z.w[2] == 0xBC57AC4Cu && z.w[3] == 0x9B00DBD8u,
         "known answer: zero counter, zero key");
  const ff::Philox4 f = philox_full(0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu);
  expect(f.w[0] == 0x408F276Du && f.w[1] == 0x41C83B0Eu && f.w[2] == 0xA20BC7C6u && f.w[3] == 0x6D5451FDu,
         "known answer: all-ones counter and key");
  const ff::Philox4 pi = philox_full(0x243F6A88u, 0x85A308D3u, 0x13198A2Eu, 0x03707344u, 0xA4093822u, 0x299F31D0u);
  expect(pi.w[0] == 0xD16CFE09u && pi.w[1] == 0x94FDCCEBu && pi.w[2] == 0x5001E420u && pi.w[3] == 0x24126EA1u,
         "known answer: pi digits");
  const ff::Philox4 same = philox_full(7, 9, 0, 0, 3, 4);
  const ff::Philox4 lib = ff::philox4x32_10(7, 9, 3, 4);
  expect(same.w[0] == lib.w[0] && same.w[3] == lib.w[3], "library form equals the full form with c2 = c3 = 0");

  // Mapping: element n with offset o draws the 16-bit half (o + n) & 1 (0: low) of word
  // ((o + n) >> 1) & 3 of block (o + n) >> 3, written out here with shifts and masks.
  ff::DropoutParams d = ff::make_dropout(0.5, 0x123456789ABCDEF0LL, 6);
  for (uint64_t n = 0; n < 40; ++n) {
    const uint64_t i = 6 + n;
    const ff::Philox4 b = ff::philox4x32_10(static_cast<uint32_t>(i >> 3), static_cast<uint32_t>(i >> 35),
                                            0x9ABCDEF0u, 0x12345678u);
    const uint32_t r = (b.w[(i >> 1) & 3] >> (16 * (i & 1))) & 0xFFFFu;
    const float want = r >= d.threshold ? 2.f : 0.f;
    expect(ff::dropout_multiplier(d, n) == want, "dropout_multiplier follows the documented mapping");
    float z0 = -1.f, z1 = -1.f;
    ff::dropout_pair(d, n, z0, z1);
    expect(z0 == want && z1 == ff::dropout_multiplier(d, n + 1), "dropout_pair equals two single draws");
  }
  expect(d.threshold == 0x8000u && d.scale == 2.f, "threshold and scale for p = 0.5");
  expect(ff::make_dropout(0.1, 1, 0).threshold == 6553u, "threshold floor(0.1 * 2^16)");
  if (failures) return EXIT_FAILURE;
  std::printf("philox: all checks passed\n");
  return EXIT_SUCCESS;
}
