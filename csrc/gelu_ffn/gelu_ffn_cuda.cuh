// gelu_ffn on CUDA GPUs: the math is in gelu_ffn.h; this file is the algorithm.
//
// One tensor-core GEMM template, C (M x N) = A (M x K) B, fused with an epilogue, serves the three
// products that need one; the other three go to cuBLAS (at::mm_out) unchanged:
//
//   forward   pre, g = bias_gelu(x w1^T)      GEMM "NT", epilogue: pre = acc + b1 (stored, rounded
//                                             to T), g = gelu(rounded pre) (stored: workspace)
//             y = (g w2^T + b2) * Z           GEMM "NT", epilogue: bias + dropout (Philox, element
//                                             n = m * C2 + c), rounded once
//   backward  dz = dy * Z, db2 partials       one element-wise pass (only with dropout or a b2)
//             dpre, g = dgelu(dz w2)          GEMM "NN", epilogue: loads pre, dpre = acc * gelu'(pre)
//                                             and g = gelu(pre) (stored, for dw2), and the CTA's
//                                             column sums of the rounded dpre -> partial (tiles_m, F)
//             db1, db2                        a column kernel adds the partial rows in a fixed order
//             dw2 = dz^T g, dw1 = dpre^T x, dx = dpre w1     cuBLAS (no epilogue to fuse)
//
// GEMM layouts (all matrices row-major): A is M x K. "NT": B is given as N x K (a weight in the
// nn.Linear layout), so both operands are K-contiguous and ldmatrix loads both without .trans.
// "NN": B is K x N (w2 in the backward), loaded with ldmatrix .trans.
//
// Tiling: a CTA computes a BM x BN tile of C with WARPS_M x WARPS_N warps, each a WM x WN warp tile
// of (WM / 16) x (WN / 8) mma.sync m16n8k16 tiles accumulated in float32 registers. K advances in
// BK = 32 slices through a STAGES = 3 deep cp.async ring in shared memory: while slice k is
// multiplied, slices k + 1 and k + 2 are in flight. One __syncthreads per slice: the stage the
// prefetch overwrites is the one every warp finished in the previous iteration. Shared memory
// rows are padded by 8 elements (16 bytes) so that the 8 row addresses of an ldmatrix phase fall in
// 8 different 16-byte bank groups (a row of 40 or BN + 8 elements is 80 or 2 BN + 16 bytes).
//   large: 128 x 128 CTA tile, 8 warps (2 x 4), warp tile 64 x 32     (61.4 KB shared memory NT)
//   small:  64 x  64 CTA tile, 4 warps (2 x 2), warp tile 32 x 32     (30.7 KB)
// The small tile is chosen at run time when the large one would not give every SM one CTA
// (small M or N; more CTAs beat bigger tiles when the grid is thinner than the machine).
//
// Bounds: any M (rows past M are zero-filled on load and never stored); K and N must be multiples
// of 8, so that every 16-byte chunk is either wholly inside or wholly outside the matrix: chunks
// outside are zero-filled by cp.async (pred = false), and stores are masked per column pair.
// All base pointers of A and B must be 16-byte aligned (the entry points make sure of it).
//
// Determinism: no atomics. Bias gradients are per-CTA (GEMM) or per-row-chunk (element-wise pass)
// column partial sums in float32, added by one thread per column in row-tile order.
//
// This header uses simt/simt.cuh only (no ATen), so the same kernels and launchers compile with
// nvcc (instantiated by the type-erased launchers of gelu_ffn_cuda_fwd.cu / _bwd.cu, declared in
// gelu_ffn_cuda.h) and, with -DFF_SIMT_EMULATION, with a host C++ compiler for the emulated tests
// (csrc/tests/emu/emu_gelu_ffn.cpp). The orchestration — workspaces, the launches in order, the
// cuBLAS GEMMs — is host code in gelu_ffn_cuda.cpp, run unchanged by those tests on CPU tensors.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/philox.h"
#include "simt/simt.cuh"
#include "gelu_ffn/gelu_ffn_cuda.h"

#ifdef FF_SIMT_EMULATION
#define FF_GEMM_LAUNCH_BOUNDS(threads)
#else
#define FF_GEMM_LAUNCH_BOUNDS(threads) __launch_bounds__(threads)
#endif

