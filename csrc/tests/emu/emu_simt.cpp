// Kernels that exercise the SIMT emulator (simt/simt_emu.h) one primitive at a time, exported to
// tests/emu/test_simt_emu.py. Built only by tests/emu/emu_build.py (host compiler, -DFF_SIMT_EMULATION).
// The kernels are plain CUDA against simt.cuh and know nothing of fragment layouts: the tests pass
// in per-lane registers and check per-lane results against expectations they derive from the PTX
// ISA themselves.
#include <torch/extension.h>

#include "common/cuda_utils.cuh"
#include "common/philox.h"
#include "simt/simt.cuh"

// A named namespace (not an anonymous one) so the kernels are exported symbols and the emulator's
// error messages can name them.
namespace emu_simt_test {

using ff::simt::launch;

uint32_t* u32(at::Tensor& t) { return reinterpret_cast<uint32_t*>(t.data_ptr<int32_t>()); }
const uint32_t* u32(const at::Tensor& t) { return reinterpret_cast<const uint32_t*>(t.data_ptr<int32_t>()); }

void check_i32(const at::Tensor& t, int64_t rows, int64_t cols, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt && t.is_contiguous() && t.dim() == 2 && t.size(0) == rows &&
                  t.size(1) == cols,
              name, " must be a contiguous int32 tensor of shape [", rows, ", ", cols, "]");
}

// ---- mma: one warp, registers in, registers out --------------------------------------------------

template <typename T>
__global__ void mma_kernel(const uint32_t* a, const uint32_t* b, const float* c, float* d, int repeat) {
  const int lane = threadIdx.x;
  uint32_t ra[4], rb[2];
  float acc[4];
  for (int i = 0; i < 4; ++i) ra[i] = a[lane * 4 + i], acc[i] = c[lane * 4 + i];
  for (int i = 0; i < 2; ++i) rb[i] = b[lane * 2 + i];
  for (int r = 0; r < repeat; ++r) ff::simt::mma_m16n8k16<T>(acc, ra, rb);
  for (int i = 0; i < 4; ++i) d[lane * 4 + i] = acc[i];
}

// a: [32, 4] int32 registers, b: [32, 2], c: [32, 4] float -> d [32, 4]; D = A B + C applied `repeat` times.
at::Tensor mma(at::Tensor a, at::Tensor b, at::Tensor c, bool bf16, int64_t repeat) {
  check_i32(a, 32, 4, "a");
  check_i32(b, 32, 2, "b");
  TORCH_CHECK(c.scalar_type() == at::kFloat && c.is_contiguous() && c.numel() == 128, "c: float [32, 4]");
  at::Tensor d = at::empty_like(c);
  auto k = bf16 ? &mma_kernel<__nv_bfloat16> : &mma_kernel<__half>;
  launch(k, dim3(1), dim3(32), 0, nullptr, u32(a), u32(b), c.data_ptr<float>(), d.data_ptr<float>(),
         static_cast<int>(repeat));
  return d;
}

// Throughput: `warps` warps, each running ldmatrix x4 + x2.trans + one mma `iters` times on shared memory.
__global__ void mma_loop_kernel(float* out, int iters) {
  FF_DYNAMIC_SMEM(__half, sm);
  for (int i = threadIdx.x; i < 64 * 64; i += blockDim.x) sm[i] = __float2half_rn(static_cast<float>(i % 7) - 3.f);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int it = 0; it < iters; ++it) {
    uint32_t a[4], b[2];
    ff::simt::ldmatrix_x4(a, sm + (lane % 16) * 64 + (lane / 16) * 8);
    ff::simt::ldmatrix_x2_trans(b, sm + (lane % 16) * 64 + 32);
    ff::simt::mma_m16n8k16<__half>(acc, a, b);
  }
  out[threadIdx.x] = acc[0] + acc[1] + acc[2] + acc[3];
}

at::Tensor mma_loop(int64_t warps, int64_t iters) {
  at::Tensor out = at::empty({warps * 32}, at::kFloat);
  launch(&mma_loop_kernel, dim3(1), dim3(static_cast<unsigned>(warps * 32)), 64 * 64 * sizeof(__half), nullptr,
         out.data_ptr<float>(), static_cast<int>(iters));
  return out;
}

// ---- ldmatrix: shared memory image and per-lane row offsets in, registers out --------------------

