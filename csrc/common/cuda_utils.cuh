// CUDA helpers: the dtype switch over device types, dtype conversion, 16-byte vector access, warp
// and block reductions. Compiled by a host compiler with -DFF_SIMT_EMULATION, the CUDA built-ins
// come from the SIMT emulation (simt/simt_emu.h, through simt.cuh).
#pragma once
#ifdef FF_SIMT_EMULATION
#include "simt/simt.cuh"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <c10/cuda/CUDAException.h>
#endif

#include "common/dtype.h"

namespace ff::cuda {

// The device type the kernels use for a CPU element type: __half for c10::Half, __nv_bfloat16 for
// c10::BFloat16, float for float.
template <typename T>
struct DeviceType {
  using type = T;
};
template <>
struct DeviceType<c10::Half> {
  using type = __half;
};
template <>
struct DeviceType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// common/dtype.h's visit_dtype, calling f(TypeTag<T>{}) with the device type T (float, __half,
// __nv_bfloat16) of dtype t among Set's; a TypeError naming op otherwise. Host code.
template <typename Set = FloatDtypes, typename F>
decltype(auto) visit_device_dtype(c10::ScalarType t, const char* op, F&& f) {
  return visit_dtype<Set>(t, op, [&]<typename T>(TypeTag<T>) -> decltype(auto) {
    return f(TypeTag<typename DeviceType<T>::type>{});
  });
}

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// VEC elements of T packed into one aligned load/store (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <int VEC, typename T>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(pk.v[i]);
}

template <int VEC, typename T>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pk.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 floats of shared memory; the call ends with a barrier so it can be reused.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = lane < nwarps ? scratch[lane] : 0.f;
  total = warp_sum(total);
  __syncthreads();
  return total;
}

}  // namespace ff::cuda

#ifdef FF_SIMT_EMULATION
#define FF_CUDA_CHECK_LAUNCH() ((void)0)  // the emulated launch is synchronous and throws on errors
#else
#define FF_CUDA_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()
#endif