namespace ff::gelu_ffn::tc {

using ff::simt::cp_async_16;
using ff::simt::cp_async_commit;
using ff::simt::cp_async_wait;
using ff::simt::ldmatrix_x4;
using ff::simt::ldmatrix_x4_trans;
using ff::simt::mma_m16n8k16;

// ---------------------------------------------------------------------------------------------
// Element helpers
// ---------------------------------------------------------------------------------------------
// Dtype conversions: common/cuda_utils.cuh, the one definition.
using ff::cuda::from_float;
using ff::cuda::to_float;

// Two adjacent elements, stored with one 32-bit access (the column index is even).
template <typename T>
struct alignas(2 * sizeof(T)) Pair {
  T v[2];
};
// v0, v1 += bias[col], bias[col + 1] (no bias: nullptr).
template <typename T>
__device__ __forceinline__ void add_bias_pair(const T* bias, int col, float& v0, float& v1) {
  if (bias) {
    v0 += to_float(bias[col]);
    v1 += to_float(bias[col + 1]);
  }
}

template <typename T>
__device__ __forceinline__ void store_pair(T* p, T a, T b) {
  Pair<T> pk;
  pk.v[0] = a;
  pk.v[1] = b;
  *reinterpret_cast<Pair<T>*>(p) = pk;
}

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;
constexpr float kTanhC = 0.044715f;

__device__ __forceinline__ float gelu(float u, bool tanh_approx) {
  if (tanh_approx) return 0.5f * u * (1.f + tanhf(kSqrt2OverPi * (u + kTanhC * u * u * u)));
  return 0.5f * u * (1.f + erff(u * kInvSqrt2));
}

// gelu(u) and gelu'(u), sharing the erf / tanh.
__device__ __forceinline__ void gelu_and_grad(float u, bool tanh_approx, float& g, float& dg) {
  if (tanh_approx) {
    const float t = tanhf(kSqrt2OverPi * (u + kTanhC * u * u * u));
    g = 0.5f * u * (1.f + t);
    dg = 0.5f * (1.f + t) + 0.5f * u * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kTanhC * u * u);
  } else {
    const float cdf = 0.5f * (1.f + erff(u * kInvSqrt2));
    g = u * cdf;
    dg = cdf + u * expf(-0.5f * u * u) * kInvSqrt2Pi;
  }
}

// Dropout: dropout_pair / dropout_multiplier (common/philox.h).

// ---------------------------------------------------------------------------------------------
// Tile configurations
// ---------------------------------------------------------------------------------------------
template <int BM_, int BN_, int WARPS_M_, int WARPS_N_>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, BK = 32, STAGES = 3, PAD = 8;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MI = WM / 16, NI = WN / 8;  // mma tiles per warp
  static_assert(WM % 16 == 0 && WN % 16 == 0, "a warp tile is a whole number of 16 x 16 blocks");
};
using TileLarge = Tile<128, 128, 2, 4>;
using TileSmall = Tile<64, 64, 2, 2>;

// Shared memory of one pipeline stage (elements) and of the whole ring (bytes).
template <class Cfg, bool kNN>
struct Smem {
  static constexpr int A_LD = Cfg::BK + Cfg::PAD;                 // A stage: BM rows of BK (+pad)
  static constexpr int B_LD = kNN ? Cfg::BN + Cfg::PAD : A_LD;    // B stage: BK x BN (NN) or BN x BK (NT)
  static constexpr int A_ELEMS = Cfg::BM * A_LD;
  static constexpr int B_ELEMS = kNN ? Cfg::BK * B_LD : Cfg::BN * B_LD;
  static constexpr size_t BYTES = size_t(Cfg::STAGES) * (A_ELEMS + B_ELEMS) * 2;
  static_assert(BYTES >= size_t(Cfg::WARPS_M) * Cfg::BN * sizeof(float), "column-sum scratch fits");
};

// ---------------------------------------------------------------------------------------------
// Epilogues. Each is called once per (row, even column) pair inside the matrix with the two float32
// accumulators; kColSums epilogues add the values whose column sums they want into sum[0..1].
// ---------------------------------------------------------------------------------------------

// C = acc (rounded): the plain GEMM, used by the emulated GEMM tests.
template <typename T>
struct StoreEpilogue {
  static constexpr bool kColSums = false;
  T* c;
  int64_t ldc;
  __device__ __forceinline__ void operator()(int64_t row, int col, float v0, float v1, float (&)[2]) const {
    store_pair(c + row * ldc + col, from_float<T>(v0), from_float<T>(v1));
  }
};

