// attention on CUDA: the entry points fwd_cuda / bwd_cuda (workspace and stream); the kernels are
// in attention_cuda.cuh, instantiated by attention_cuda_fwd.cu and attention_cuda_bwd_*.cu. Host
// code only, so the host compiler builds it (ATen's headers cost nvcc a minute).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include "attention/attention.h"
#include "attention/attention_cuda_config.h"
#include "common/dtype.h"

namespace ff::attention {

namespace {
// A kernel's CTA must fit the device's opt-in shared memory per block (99 KiB on sm_86 / sm_89,
// 163 KiB on sm_80, 227 KiB on sm_90); dispatch leaves such calls out (attention_cuda_smem_bytes),
// so this is the error of an explicit backend="cuda".
size_t smem_optin() {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, c10::cuda::current_device()));
  return static_cast<size_t>(optin);
}

void check_smem(const char* what, size_t need, size_t limit, int64_t d, int64_t dv) {
  TORCH_CHECK(need <= limit, "fusedformer.attention: the cuda ", what, " at head dims (", d, ", ", dv, ") needs ",
              need, " bytes of shared memory per block; this GPU allows ", limit,
              " (use backend=\"triton\", or a head dim of at most 128)");
}
}  // namespace

void fwd_cuda(const FwdParams& p) {
  // The forward's attn_mask tile where it fits or the kernel needs it (the DP 128 kernel's 128 rows
  // of a float32 mask do not fit sm_86 / sm_89's 99 KiB): else the kernel reads the mask from
  // global memory.
  const size_t limit = smem_optin();
  const int mask_elem = gpu::mask_elem_bytes(p.pb);
  FwdParams q = p;
  q.mask_tile =
      !gpu::fwd_mask_tile_optional(p.pb.D, p.pb.Dv) || gpu::fwd_smem_bytes(p.pb.D, p.pb.Dv, mask_elem) <= limit;
  check_smem("forward", gpu::fwd_smem_bytes(p.pb.D, p.pb.Dv, q.mask_tile ? mask_elem : 0), limit, p.pb.D, p.pb.Dv);
  gpu::fwd_launch(q, c10::cuda::getCurrentCUDAStream());
}

void bwd_cuda(const BwdParams& p) {
  const Problem& pb = p.pb;
  check_smem(p.deterministic ? "deterministic backward" : "backward",
             gpu::bwd_smem_bytes(pb.D, pb.Dv, p.deterministic, gpu::mask_elem_bytes(pb)), smem_optin(), pb.D, pb.Dv);
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, c10::cuda::current_device());
  at::Tensor delta = at::empty({pb.B, pb.H, pb.Sq}, opts);
  // The float32 dQ accumulator of the atomic path (zeroed by the delta kernel).
  at::Tensor dq_acc = p.deterministic ? at::Tensor() : at::empty({pb.B, pb.H, pb.Sq, pb.D}, opts);
  float* acc = p.deterministic ? nullptr : dq_acc.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  visit_dtype<LowPrecisionDtypes>(pb.dtype, "attention (cuda)", [&]<typename T>(TypeTag<T>) {
    gpu::bwd_launch<T>(p, delta.data_ptr<float>(), acc, stream);
  });
}

}  // namespace ff::attention
