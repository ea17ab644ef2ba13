// attention on CUDA GPUs: the tile machinery the kernels of attention_cuda.cuh share — tile sizes
// per head-dim bucket, 16-byte cp.async tile copies, ldmatrix fragment addressing and the
// warp-level mma products (mma.sync m16n8k16, float32 accumulators). Written against simt/simt.cuh
// only, so it runs on the host emulator too; the layouts are described in attention_cuda.cuh.
#pragma once
#include <cstdint>

#include "simt/simt.cuh"

#include "attention/attention_cuda_config.h"
#include "common/cuda_utils.cuh"

namespace ff::attention::gpu {

constexpr int kThreads = 128;  // 4 warps per CTA in the tensor-core kernels but the DP 128 forward (Tiles::kFwdWarps)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Tiles<DP>, head_dim_bucket: attention_cuda_config.h.

using ff::cuda::to_float;  // common/cuda_utils.cuh: the one dtype conversion and warp sum
using ff::cuda::warp_sum;

template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float lo, float hi) {
  *reinterpret_cast<uint32_t*>(dst) = ff::simt::pack2<T>(lo, hi);
}

// ---------------------------------------------------------------------------------------------
// Tiles and fragments
// ---------------------------------------------------------------------------------------------
// cp.async of ROWS x DP elements of a row-major global matrix (row stride `stride`) into a smem
// tile of row stride DP + 8, by the CTA's NTHREADS threads; rows >= nrows and columns >= ncols are
// zero-filled.
template <int ROWS, int DP, int NTHREADS = kThreads, typename T>
__device__ __forceinline__ void load_tile_async(T* s, const T* g, int64_t stride, int nrows, int ncols) {
  constexpr int kChunks = DP / 8;
  for (int c = threadIdx.x; c < ROWS * kChunks; c += NTHREADS) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool ok = r < nrows && col < ncols;
    ff::simt::cp_async_16(s + r * (DP + 8) + col, ok ? g + r * stride + col : g, ok);
  }
}

// This lane's ldmatrix .x4 row address for the 16 x 16 block at (r0, c0) in the order
// (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15):
// the A operand without .trans; with .trans, the B operand of two n-tiles (c0, c0 + 8) of a
// matrix stored (k, n), registers {0, 1} and {2, 3}.
template <int LD, typename T>
__device__ __forceinline__ const T* frag_rows16(const T* s, int r0, int c0, int lane) {
  return s + (r0 + (lane & 15)) * LD + c0 + ((lane >> 4) << 3);
}
// The order (rows 0-7, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 0-7), (rows 8-15,
// cols 8-15): without .trans, the B operand of two n-tiles (r0, r0 + 8) of a matrix stored
// (n, k); with .trans, the A operand of a matrix stored transposed, (k, m).
template <int LD, typename T>
__device__ __forceinline__ const T* frag_rows8x2(const T* s, int r0, int c0, int lane) {
  return s + (r0 + (lane & 7) + ((lane >> 4) << 3)) * LD + c0 + (((lane >> 3) & 1) << 3);
}

// The mma A fragments of rows 0..15 of a row-major global matrix (row stride `stride`), read
// straight into registers (the layout ldmatrix_x4 with frag_rows16 gives): a[kk] holds columns
// 16kk..16kk+15; rows >= nrows and columns >= ncols (a multiple of 8) are zero.
template <int KF, typename T>
__device__ __forceinline__ void load_a_frags(uint32_t (&a)[KF][4], const T* g, int64_t stride, int nrows, int ncols,
                                             int lane) {
  const int r = lane >> 2, c = 2 * (lane & 3);
#pragma unroll
  for (int kk = 0; kk < KF; ++kk) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // (row, column) = (r, c), (r + 8, c), (r, c + 8), (r + 8, c + 8)
      const int row = r + 8 * (i & 1), col = kk * 16 + c + 8 * (i >> 1);
      a[kk][i] = row < nrows && col < ncols ? *reinterpret_cast<const uint32_t*>(g + row * stride + col) : 0u;
    }
  }
}