__global__ void ldmatrix_kernel(const uint16_t* image, int n, const int* row_offsets, uint32_t* r, int variant) {
  FF_DYNAMIC_SMEM(uint16_t, sm);
  for (int i = threadIdx.x; i < n; i += blockDim.x) sm[i] = image[i];
  __syncthreads();
  const int lane = threadIdx.x;
  const uint16_t* row = sm + row_offsets[lane];
  uint32_t x4[4] = {0, 0, 0, 0}, x2[2] = {0, 0};
  switch (variant) {
    case 0: ff::simt::ldmatrix_x4(x4, row); break;
    case 1: ff::simt::ldmatrix_x4_trans(x4, row); break;
    case 2: ff::simt::ldmatrix_x2(x2, row); break;
    case 3: ff::simt::ldmatrix_x2_trans(x2, row); break;
  }
  for (int i = 0; i < 4; ++i) r[lane * 4 + i] = variant < 2 ? x4[i] : (i < 2 ? x2[i] : 0u);
}

// image: int16 [n] (n a multiple of 8), row_offsets: int32 [32] element offsets; variant 0 x4,
// 1 x4.trans, 2 x2, 3 x2.trans -> [32, 4] int32 (x2 fills columns 0-1).
at::Tensor ldmatrix(at::Tensor image, at::Tensor row_offsets, int64_t variant) {
  TORCH_CHECK(image.scalar_type() == at::kShort && image.is_contiguous() && image.numel() % 8 == 0, "image");
  TORCH_CHECK(row_offsets.scalar_type() == at::kInt && row_offsets.numel() == 32, "row_offsets");
  at::Tensor r = at::zeros({32, 4}, at::kInt);
  const int n = static_cast<int>(image.numel());
  launch(&ldmatrix_kernel, dim3(1), dim3(32), n * sizeof(uint16_t), nullptr,
         reinterpret_cast<const uint16_t*>(image.data_ptr<int16_t>()), n, row_offsets.data_ptr<int>(), u32(r),
         static_cast<int>(variant));
  return r;
}

// ---- cp.async ---------------------------------------------------------------------------------

// Thread t owns 16 bytes (4 floats) of shared memory, first set to `old`. Group 0 copies src[4t..]
// (or zeros where !pred[t]); group 1 copies src2[4t..]. Reads are recorded (out[stage][4t..]):
// stage 0 before any wait, stage 1 after wait<1> (group 0 retired), stage 2 after wait<0>.
__global__ void cp_async_kernel(const float* src, const float* src2, const bool* pred, float old, float* out) {
  FF_DYNAMIC_SMEM(float, sm);
  const int t = threadIdx.x, n = blockDim.x;
  for (int i = 0; i < 4; ++i) sm[4 * t + i] = old;
  ff::simt::cp_async_16(sm + 4 * t, pred[t] ? src + 4 * t : src, pred[t]);
  ff::simt::cp_async_commit();
  ff::simt::cp_async_16(sm + 4 * (n + t), src2 + 4 * t, true);
  ff::simt::cp_async_commit();
  for (int i = 0; i < 4; ++i) out[4 * t + i] = sm[4 * t + i];
  ff::simt::cp_async_wait<1>();
  for (int i = 0; i < 4; ++i) out[4 * (n + t) + i] = sm[4 * t + i], out[4 * (2 * n + t) + i] = sm[4 * (n + t) + i];
  ff::simt::cp_async_wait<0>();
  for (int i = 0; i < 4; ++i) out[4 * (3 * n + t) + i] = sm[4 * (n + t) + i];
}

// src, src2: float [threads, 4]; pred: bool [threads] -> [4, threads, 4]: group-0 slot before any
// wait, group-0 slot after wait<1>, group-1 slot after wait<1>, group-1 slot after wait<0>.
at::Tensor cp_async(at::Tensor src, at::Tensor src2, at::Tensor pred, double old) {
  const int n = static_cast<int>(pred.numel());
  at::Tensor out = at::empty({4, n, 4}, at::kFloat);
  launch(&cp_async_kernel, dim3(1), dim3(n), 2 * n * 16, nullptr, src.data_ptr<float>(), src2.data_ptr<float>(),
         pred.data_ptr<bool>(), static_cast<float>(old), out.data_ptr<float>());
  return out;
}

// ---- shuffles, reductions, atomics, built-ins -------------------------------------------------

// mode 0 xor, 1 idx, 2 up, 3 down: lane l shuffles value[l] with argument arg[l] and width `width`.
__global__ void shfl_kernel(const float* value, const int* arg, float* out, int mode, int width) {
  const int lane = threadIdx.x & 31;
  const float v = value[threadIdx.x];
  float r = 0.f;
  switch (mode) {
    case 0: r = __shfl_xor_sync(0xffffffffu, v, arg[lane], width); break;
    case 1: r = __shfl_sync(0xffffffffu, v, arg[lane], width); break;
    case 2: r = __shfl_up_sync(0xffffffffu, v, static_cast<unsigned>(arg[lane]), width); break;
    case 3: r = __shfl_down_sync(0xffffffffu, v, static_cast<unsigned>(arg[lane]), width); break;
  }
  out[threadIdx.x] = r;
}

