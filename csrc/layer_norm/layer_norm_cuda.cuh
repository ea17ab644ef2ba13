// layer_norm on CUDA GPUs: the kernels and their templated launchers. The math is in layer_norm.h.
//
// Forward: one thread block per row (grid-stride over rows). Threads walk the row in 16-byte packs
// (VEC = 16 / sizeof(T) elements) when N and every pointer allow it, else element by element.
// Pass 1 forms h = x * Z + residual (dropout mask from Philox, in-kernel), stores the rounded h
// when it is an output, and sums it; pass 2 sums the deviations from that first mean and their
// squares (the deviations refine the mean, see below); pass 3 writes y. Passes 2-3 read h from a
// shared-memory copy of the row when it fits (N <= ~12k), else again from global memory (the
// stored h, or x), which gives the same values.
//
// Backward: G = min(M, 4 * SMs) blocks, each owning rows m = g, g + G, ...; per row a first pass
// sums g * xhat and g, a second writes dh (and dx) and adds dy * xhat, dy into the block's float32
// partial row for dw / db (in shared memory when 2N floats fit, else in the global partial buffer;
// each thread only ever touches its own columns, so no atomics). A column kernel then adds the G
// partial rows in order: deterministic for a given device and shape.
//
// This header uses simt/simt.cuh and common/ only (no ATen), so the same kernels and launchers
// compile with nvcc (instantiated by layer_norm_cuda_fwd.cu / _bwd.cu behind the launchers of
// layer_norm_cuda.h) and, with -DFF_SIMT_EMULATION, with a host C++ compiler for the emulated tests
// (csrc/tests/emu/emu_layer_norm.cpp). The host side — the scratch allocation, the stream, the SM
// count — is layer_norm_cuda.cpp.
#pragma once
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "common/cuda_utils.cuh"
#include "common/philox.h"
#include "layer_norm/layer_norm.h"
#include "layer_norm/layer_norm_cuda.h"
#include "simt/simt.cuh"

namespace ff::layer_norm::gpu {

using ff::cuda::block_sum;
using ff::cuda::from_float;
using ff::cuda::load_floats;
using ff::cuda::store_floats;
using ff::cuda::to_float;

constexpr int kScratch = 32;                    // floats of shared memory for block_sum
constexpr int64_t kSmemBudget = 48 * 1024;      // bytes usable without an opt-in
constexpr int kReduceThreads = 256;             // threads per block of the dw / db column kernel

template <typename T>
struct FwdKernelArgs {
  const T* x;          // (M, N)
  const T* residual;   // (M, N) or nullptr
  const void* weight;  // (N,) W or nullptr
  const void* bias;    // (N,) W or nullptr
  T* y;                // (M, N)
  T* h;                // (M, N) or nullptr (h == x)
  float* mean;         // (M,) or nullptr (RMSNorm)
  float* rstd;         // (M,)
  int64_t M, N;
  float eps;
  bool rms;
  bool cache_row;      // keep h in shared memory between the passes
  DropoutParams dropout;
};

template <typename T>
struct BwdKernelArgs {
  const T* dy;         // (M, N)
  const T* dh_out;     // (M, N) or nullptr
  const T* h;          // (M, N)
  const void* weight;  // (N,) W or nullptr
  const float* mean;   // (M,) or nullptr (RMSNorm)
  const float* rstd;   // (M,)
  T* dh;               // (M, N)
  T* dx;               // (M, N) or nullptr (no dropout)
  float* part_dw;      // (G, N)
  float* part_db;      // (G, N)
  int64_t M, N;
  bool rms;
  bool smem_partials;  // the block's partial rows in shared memory
  DropoutParams dropout;
};

template <typename W>
__device__ __forceinline__ float param_at(const void* p, int64_t c, float fill) {
  return p ? to_float(static_cast<const W*>(p)[c]) : fill;
}

// The dropout multipliers of the VEC consecutive logical elements n0 .. n0 + VEC - 1: the values
// of dropout_multiplier(d, n0 + j), with one Philox call per block of eight indices the pack
// touches (at most VEC / 8 + 1 calls) instead of one per element. k = (offset + n0) mod 8 is where
// the pack starts in its first block; element j is draw t mod 8 of block j / 8 + t / 8, with
// t = k + j mod 8 (0 .. 14), picked with compile-time block indices and philox_word's selects,
// so the draws stay in registers (a run-time index into the blocks would put them in local
// memory). Kept here rather than in common/philox.h for now: the attention kernels draw in
// their own register layouts (attention_cuda_scores.cuh).
template <int VEC>
__device__ __forceinline__ void dropout_multipliers(const DropoutParams& d, uint64_t n0, float (&z)[VEC]) {
  if constexpr (VEC == 1) {
    z[0] = dropout_multiplier(d, n0);
  } else {
    static_assert(VEC % 4 == 0, "packs are whole Philox words long");
    constexpr int kBlocks = (VEC + 7) / 8 + 1;
    const uint32_t k = static_cast<uint32_t>((d.offset + n0) & 7);
    Philox4 b[kBlocks];
#pragma unroll
    for (int i = 0; i < kBlocks; ++i) {
      // Block i is needed when the pack reaches it (k is uniform over a row's packs: every c is a
      // multiple of VEC).
      b[i] = 8 * static_cast<uint32_t>(i) < k + VEC ? philox_block(d, n0 + 8 * static_cast<uint64_t>(i))
                                                    : Philox4{{0, 0, 0, 0}};
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const uint32_t t = k + static_cast<uint32_t>(j & 7);  // 0 .. 14
      const uint32_t w = t < 8 ? philox_word(b[j / 8], t >> 1) : philox_word(b[j / 8 + 1], (t - 8) >> 1);
      const bool keep = (t & 1) ? keep_high(w, d.threshold) : keep_low(w, d.threshold);
      z[j] = keep ? d.scale : 0.f;
    }
  }
}

// h for VEC elements of row m starting at column c, as the forward defines it.
template <typename T, int VEC>
__device__ __forceinline__ void form_h(const FwdKernelArgs<T>& a, int64_t m, int64_t c, float (&v)[VEC]) {
  load_floats<VEC>(a.x + m * a.N + c, v);
  if (a.dropout.enabled) {
    float z[VEC];
    dropout_multipliers<VEC>(a.dropout, static_cast<uint64_t>(m * a.N + c), z);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] *= z[j];
  }
  if (a.residual) {
    float r[VEC];
    load_floats<VEC>(a.residual + m * a.N + c, r);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] += r[j];
  }
}

