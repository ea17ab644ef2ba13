// The warp-level primitives the tensor-core kernels use, behind one small interface with two
// implementations:
//   * nvcc (the real one): inline PTX — mma.sync, ldmatrix, cp.async — and the <<<>>> launch;
//   * a host emulation (simt/simt_emu.h, selected by -DFF_SIMT_EMULATION and a plain C++
//     compiler): every CUDA thread is a fiber, warps and blocks meet at their collectives, and the
//     tensor-core instructions are computed from the PTX fragment layouts. The tests build the very
//     same kernel templates that way and run them on CPU tensors (tests/emu/), so the kernels'
//     index arithmetic, masking, dropout and fragment bookkeeping are checked on machines without
//     a GPU.
//
// Kernels written against this header may use plain CUDA for everything else (threadIdx,
// blockIdx, blockDim, gridDim, __syncthreads, __syncwarp, __shfl_xor_sync, __shfl_sync,
// atomicAdd on float, the float math functions and intrinsics such as __expf / exp2f / erff,
// half / bfloat16 conversions); the emulation provides host versions of those. They may not use
// static __shared__ arrays: shared memory is the dynamic buffer FF_DYNAMIC_SMEM names.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16" and "ldmatrix"), with
// g = lane / 4 and t = lane % 4:
//   A (16 x 16, row-major), 4 registers of 2 elements: a[0] = A[g][2t..2t+1],
//     a[1] = A[g+8][2t..2t+1], a[2] = A[g][2t+8..2t+9], a[3] = A[g+8][2t+8..2t+9]
//   B (16 x 8, k x n, "col"), 2 registers: b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]
//   C / D (16 x 8 float): c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1]
//   ldmatrix .x4: lanes 8i..8i+7 give the row addresses (16 bytes each) of 8 x 8 matrix i; lane l
//     receives in r[i] the elements (l / 4, 2 (l % 4) .. +1) of matrix i; with .trans, the
//     elements (2 (l % 4) .. +1, l / 4), i.e. of the transposed matrix. .x2: lanes 0..15 give
//     the addresses of matrices 0 and 1.
#pragma once
#include <cstddef>
#include <cstdint>
#include <utility>

#ifdef FF_SIMT_EMULATION
#include "simt/simt_emu.h"
#else

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <c10/cuda/CUDAException.h>

// `T* name` pointing at the block's dynamic shared memory (16-byte aligned).
#define FF_DYNAMIC_SMEM(T, name)                                  \
  extern __shared__ __align__(16) unsigned char ff_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(ff_dynamic_smem_)

namespace ff::simt {

// D += A * B for one m16n8k16 tile; T is __half or __nv_bfloat16 (the type of A and B).
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                            const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// `row` is this lane's row address (see the layout note above); it must be 16-byte aligned shared memory.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(row)));
}

// 16-byte asynchronous copy global -> shared (both 16-byte aligned). With pred false nothing is
// read and the 16 bytes are zero-filled; `src` must still be a valid address (pass the tensor base).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool pred) {
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Two floats rounded to T and packed into one 32-bit register (lo in the low half), the operand
// format of mma.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// Launch `kernel` (a __global__ function) on `stream`, opting into more than 48 KiB of dynamic
// shared memory when asked, and check the launch.
template <typename... KArgs, typename... Args>
inline void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                   Args&&... args) {
  if (smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_bytes)));
  }
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace ff::simt

#endif  // FF_SIMT_EMULATION