at::Tensor shfl(at::Tensor value, at::Tensor arg, int64_t mode, int64_t width) {
  at::Tensor out = at::empty_like(value);
  launch(&shfl_kernel, dim3(1), dim3(static_cast<unsigned>(value.numel())), 0, nullptr, value.data_ptr<float>(),
         arg.data_ptr<int>(), out.data_ptr<float>(), static_cast<int>(mode), static_cast<int>(width));
  return out;
}

// Per (1-D) block: warp sums of its rows (out_warp[block][warp]) and the block sum (out_block[block]) via
// ff::cuda::warp_sum / block_sum; every block also atomicAdds its sum into *total.
__global__ void reduce_kernel(const float* x, float* out_warp, float* out_block, float* total) {
  FF_DYNAMIC_SMEM(float, scratch);
  const int nthreads = blockDim.x, t = threadIdx.x;
  const float v = x[blockIdx.x * nthreads + t];
  const float w = ff::cuda::warp_sum(v);
  if ((t & 31) == 0) out_warp[blockIdx.x * (nthreads / 32) + t / 32] = w;
  const float s = ff::cuda::block_sum(v, scratch);
  if (t == 0) {
    out_block[blockIdx.x] = s;
    atomicAdd(total, s);
  }
}

// x: float [blocks, threads] -> (warp sums [blocks, threads / 32], block sums [blocks], total [1]).
std::vector<at::Tensor> reduce(at::Tensor x) {
  const int blocks = static_cast<int>(x.size(0)), threads = static_cast<int>(x.size(1));
  at::Tensor ow = at::empty({blocks, threads / 32}, at::kFloat), ob = at::empty({blocks}, at::kFloat);
  at::Tensor total = at::zeros({1}, at::kFloat);
  launch(&reduce_kernel, dim3(blocks), dim3(threads),
         32 * sizeof(float), nullptr, x.data_ptr<float>(), ow.data_ptr<float>(), ob.data_ptr<float>(),
         total.data_ptr<float>());
  return {ow, ob, total};
}

// Every thread records (blockIdx, threadIdx, blockDim, gridDim) and the linear id of lane 0 of its
// warp (via __shfl_sync), so the test can check the warp composition.
__global__ void builtins_kernel(int* out) {
  const int nt = blockDim.x * blockDim.y * blockDim.z;
  const int lin = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  int* o = out + (b * nt + lin) * 10;
  const int lane0 = __shfl_sync(0xffffffffu, lin, 0);
  const int vals[10] = {static_cast<int>(blockIdx.x), static_cast<int>(blockIdx.y), static_cast<int>(blockIdx.z),
                        static_cast<int>(threadIdx.x), static_cast<int>(threadIdx.y), static_cast<int>(threadIdx.z),
                        static_cast<int>(blockDim.x * 10000 + blockDim.y * 100 + blockDim.z),
                        static_cast<int>(gridDim.x * 10000 + gridDim.y * 100 + gridDim.z), lane0,
                        static_cast<int>(__ballot_sync(0xffffffffu, lin % 3 == 0))};
  for (int i = 0; i < 10; ++i) o[i] = vals[i];
}

at::Tensor builtins(std::vector<int64_t> grid, std::vector<int64_t> block) {
  const int64_t nb = grid[0] * grid[1] * grid[2], nt = block[0] * block[1] * block[2];
  at::Tensor out = at::full({nb, nt, 10}, -1, at::kInt);
  launch(&builtins_kernel, dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]), 0, nullptr,
         out.data_ptr<int>());
  return out;
}

// Warp 1 reads what warp 0 wrote to shared memory, with or without a barrier in between.
__global__ void handoff_kernel(float* out, bool barrier) {
  FF_DYNAMIC_SMEM(float, sm);
  const int t = threadIdx.x;
  if (t < 32) sm[t] = static_cast<float>(t);
  if (barrier) __syncthreads();
  if (t >= 32) out[t - 32] = sm[t - 32];
}

at::Tensor handoff(bool barrier) {
  at::Tensor out = at::empty({32}, at::kFloat);
  launch(&handoff_kernel, dim3(1), dim3(64), 32 * sizeof(float), nullptr, out.data_ptr<float>(), barrier);
  return out;
}