// h again in passes 2-3: from the shared copy, the stored h, or x itself.
template <typename T, int VEC>
__device__ __forceinline__ void reload_h(const FwdKernelArgs<T>& a, const float* cache, int64_t m, int64_t c,
                                         float (&v)[VEC]) {
  if (cache) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = cache[c + j];
  } else {
    load_floats<VEC>((a.h ? a.h : a.x) + m * a.N + c, v);
  }
}

template <typename T, typename W, int VEC>
__global__ void ln_fwd_kernel(const FwdKernelArgs<T> a) {
  FF_DYNAMIC_SMEM(float, smem);
  float* scratch = smem;
  float* cache = a.cache_row ? smem + kScratch : nullptr;
  const int64_t N = a.N;
  const float inv_n = 1.f / static_cast<float>(N);
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;

  for (int64_t m = blockIdx.x; m < a.M; m += gridDim.x) {
    float sum = 0.f;
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < N; c += step) {
      float v[VEC];
      form_h<T, VEC>(a, m, c, v);
      if (a.h) {
        store_floats<VEC>(a.h + m * N + c, v);
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[j] = to_float(from_float<T>(v[j]));  // the stored, rounded h
      }
      // Each thread writes and later reads back only its own columns of the cache: no barrier.
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (cache) cache[c + j] = v[j];
        sum += v[j];
      }
    }
    // Without a stored h or a cache, pass 2 re-reads x: form_h(x) == x exactly in that case.
    const float mean0 = a.rms ? 0.f : block_sum(sum, scratch) * inv_n;

    // Second pass about mean0; the sum of the deviations refines the mean (a float32 row sum
    // rounds: a constant row's mean0 is off by an ulp, which BERT's eps = 1e-12 blows up to O(1)),
    // and sum (v - mean)^2 = sum (v - mean0)^2 - N (mean - mean0)^2.
    float sq = 0.f, dev = 0.f;
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < N; c += step) {
      float v[VEC];
      reload_h<T, VEC>(a, cache, m, c, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = v[j] - mean0;
        dev += d;
        sq += d * d;
      }
    }
    const float shift = a.rms ? 0.f : block_sum(dev, scratch) * inv_n;
    const float mean = mean0 + shift;
    const float var = fmaxf(block_sum(sq, scratch) * inv_n - shift * shift, 0.f);
    const float rstd = rsqrtf(var + a.eps);
    if (threadIdx.x == 0) {
      if (a.mean) a.mean[m] = mean;
      a.rstd[m] = rstd;
    }

    for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < N; c += step) {
      float v[VEC];
      reload_h<T, VEC>(a, cache, m, c, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        v[j] = (v[j] - mean) * rstd * param_at<W>(a.weight, c + j, 1.f) + param_at<W>(a.bias, c + j, 0.f);
      store_floats<VEC>(a.y + m * N + c, v);
    }
  }
}

