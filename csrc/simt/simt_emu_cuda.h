// SIMT host emulation (simt_emu.h): the interface of simt.cuh and the CUDA built-ins host code
// sees (threadIdx, __syncthreads, shuffles, atomics, intrinsics) on top of the emulated runtime.
// Included by simt_emu.h only, at its end.
#pragma once

// ---------------------------------------------------------------------------------------------
// The interface of simt.cuh

#define FF_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::ff::simt::emu::dynamic_smem())

#define FF_SIMT_SITE_PARAMS const char *ff_file_ = __builtin_FILE(), int ff_line_ = __builtin_LINE()
#define FF_SIMT_SITE ::ff::simt::emu::Site{ff_file_, ff_line_}

namespace ff::simt {

// D += A * B for one m16n8k16 tile; T is __half or __nv_bfloat16 (the type of A and B).
template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], FF_SIMT_SITE_PARAMS) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "mma_m16n8k16: T is __half or __nv_bfloat16");
  emu::Thread& t = emu::self();
  t.out = d;
  t.in_a = a;
  t.in_b = b;
  emu::warp_arrive(std::is_same_v<T, __half> ? emu::Coll::MmaF16 : emu::Coll::MmaBF16, 0xffffffffu, FF_SIMT_SITE);
}

namespace emu {
template <int N>
inline void ldmatrix(Coll kind, uint32_t* r, const void* row, Site site) {
  Thread& t = self();
  t.out = r;
  t.in_a = row;
  warp_arrive(kind, 0xffffffffu, site);
}
}  // namespace emu

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, FF_SIMT_SITE_PARAMS) {
  emu::ldmatrix<4>(emu::Coll::LdmX4, r, row, FF_SIMT_SITE);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row, FF_SIMT_SITE_PARAMS) {
  emu::ldmatrix<4>(emu::Coll::LdmX4T, r, row, FF_SIMT_SITE);
}
inline void ldmatrix_x2(uint32_t (&r)[2], const void* row, FF_SIMT_SITE_PARAMS) {
  emu::ldmatrix<2>(emu::Coll::LdmX2, r, row, FF_SIMT_SITE);
}
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row, FF_SIMT_SITE_PARAMS) {
  emu::ldmatrix<2>(emu::Coll::LdmX2T, r, row, FF_SIMT_SITE);
}

// 16-byte asynchronous copy global -> shared; the bytes land at the cp_async_wait that retires the group.
inline void cp_async_16(void* dst, const void* src, bool pred, FF_SIMT_SITE_PARAMS) {
  emu::cp_async_issue(dst, src, pred, FF_SIMT_SITE);
}
inline void cp_async_commit() { emu::cp_async_commit_group(); }
template <int N>
inline void cp_async_wait() {
  emu::cp_async_wait_groups(N);
}

template <typename T>
inline uint32_t pack2(float lo, float hi) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "pack2: T is __half or __nv_bfloat16");
  uint16_t l, h;
  if constexpr (std::is_same_v<T, __half>) {
    l = __half_as_ushort(__float2half_rn(lo));
    h = __half_as_ushort(__float2half_rn(hi));
  } else {
    l = __bfloat16_as_ushort(__float2bfloat16_rn(lo));
    h = __bfloat16_as_ushort(__float2bfloat16_rn(hi));
  }
  return static_cast<uint32_t>(l) | static_cast<uint32_t>(h) << 16;
}

// Runs the grid to completion on the calling thread (see the header comment); `stream` is ignored.
template <typename... KArgs, typename Stream, typename... Args>
inline void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, Stream /*stream*/,
                   Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "launch: wrong number of kernel arguments");
  // Converted once, as the real launch converts the arguments into the parameter buffer; every
  // thread then gets its own copy.
  std::tuple<std::decay_t<KArgs>...> params(std::forward<Args>(args)...);
  struct Call {
    void (*kernel)(KArgs...);
    std::tuple<std::decay_t<KArgs>...>* params;
    static void run(void* self) {
      auto* c = static_cast<Call*>(self);
      std::apply(c->kernel, *c->params);
    }
  } call{kernel, &params};
  static const std::string signature = emu::demangled_type(typeid(kernel).name());
  emu::run_grid(reinterpret_cast<const void*>(kernel), signature.c_str(), grid, block, smem_bytes, &Call::run, &call);
}

}  // namespace ff::simt

// ---------------------------------------------------------------------------------------------
// CUDA built-ins for host code

#define threadIdx (::ff::simt::emu::self().tid)
#define blockIdx (::ff::simt::emu::runtime().block_idx)
#define blockDim (::ff::simt::emu::runtime().block)
#define gridDim (::ff::simt::emu::runtime().grid)
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

constexpr int warpSize = 32;