// Reads shared memory nobody wrote.
__global__ void uninit_kernel(float* out) {
  FF_DYNAMIC_SMEM(float, sm);
  out[threadIdx.x] = sm[threadIdx.x];
}

at::Tensor uninit() {
  at::Tensor out = at::empty({32}, at::kFloat);
  launch(&uninit_kernel, dim3(1), dim3(32), 32 * sizeof(float), nullptr, out.data_ptr<float>());
  return out;
}

// Host and "device" Philox agree (philox.h compiles under the emulation).
__global__ void philox_kernel(ff::DropoutParams d, float* out) {
  out[threadIdx.x] = ff::dropout_multiplier(d, threadIdx.x);
}

at::Tensor philox(int64_t seed, int64_t offset, double p) {
  at::Tensor out = at::empty({64}, at::kFloat);
  launch(&philox_kernel, dim3(1), dim3(64), 0, nullptr, ff::make_dropout(p, seed, offset), out.data_ptr<float>());
  return out;
}

// __byte_perm(x, y, s) as the emulation computes it (the CUDA C++ programming guide's definition).
int64_t byte_perm(int64_t x, int64_t y, int64_t s) {
  return static_cast<int64_t>(
      __byte_perm(static_cast<unsigned>(x), static_cast<unsigned>(y), static_cast<unsigned>(s)));
}

// ---- kernels that are wrong; each case must make the launch throw -------------------------------

__global__ void bad_kernel(int which, const float* g) {
  FF_DYNAMIC_SMEM(float, sm);
  const int lane = threadIdx.x & 31;
  float v = static_cast<float>(threadIdx.x);
  uint32_t r[4], a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float d[4] = {0, 0, 0, 0};
  switch (which) {
    case 0:  // one lane skips a shuffle the others make, then meets them at a barrier
      if (lane != 5) v = __shfl_xor_sync(0xffffffffu, v, 1);
      __syncthreads();
      break;
    case 1:  // half the warp shuffles by xor, the other half by index
      v = lane < 16 ? __shfl_xor_sync(0xffffffffu, v, 1) : __shfl_sync(0xffffffffu, v, 0);
      break;
    case 2:  // the upper half-warp has returned before a full-mask reduction
      if (lane >= 16) return;
      v = ff::cuda::warp_sum(v);
      break;
    case 3:  // cp.async never waited for
      ff::simt::cp_async_16(sm + 4 * threadIdx.x, g, true);
      ff::simt::cp_async_commit();
      break;
    case 4:  // cp.async destination past the end of shared memory
      ff::simt::cp_async_16(sm + 4 * (threadIdx.x + blockDim.x), g, true);
      ff::simt::cp_async_wait<0>();
      break;
    case 5:  // ldmatrix with a row address that is not 16-byte aligned
      ff::simt::ldmatrix_x4(r, sm + 4 * lane + (lane == 7 ? 2 : 0));
      break;
    case 6:  // two different mma instructions in one warp
      if (lane < 16) ff::simt::mma_m16n8k16<__half>(d, a, b);
      else ff::simt::mma_m16n8k16<__half>(d, a, b);
      break;
    case 7:  // a shuffle that reads a lane outside its mask
      if (lane < 16) v = __shfl_sync(0x0000ffffu, v, 20);
      break;
    case 8:  // lane 0 of each warp waits at a shuffle, the others at a barrier
      if (lane == 0) v = __shfl_xor_sync(0xffffffffu, v, 1);
      else __syncthreads();
      break;
    case 9:  // the kernel throws (as a failed check inside a device function would)
      if (threadIdx.x == 33) throw std::runtime_error("kernel-side failure");
      break;
  }
  if (v < -1.f) sm[0] = v;  // keep v alive
}

void bad(int64_t which) {
  at::Tensor g = at::zeros({64}, at::kFloat);
  launch(&bad_kernel, dim3(2), dim3(64), 64 * 16, nullptr, static_cast<int>(which), g.data_ptr<float>());
}

}  // namespace emu_simt_test

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace emu_simt_test;
  m.def("mma", &mma);
  m.def("mma_loop", &mma_loop);
  m.def("ldmatrix", &ldmatrix);
  m.def("cp_async", &cp_async);
  m.def("shfl", &shfl);
  m.def("reduce", &reduce);
  m.def("builtins", &builtins);
  m.def("handoff", &handoff);
  m.def("uninit", &uninit);
  m.def("philox", &philox);
  m.def("byte_perm", &byte_perm);
  m.def("bad", &bad);
}
