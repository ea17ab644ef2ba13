// CPU helpers: function multi-versioning and dtype conversion.
//
// Hot loops are written as plain loops with `#pragma omp simd` and compiled several times by GCC's
// target_clones (AVX-512, AVX2, baseline); the loader picks the best clone for the CPU at hand, so
// one wheel is fast on any x86-64 machine without per-file ISA flags.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define FF_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FF_CPU_CLONES
#endif

namespace ff::cpu {

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

template <typename T>
inline T from_float(float v) { return static_cast<T>(v); }

// Element access in float32 for the types the vectorized loops read and write directly: float32
// and bfloat16. bfloat16 goes through integer operations on the bit pattern so that loops
// vectorize (c10::BFloat16's scalar conversions do not); float32 -> bfloat16 rounds to nearest
// even like c10, and a NaN stays a (quiet) NaN.
__attribute__((always_inline)) inline float load_elem(const float* p, int64_t i) { return p[i]; }
__attribute__((always_inline)) inline float load_elem(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float v;
  __builtin_memcpy(&v, &bits, sizeof v);
  return v;
}
__attribute__((always_inline)) inline void store_elem(float* p, int64_t i, float v) { p[i] = v; }
__attribute__((always_inline)) inline void store_elem(c10::BFloat16* p, int64_t i, float v) {
  uint32_t u;
  __builtin_memcpy(&u, &v, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(nan ? 0x7fc0u : rounded);
}

// Whether load_elem / store_elem take T (float16 rows are converted through a float32 buffer).
template <typename T>
inline constexpr bool kDirectElem = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;

[[maybe_unused]] FF_CPU_CLONES static void bf16_to_f32(const c10::BFloat16* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = load_elem(src, i);
}

[[maybe_unused]] FF_CPU_CLONES static void f32_to_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) store_elem(dst, i, src[i]);
}

// Rows of T <-> float32: vectorized for bfloat16, elementwise c10 casts otherwise (float32 callers
// avoid the copy altogether).
template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    bf16_to_f32(src, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

template <typename T>
inline void store_row(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    f32_to_bf16(src, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

}  // namespace ff::cpu