// acc (16 x 8NT) += A B^T for one warp: A = rows a0..a0+15 of sA, B = rows 0..8NT-1 of sB, both
// stored (row, k) with k < kdim (rounded up to 16; the padding columns are zero).
template <typename T, int NT, int KMAX, int LDA, int LDB>
__device__ __forceinline__ void mma_abt(float (&acc)[NT][4], const T* sA, int a0, const T* sB, int kdim, int lane) {
#pragma unroll
  for (int kk = 0; kk < KMAX / 16; ++kk) {
    if (kk * 16 >= kdim) break;
    uint32_t a[4];
    ff::simt::ldmatrix_x4(a, frag_rows16<LDA>(sA, a0, kk * 16, lane));
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t r[4];
      ff::simt::ldmatrix_x4(r, frag_rows8x2<LDB>(sB, np * 16, kk * 16, lane));
      const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
      ff::simt::mma_m16n8k16<T>(acc[2 * np], a, b0);
      ff::simt::mma_m16n8k16<T>(acc[2 * np + 1], a, b1);
    }
  }
}

// The same with A held in registers: a[kk] is the fragment of columns 16kk..16kk+15.
template <typename T, int NT, int KF, int LDB>
__device__ __forceinline__ void mma_abt(float (&acc)[NT][4], const uint32_t (&a)[KF][4], const T* sB, int kdim,
                                        int lane) {
#pragma unroll
  for (int kk = 0; kk < KF; ++kk) {
    if (kk * 16 >= kdim) break;
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t r[4];
      ff::simt::ldmatrix_x4(r, frag_rows8x2<LDB>(sB, np * 16, kk * 16, lane));
      const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
      ff::simt::mma_m16n8k16<T>(acc[2 * np], a[kk], b0);
      ff::simt::mma_m16n8k16<T>(acc[2 * np + 1], a[kk], b1);
    }
  }
}

// The mma A fragments of a float32 accumulator tile C (16 x 8KT) rounded to T, in registers (the
// C-fragment to A-fragment identity): a[kk] holds columns 16kk..16kk+15.
template <typename T, int KT>
__device__ __forceinline__ void pack_a(uint32_t (&a)[KT / 2][4], const float (&c)[KT][4]) {
#pragma unroll
  for (int kk = 0; kk < KT / 2; ++kk) {
    a[kk][0] = ff::simt::pack2<T>(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = ff::simt::pack2<T>(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = ff::simt::pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = ff::simt::pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

// acc (16 x 8NT) += A B for one 16-wide k block kk: `a` is A's fragment, B = rows 16kk..16kk+15 of
// sB stored (k, n), n < ndim (rounded up to 16).
template <typename T, int NT, int LDB>
__device__ __forceinline__ void mma_kblock(float (&acc)[NT][4], const uint32_t (&a)[4], const T* sB, int kk, int ndim,
                                           int lane) {
#pragma unroll
  for (int np = 0; np < NT / 2; ++np) {
    if (np * 16 >= ndim) break;
    uint32_t r[4];
    ff::simt::ldmatrix_x4_trans(r, frag_rows16<LDB>(sB, kk * 16, np * 16, lane));
    const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
    ff::simt::mma_m16n8k16<T>(acc[2 * np], a, b0);
    ff::simt::mma_m16n8k16<T>(acc[2 * np + 1], a, b1);
  }
}

// acc (16 x 8NT) += A B for one warp: A (16 x 16KF) as fragments in registers (pack_a); B = rows
// 0..16KF-1 of sB stored (k, n), n < ndim (rounded up to 16).
template <typename T, int NT, int KF, int LDB>
__device__ __forceinline__ void mma_ab(float (&acc)[NT][4], const uint32_t (&a)[KF][4], const T* sB, int ndim,
                                       int lane) {
#pragma unroll
  for (int kk = 0; kk < KF; ++kk) mma_kblock<T, NT, LDB>(acc, a[kk], sB, kk, ndim, lane);
}

// acc (16 x 8NT) += C B for one warp: C (16 x 8KT) is a float32 accumulator tile, rounded to T
// and reused as the A operand in registers, one k block at a time; B = rows 0..8KT-1 of sB stored
// (k, n), n < ndim (rounded up to 16).
template <typename T, int NT, int KT, int LDB>
__device__ __forceinline__ void mma_cb(float (&acc)[NT][4], const float (&c)[KT][4], const T* sB, int ndim,
                                       int lane) {
#pragma unroll
  for (int kk = 0; kk < KT / 2; ++kk) {
    const uint32_t a[4] = {ff::simt::pack2<T>(c[2 * kk][0], c[2 * kk][1]),
                           ff::simt::pack2<T>(c[2 * kk][2], c[2 * kk][3]),
                           ff::simt::pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]),
                           ff::simt::pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3])};
    mma_kblock<T, NT, LDB>(acc, a, sB, kk, ndim, lane);
  }
}

}  // namespace ff::attention::gpu