template <typename T, typename W, int VEC>
__global__ void ln_bwd_kernel(const BwdKernelArgs<T> a) {
  FF_DYNAMIC_SMEM(float, smem);
  float* scratch = smem;
  const int64_t N = a.N;
  float* pdw = a.smem_partials ? smem + kScratch : a.part_dw + blockIdx.x * N;
  float* pdb = a.smem_partials ? smem + kScratch + N : a.part_db + blockIdx.x * N;
  const float inv_n = 1.f / static_cast<float>(N);
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;

  // Each thread zeroes, updates and finally writes only its own columns: no barrier needed.
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < N; c += step) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) pdw[c + j] = pdb[c + j] = 0.f;
  }

  for (int64_t m = blockIdx.x; m < a.M; m += gridDim.x) {
    const float mean = a.mean ? a.mean[m] : 0.f;
    const float rstd = a.rstd[m];
    float s_gx = 0.f, s_g = 0.f;
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < N; c += step) {
      float h[VEC], dy[VEC];
      load_floats<VEC>(a.h + m * N + c, h);
      load_floats<VEC>(a.dy + m * N + c, dy);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float g = dy[j] * param_at<W>(a.weight, c + j, 1.f);
        s_gx += g * (h[j] - mean) * rstd;
        s_g += g;
      }
    }
    const float c1 = block_sum(s_gx, scratch) * inv_n;
    const float c2 = a.rms ? 0.f : block_sum(s_g, scratch) * inv_n;

    for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < N; c += step) {
      float h[VEC], dy[VEC], dh[VEC];
      load_floats<VEC>(a.h + m * N + c, h);
      load_floats<VEC>(a.dy + m * N + c, dy);
      if (a.dh_out) {
        load_floats<VEC>(a.dh_out + m * N + c, dh);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) dh[j] = 0.f;
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float xhat = (h[j] - mean) * rstd;
        const float g = dy[j] * param_at<W>(a.weight, c + j, 1.f);
        dh[j] += rstd * (g - xhat * c1 - c2);
        pdw[c + j] += dy[j] * xhat;
        pdb[c + j] += dy[j];
      }
      store_floats<VEC>(a.dh + m * N + c, dh);
      if (a.dx) {
        float z[VEC];
        dropout_multipliers<VEC>(a.dropout, static_cast<uint64_t>(m * N + c), z);
#pragma unroll
        for (int j = 0; j < VEC; ++j) dh[j] *= z[j];
        store_floats<VEC>(a.dx + m * N + c, dh);
      }
    }
  }

  if (a.smem_partials) {
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < N; c += step) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        a.part_dw[blockIdx.x * N + c + j] = pdw[c + j];
        a.part_db[blockIdx.x * N + c + j] = pdb[c + j];
      }
    }
  }
}

// dw[c] = sum_g part_dw[g, c] (and db), in g order.
template <typename W>
__global__ void ln_bwd_reduce_kernel(const float* part_dw, const float* part_db, int64_t G, int64_t N,
                                     W* dweight, W* dbias) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= N) return;
  float sw = 0.f, sb = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    sw += part_dw[g * N + c];
    sb += part_db[g * N + c];
  }
  if (dweight) dweight[c] = from_float<W>(sw);
  if (dbias) dbias[c] = from_float<W>(sb);
}

// ---------------------------------------------------------------------------------------------
// Host launchers (pointers are device pointers; under emulation, host memory)
// ---------------------------------------------------------------------------------------------

// 16 / sizeof(T) when N and every pointer allow 16-byte packs, else 1.
template <typename T>
int vector_width(int64_t N, std::initializer_list<const void*> ptrs) {
  constexpr int full = 16 / sizeof(T);
  if (N % full) return 1;
  for (const void* p : ptrs)
    if (p && reinterpret_cast<uintptr_t>(p) % 16) return 1;
  return full;
}