// pre = acc + b1 (rounded to T), g = gelu(pre as rounded).
template <typename T>
struct BiasGeluEpilogue {
  static constexpr bool kColSums = false;
  const T* bias;  // (F,) or nullptr
  T* pre;         // (M, F)
  T* g;           // (M, F)
  int64_t ld;
  bool tanh_approx;
  __device__ __forceinline__ void operator()(int64_t row, int col, float v0, float v1, float (&)[2]) const {
    add_bias_pair(bias, col, v0, v1);
    const T p0 = from_float<T>(v0), p1 = from_float<T>(v1);
    store_pair(pre + row * ld + col, p0, p1);
    store_pair(g + row * ld + col, from_float<T>(gelu(to_float(p0), tanh_approx)),
               from_float<T>(gelu(to_float(p1), tanh_approx)));
  }
};

// y = (acc + b2) * Z, rounded once.
template <typename T>
struct BiasDropoutEpilogue {
  static constexpr bool kColSums = false;
  const T* bias;  // (C2,) or nullptr
  T* y;           // (M, C2)
  int64_t ld;
  DropoutParams dropout;
  __device__ __forceinline__ void operator()(int64_t row, int col, float v0, float v1, float (&)[2]) const {
    add_bias_pair(bias, col, v0, v1);
    if (dropout.enabled) {
      float z0, z1;
      dropout_pair(dropout, static_cast<uint64_t>(row * ld + col), z0, z1);
      v0 *= z0;
      v1 *= z1;
    }
    store_pair(y + row * ld + col, from_float<T>(v0), from_float<T>(v1));
  }
};

// dpre = acc * gelu'(pre) (acc = (dz w2)[row, col], not rounded), g = gelu(pre); sums the rounded
// dpre (the very values dw1 and dx are computed from, as in the reference) per column.
template <typename T>
struct DgeluEpilogue {
  static constexpr bool kColSums = true;
  const T* pre;        // (M, F)
  T* dpre;             // (M, F)
  T* g;                // (M, F)
  float* col_partial;  // (tiles_m, F), or nullptr: no column sums wanted
  int64_t ld;
  bool tanh_approx;
  __device__ __forceinline__ void operator()(int64_t row, int col, float v0, float v1, float (&sum)[2]) const {
    const int64_t at = row * ld + col;
    float g0, g1, d0, d1;
    gelu_and_grad(to_float(pre[at]), tanh_approx, g0, d0);
    gelu_and_grad(to_float(pre[at + 1]), tanh_approx, g1, d1);
    const T r0 = from_float<T>(v0 * d0), r1 = from_float<T>(v1 * d1);
    store_pair(dpre + at, r0, r1);
    store_pair(g + at, from_float<T>(g0), from_float<T>(g1));
    sum[0] += to_float(r0);
    sum[1] += to_float(r1);
  }
};