inline void __syncthreads(FF_SIMT_SITE_PARAMS) { ::ff::simt::emu::syncthreads(FF_SIMT_SITE); }
inline void __syncwarp(unsigned mask = 0xffffffffu, FF_SIMT_SITE_PARAMS) {
  ::ff::simt::emu::self().out = nullptr;
  ::ff::simt::emu::warp_arrive(::ff::simt::emu::Coll::SyncWarp, mask, FF_SIMT_SITE);
}
inline void __threadfence_block() {}
inline void __threadfence() {}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32, FF_SIMT_SITE_PARAMS) {
  return ::ff::simt::emu::shuffle(::ff::simt::emu::Coll::ShflXor, mask, var, laneMask, width, FF_SIMT_SITE);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32, FF_SIMT_SITE_PARAMS) {
  return ::ff::simt::emu::shuffle(::ff::simt::emu::Coll::ShflIdx, mask, var, srcLane, width, FF_SIMT_SITE);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, FF_SIMT_SITE_PARAMS) {
  return ::ff::simt::emu::shuffle(::ff::simt::emu::Coll::ShflUp, mask, var, static_cast<int>(delta), width,
                                  FF_SIMT_SITE);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, FF_SIMT_SITE_PARAMS) {
  return ::ff::simt::emu::shuffle(::ff::simt::emu::Coll::ShflDown, mask, var, static_cast<int>(delta), width,
                                  FF_SIMT_SITE);
}
inline unsigned __ballot_sync(unsigned mask, int pred, FF_SIMT_SITE_PARAMS) {
  return ::ff::simt::emu::vote(::ff::simt::emu::Coll::Ballot, mask, pred, FF_SIMT_SITE);
}
inline int __any_sync(unsigned mask, int pred, FF_SIMT_SITE_PARAMS) {
  return static_cast<int>(::ff::simt::emu::vote(::ff::simt::emu::Coll::Any, mask, pred, FF_SIMT_SITE));
}
inline int __all_sync(unsigned mask, int pred, FF_SIMT_SITE_PARAMS) {
  return static_cast<int>(::ff::simt::emu::vote(::ff::simt::emu::Coll::All, mask, pred, FF_SIMT_SITE));
}

// Atomics: fibers of one launch never run concurrently, so a plain read-modify-write is atomic.
inline float atomicAdd(float* p, float v) { float o = *p; *p = o + v; return o; }
inline double atomicAdd(double* p, double v) { double o = *p; *p = o + v; return o; }
inline int atomicAdd(int* p, int v) { int o = *p; *p = o + v; return o; }
inline unsigned atomicAdd(unsigned* p, unsigned v) { unsigned o = *p; *p = o + v; return o; }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  unsigned long long o = *p; *p = o + v; return o;
}
inline int atomicMax(int* p, int v) { int o = *p; *p = o > v ? o : v; return o; }
inline int atomicMin(int* p, int v) { int o = *p; *p = o < v ? o : v; return o; }
inline int atomicExch(int* p, int v) { int o = *p; *p = v; return o; }
inline int atomicCAS(int* p, int cmp, int v) { int o = *p; if (o == cmp) *p = v; return o; }
inline unsigned atomicCAS(unsigned* p, unsigned cmp, unsigned v) { unsigned o = *p; if (o == cmp) *p = v; return o; }

// Math intrinsics. glibc declares __expf & co. itself (as aliases of its own functions), so those
// are macros; the emulation computes them with the accurate library function (the GPU's are approximate).
#define __expf(x) ::std::exp(static_cast<float>(x))
#define __logf(x) ::std::log(static_cast<float>(x))
#define __log2f(x) ::std::log2(static_cast<float>(x))
#define __sinf(x) ::std::sin(static_cast<float>(x))
#define __cosf(x) ::std::cos(static_cast<float>(x))
#define __tanf(x) ::std::tan(static_cast<float>(x))
#define __powf(x, y) ::std::pow(static_cast<float>(x), static_cast<float>(y))
#define __exp10f(x) ::std::pow(10.f, static_cast<float>(x))
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.f / std::sqrt(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __saturatef(float x) { return x > 0.f ? (x < 1.f ? x : 1.f) : 0.f; }  // NaN -> 0
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline int __float_as_int(float x) { int u; std::memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned u) { float x; std::memcpy(&x, &u, 4); return x; }
inline float __int_as_float(int u) { float x; std::memcpy(&x, &u, 4); return x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
// Byte n of the result is byte (s >> 4n) & 7 of the eight bytes y:x (x the low four). Selector
// nibbles with their top bit set (sign replication in PTX's prmt) are not emulated: an error.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  if (s & 0x8888u) throw std::runtime_error("simt emulation: __byte_perm selector nibbles above 7 are not emulated");
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  unsigned r = 0;
  for (int n = 0; n < 4; ++n) r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * n)) & 7))) & 0xFF) << (8 * n);
  return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t(a) * b) >> 32); }
template <typename T>
inline T __ldg(const T* p) { return *p; }

// CUDA's integer/float min and max overloads (C++ host code has only std::min/std::max).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(int a, unsigned b) { return min(static_cast<unsigned>(a), b); }
inline unsigned max(int a, unsigned b) { return max(static_cast<unsigned>(a), b); }
inline unsigned min(unsigned a, int b) { return min(a, static_cast<unsigned>(b)); }
inline unsigned max(unsigned a, int b) { return max(a, static_cast<unsigned>(b)); }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline double min(float a, double b) { return std::fmin(double(a), b); }
inline double max(float a, double b) { return std::fmax(double(a), b); }
inline double min(double a, float b) { return std::fmin(a, double(b)); }
inline double max(double a, float b) { return std::fmax(a, double(b)); }