inline int threads_for(int64_t N, int vec) {
  const int64_t packs = (N + vec - 1) / vec;
  const int64_t want = (packs + 3) / 4;  // about four packs per thread
  return static_cast<int>(std::clamp<int64_t>((want + 31) / 32 * 32, 32, 1024));
}

template <typename T, typename W>
void launch_fwd(const FwdParams& p, const Launch& l) {
  FwdKernelArgs<T> a{static_cast<const T*>(p.x), static_cast<const T*>(p.residual), p.weight, p.bias,
               static_cast<T*>(p.y), static_cast<T*>(p.h), p.mean, p.rstd, p.M, p.N, p.eps, p.rms, false,
               p.dropout};
  const int vec = vector_width<T>(p.N, {p.x, p.residual, p.y, p.h});
  const int threads = threads_for(p.N, vec);
  a.cache_row = static_cast<int64_t>(kScratch + p.N) * 4 <= kSmemBudget;
  const size_t smem = (kScratch + (a.cache_row ? p.N : 0)) * sizeof(float);
  const int64_t grid = std::min<int64_t>(p.M, static_cast<int64_t>(l.num_sms) * std::max(1, 2048 / threads));
  constexpr int full = 16 / sizeof(T);
  auto kernel = vec == full ? ln_fwd_kernel<T, W, full> : ln_fwd_kernel<T, W, 1>;
  ff::simt::launch(kernel, dim3(static_cast<unsigned>(grid)), dim3(threads), smem, l.stream, a);
}

template <typename T, typename W>
void launch_bwd(const BwdParams& p, float* partials, const Launch& l) {
  const int vec = vector_width<T>(p.N, {p.dy, p.dh_out, p.h, p.dh, p.dx});
  const int threads = threads_for(p.N, vec);
  const int64_t G = bwd_blocks(p.M, l.num_sms);
  BwdKernelArgs<T> a{static_cast<const T*>(p.dy), static_cast<const T*>(p.dh_out), static_cast<const T*>(p.h),
               p.weight, p.mean, p.rstd, static_cast<T*>(p.dh), static_cast<T*>(p.dx),
               partials, partials + G * p.N, p.M, p.N, p.rms, false, p.dropout};
  a.smem_partials = static_cast<int64_t>(kScratch + 2 * p.N) * 4 <= kSmemBudget;
  const size_t smem = (kScratch + (a.smem_partials ? 2 * p.N : 0)) * sizeof(float);
  constexpr int full = 16 / sizeof(T);
  auto kernel = vec == full ? ln_bwd_kernel<T, W, full> : ln_bwd_kernel<T, W, 1>;
  ff::simt::launch(kernel, dim3(static_cast<unsigned>(G)), dim3(threads), smem, l.stream, a);
  if (p.dweight || p.dbias) {
    const int64_t rgrid = (p.N + kReduceThreads - 1) / kReduceThreads;
    ff::simt::launch(ln_bwd_reduce_kernel<W>, dim3(static_cast<unsigned>(rgrid)), dim3(kReduceThreads), 0, l.stream,
                     static_cast<const float*>(a.part_dw), static_cast<const float*>(a.part_db), G, p.N,
                     static_cast<W*>(p.dweight), static_cast<W*>(p.dbias));
  }
}

// dtype dispatch: T is the input's device type (float, __half, __nv_bfloat16: common/cuda_utils.cuh,
// visit_device_dtype); W (weight / bias) is T or float.
template <typename T, typename W>
struct Fwd {
  static void run(const FwdParams& p, const Launch& l) { launch_fwd<T, W>(p, l); }
};
template <typename T, typename W>
struct Bwd {
  static void run(const BwdParams& p, float* partials, const Launch& l) { launch_bwd<T, W>(p, partials, l); }
};

template <template <typename, typename> class Fn, typename P, typename... Args>
void dispatch(const P& p, Args... args) {
  const bool wf32 = p.wtype == c10::ScalarType::Float;
  if (!wf32 && p.wtype != p.dtype) {
    throw std::invalid_argument(std::string("layer_norm (cuda): weight dtype ") + c10::toString(p.wtype) +
                                " is neither float32 nor the input's " + c10::toString(p.dtype));
  }
  ff::cuda::visit_device_dtype(p.dtype, "layer_norm (cuda)", [&]<typename T>(TypeTag<T>) {
    if (wf32) return Fn<T, float>::run(p, args...);
    Fn<T, T>::run(p, args...);  // for float32 input, the same Fn<float, float>
  });
}

}  // namespace ff::layer_norm::gpu