// ---------------------------------------------------------------------------------------------
// The GEMM kernel: grid (tiles_m, tiles_n), block Cfg::THREADS.
// ---------------------------------------------------------------------------------------------
template <typename T, class Cfg, bool kNN, class Epi>
__global__ void FF_GEMM_LAUNCH_BOUNDS(Cfg::THREADS)
    gemm_kernel(const T* __restrict__ A,  // (M, K)
                const T* __restrict__ B,  // (N, K) for NT, (K, N) for NN
                int64_t M, int N, int K, Epi epi) {
  using S = Smem<Cfg, kNN>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, STAGES = Cfg::STAGES, THREADS = Cfg::THREADS;
  constexpr int WM = Cfg::WM, WN = Cfg::WN, MI = Cfg::MI, NI = Cfg::NI;
  FF_DYNAMIC_SMEM(T, smem);
  T* const sA = smem;
  T* const sB = smem + STAGES * S::A_ELEMS;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / Cfg::WARPS_N, wn = warp % Cfg::WARPS_N;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int n0 = static_cast<int>(blockIdx.y) * BN;

  // Issue the cp.async copies of K slice kt into ring stage `stage`: 16-byte chunks of 8 elements,
  // CHUNKS / THREADS per thread and operand (consecutive threads take consecutive chunks of a row).
  constexpr int CHUNKS = BM * BK / 8, PER_THREAD = CHUNKS / THREADS;
  static_assert(BM == BN && CHUNKS % THREADS == 0, "A and B slices split evenly over the threads");
  auto load_slice = [&](int stage, int kt) {
    const int k0 = kt * BK;
    T* a_dst = sA + stage * S::A_ELEMS;
    T* b_dst = sB + stage * S::B_ELEMS;
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
      const int c = tid + i * THREADS;
      const int r = c / (BK / 8), kc = (c % (BK / 8)) * 8;  // row of A, k offset in the slice
      const bool ok = m0 + r < M && k0 + kc < K;
      cp_async_16(a_dst + r * S::A_LD + kc, ok ? A + (m0 + r) * K + k0 + kc : A, ok);
    }
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
      const int c = tid + i * THREADS;
      if constexpr (kNN) {  // slice rows are k, chunks run along n
        const int r = c / (BN / 8), nc = (c % (BN / 8)) * 8;
        const bool ok = k0 + r < K && n0 + nc < N;
        cp_async_16(b_dst + r * S::B_LD + nc, ok ? B + static_cast<int64_t>(k0 + r) * N + n0 + nc : B, ok);
      } else {  // slice rows are n, chunks run along k
        const int r = c / (BK / 8), kc = (c % (BK / 8)) * 8;
        const bool ok = n0 + r < N && k0 + kc < K;
        cp_async_16(b_dst + r * S::B_LD + kc, ok ? B + static_cast<int64_t>(n0 + r) * K + k0 + kc : B, ok);
      }
    }
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;

  const int k_tiles = (K + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) load_slice(s, s);
    cp_async_commit();
  }

  // ldmatrix .x4 row addresses: lane l serves 8 x 8 matrix l / 8, row l % 8 of it.
  const int lrow = lane & 7, lmat = lane >> 3;
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (kt + STAGES - 1 < k_tiles) load_slice((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
    cp_async_commit();

    const T* a_st = sA + (kt % STAGES) * S::A_ELEMS;
    const T* b_st = sB + (kt % STAGES) * S::B_ELEMS;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t a[MI][4], b[NI][2];
      // A matrices 0..3: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        const int r = wm * WM + mi * 16 + lrow + (lmat & 1) * 8;
        ldmatrix_x4(a[mi], a_st + r * S::A_LD + kk + (lmat >> 1) * 8);
      }
      // B for two n8 tiles: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
#pragma unroll
      for (int ni = 0; ni < NI; ni += 2) {
        uint32_t r[4];
        if constexpr (kNN) {
          const int k = kk + lrow + (lmat & 1) * 8, n = wn * WN + ni * 8 + (lmat >> 1) * 8;
          ldmatrix_x4_trans(r, b_st + k * S::B_LD + n);
        } else {
          const int n = wn * WN + ni * 8 + lrow + (lmat >> 1) * 8, k = kk + (lmat & 1) * 8;
          ldmatrix_x4(r, b_st + n * S::B_LD + k);
        }
        b[ni][0] = r[0];
        b[ni][1] = r[1];
        b[ni + 1][0] = r[2];
        b[ni + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma_m16n8k16<T>(acc[mi][ni], a[mi], b[ni]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring is free from here on (column-sum scratch)

  // Epilogue: accumulator (mi, ni) element e sits at row g (+8 for e >= 2), columns 2t, 2t + 1.
  const int g = lane >> 2, t = lane & 3;
  float colsum[NI][2];
#pragma unroll
  for (int ni = 0; ni < NI; ++ni) colsum[ni][0] = colsum[ni][1] = 0.f;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = m0 + wm * WM + mi * 16 + g + h * 8;
      if (row >= M) continue;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int col = n0 + wn * WN + ni * 8 + 2 * t;
        if (col < N) epi(row, col, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1], colsum[ni]);
      }
    }
  }

  if constexpr (Epi::kColSums) {
    if (epi.col_partial != nullptr) {
      // Sum over the 8 lanes sharing t (the rows g), then over the WARPS_M warps of a column, in order.
      float* red = reinterpret_cast<float*>(smem);  // (WARPS_M, BN)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          float s = colsum[ni][j];
          s += __shfl_xor_sync(0xffffffffu, s, 4);
          s += __shfl_xor_sync(0xffffffffu, s, 8);
          s += __shfl_xor_sync(0xffffffffu, s, 16);
          if (g == 0) red[wm * BN + wn * WN + ni * 8 + 2 * t + j] = s;
        }
      }
      __syncthreads();
      for (int c = tid; c < BN; c += THREADS) {
        if (n0 + c >= N) continue;
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < Cfg::WARPS_M; ++w) s += red[w * BN + c];
        epi.col_partial[static_cast<int64_t>(blockIdx.x) * N + n0 + c] = s;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Element-wise kernels of the backward
// ---------------------------------------------------------------------------------------------
constexpr int kEwThreads = 256;

