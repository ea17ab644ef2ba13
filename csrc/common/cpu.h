// CPU helpers: function multi-versioning and dtype conversion.
//
// Hot loops are written as plain loops with `#pragma omp simd` and compiled several times by GCC's
// target_clones (AVX-512, AVX2, baseline); the loader picks the best clone for the CPU at hand, so
// one wheel is fast on any x86-64 machine without per-file ISA flags.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cstdint>

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

// Convert n elements of T to float (a copy for float is avoided by callers).
template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
inline void store_row(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

}  // namespace ff::cpu