// dz = dy * Z (stored when dz != nullptr) and the column sums of the rounded dz over the rows of
// chunk blockIdx.y (written to partial[blockIdx.y, :] when partial != nullptr). A thread owns a
// column pair; consecutive threads read consecutive pairs of a row.
template <typename T>
__global__ void dropout_colsum_kernel(const T* __restrict__ dy,  // (M, N)
                                      T* __restrict__ dz,        // (M, N) or nullptr
                                      float* __restrict__ partial,  // (chunks, N) or nullptr
                                      int64_t M, int N, int64_t rows_per_chunk, DropoutParams dropout) {
  const int col = 2 * (blockIdx.x * blockDim.x + threadIdx.x);
  if (col >= N) return;
  const int64_t r0 = blockIdx.y * rows_per_chunk, r1 = std::min(M, r0 + rows_per_chunk);
  float s0 = 0.f, s1 = 0.f;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t at = r * N + col;
    float v0 = to_float(dy[at]), v1 = to_float(dy[at + 1]);
    if (dz != nullptr) {
      float z0, z1;
      dropout_pair(dropout, static_cast<uint64_t>(at), z0, z1);
      const T q0 = from_float<T>(v0 * z0), q1 = from_float<T>(v1 * z1);
      store_pair(dz + at, q0, q1);
      v0 = to_float(q0);
      v1 = to_float(q1);
    }
    s0 += v0;
    s1 += v1;
  }
  if (partial != nullptr) {
    partial[blockIdx.y * int64_t{N} + col] = s0;
    partial[blockIdx.y * int64_t{N} + col + 1] = s1;
  }
}

// out[c] = sum_j partial[j, c], j in order: one thread per column.
template <typename T>
__global__ void colsum_reduce_kernel(const float* __restrict__ partial,  // (rows, N)
                                     int64_t rows, int N, T* __restrict__ out) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= N) return;
  float s = 0.f;
  for (int64_t j = 0; j < rows; ++j) s += partial[j * N + col];
  out[col] = from_float<T>(s);
}

// ---------------------------------------------------------------------------------------------
// Host launchers (raw pointers, a stream)
// ---------------------------------------------------------------------------------------------
using cuda::Launch;
using cuda::TileChoice;
using cuda::use_large_tile;
static_assert(TileLarge::BM == cuda::kLargeBM && TileLarge::BN == cuda::kLargeBN && TileSmall::BM == cuda::kSmallBM,
              "gelu_ffn_cuda.h's tile sizes");

template <typename T, class Cfg, bool kNN, class Epi>
void launch_gemm_tile(const T* A, const T* B, int64_t M, int N, int K, const Epi& epi, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((M + Cfg::BM - 1) / Cfg::BM), static_cast<unsigned>((N + Cfg::BN - 1) / Cfg::BN));
  ff::simt::launch(gemm_kernel<T, Cfg, kNN, Epi>, grid, dim3(Cfg::THREADS), Smem<Cfg, kNN>::BYTES, stream, A, B, M, N,
                   K, epi);
}

// C = A B with the epilogue; NT: B is (N, K), NN: B is (K, N). K, N multiples of 8.
template <typename T, bool kNN, class Epi>
void gemm(const T* A, const T* B, int64_t M, int N, int K, const Epi& epi, const Launch& l) {
  if (use_large_tile(M, N, l)) {
    launch_gemm_tile<T, TileLarge, kNN>(A, B, M, N, K, epi, l.stream);
  } else {
    launch_gemm_tile<T, TileSmall, kNN>(A, B, M, N, K, epi, l.stream);
  }
}

template <typename T>
void dropout_colsum(const T* dy, T* dz, float* partial, int64_t M, int N, int64_t chunks, int64_t rows_per_chunk,
                    const DropoutParams& dropout, cudaStream_t stream) {
  const int pairs = N / 2;
  const dim3 grid(static_cast<unsigned>((pairs + kEwThreads - 1) / kEwThreads), static_cast<unsigned>(chunks));
  ff::simt::launch(dropout_colsum_kernel<T>, grid, dim3(kEwThreads), 0, stream, dy, dz, partial, M, N, rows_per_chunk,
                   dropout);
}

template <typename T>
void colsum_reduce(const float* partial, int64_t rows, int N, T* out, cudaStream_t stream) {
  ff::simt::launch(colsum_reduce_kernel<T>, dim3(static_cast<unsigned>((N + kEwThreads - 1) / kEwThreads)),
                   dim3(kEwThreads), 0, stream, partial, rows, N, out);
}

}  // namespace ff::gelu_ffn::tc
