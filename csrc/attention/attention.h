// attention: exact scaled-dot-product attention, FlashAttention-style (tiled, online softmax,
// memory O(S), never the S x S matrix), forward and backward.
//
// Forward, for batch b, query head h (key/value head hk = h / (H / Hk), GQA), query row i:
//   s_ij = scale * q_i . k_j + bias_ij
//          bias = additive attn_mask[b, h, i, j]
//               + (-inf where is_causal and j > i)                 (top-left aligned, like SDPA)
//               + (-inf where key_padding_mask[b, j])
//   lse_i = log sum_j exp(s_ij)          (natural log; -inf when every key of the row is masked)
//   p_ij  = exp(s_ij - lse_i)            (0 for a fully masked row)
//   o_i   = sum_j p_ij z_ij v_j          z = dropout multiplier of element
//                                        n = ((b H + h) Sq + i) Sk + j   (common/philox.h)
// computed block by block with the online softmax: a running max m and sum l per row, the
// accumulator rescaled by exp(m_old - m_new) whenever the max grows; o = acc / l at the end.
//
// Backward (vector-Jacobian product), with delta_i = sum_d do_id o_id = sum_j p_ij dp_ij:
//   dp_ij = z_ij (do_i . v_j)
//   ds_ij = p_ij (dp_ij - delta_i)
//   dv_j  = sum_i p_ij z_ij do_i        dq_i = scale sum_j ds_ij k_j      dk_j = scale sum_i ds_ij q_i
// P is recomputed from the saved lse (FlashAttention-2); dk / dv of a key/value head are summed
// over the query heads of its group. Masks are constants and get no gradient.
//
// Saved: lse (B, H, Sq) float32. Layout: q (B, H, Sq, D), k (B, Hk, Sk, D), v (B, Hk, Sk, Dv),
// any strides as long as the last (head) dim is contiguous; attn_mask (B, H, Sq, Sk) with any
// strides (stride 0 for broadcast dims); key_padding_mask (B, Sk) bool, contiguous.
// dtypes: float32, bfloat16, float16; statistics and accumulation in float32.
// References: Dao et al., FlashAttention (2022) and FlashAttention-2 (2023); Milakov & Gimelshein,
// "Online normalizer calculation for softmax" (2018).
#pragma once
#include <cmath>
#include <cstdint>

#include <c10/core/ScalarType.h>
#ifdef FF_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#include "common/philox.h"

namespace ff::attention {

// Masking values (the reference's rule, python/fusedformer/reference.py): a finite additive mask
// value at or below kMaskingThreshold (the finfo(float32 / bfloat16).min that Hugging Face writes, -1e9)
// marks a masked key, whose score is kMaskedScore whatever q . k is. A row with an unmasked key
// gives such keys weight 0 (exp(-256 - max) underflows); a row whose every finite score is a
// masking value attends uniformly to those keys, as torch's math path does for finfo.min masks,
// and its lse = -256 + log(n) stays exact enough in float32 for the backward's P = exp(S - lse)
// (with the raw value, lse rounds to the mask value and P does not sum to 1). The gradient is
// taken straight through, as if the score were q . k + bias.
constexpr float kMaskingThreshold = -131072.f;  // -2^17
constexpr float kMaskedScore = -256.f;

// The score of (i, j) from its scaled q . k and its additive mask value (natural-log units), in
// units of 1 / unit: unit = 1 for natural-log scores, log2(e) for log2 scores (qk then already
// in log2 units). The threshold always applies to the mask value itself.
FF_HOST_DEVICE float masked_score(float qk, float bias, float unit = 1.f) {
  if (bias <= kMaskingThreshold) return bias == -INFINITY ? bias : kMaskedScore * unit;
  return qk + bias * unit;
}

// A rank-4 tensor (batch, head, row, column) addressed by strides, in elements; the column
// (last) dim is contiguous.
struct Strided4 {
  void* ptr = nullptr;
  int64_t stride_b = 0, stride_h = 0, stride_s = 0;
};

// What forward and backward share: shapes, masks and the softmax / dropout parameters.
struct Problem {
  int64_t B = 0, H = 0, Hk = 0, Sq = 0, Sk = 0, D = 0, Dv = 0;
  Strided4 q;                        // (B, H, Sq, D)
  Strided4 k;                        // (B, Hk, Sk, D)
  Strided4 v;                        // (B, Hk, Sk, Dv)
  Strided4 mask;                     // (B, H, Sq, Sk) additive; ptr == nullptr if none
  int64_t mask_stride_k = 0;         // the mask's column stride (0 when broadcast over keys)
  c10::ScalarType mask_dtype = c10::kFloat;
  const bool* key_padding = nullptr; // (B, Sk) True = padding, or nullptr
  float scale = 1.f;
  bool causal = false;
  DropoutParams dropout;
  c10::ScalarType dtype = c10::kFloat;  // of q, k, v, out and the gradients
};

struct FwdParams {
  Problem pb;
  Strided4 out;                      // (B, H, Sq, Dv)
  float* lse = nullptr;              // (B, H, Sq) contiguous
  bool mask_tile = true;             // CUDA: an attn_mask through the shared-memory tile where the kernel
                                     // has one (else read from global memory: attention_cuda.cpp)
};

struct BwdParams {
  Problem pb;
  Strided4 dout;                     // (B, H, Sq, Dv)
  Strided4 out;                      // (B, H, Sq, Dv) the forward output
  const float* lse = nullptr;        // (B, H, Sq) contiguous
  Strided4 dq;                       // (B, H, Sq, D)
  Strided4 dk;                       // (B, Hk, Sk, D)
  Strided4 dv;                       // (B, Hk, Sk, Dv)
  bool deterministic = false;        // bitwise reproducible (CUDA: dQ without atomics)
};

void fwd_cpu(const FwdParams& p);
void bwd_cpu(const BwdParams& p);
#ifdef FF_WITH_CUDA
// float16 / bfloat16 on the current CUDA device and stream (attention_cuda.cpp); the caller has
// checked the limits of attention_ops.cpp (head dims, 16-byte alignment).
void fwd_cuda(const FwdParams& p);
void bwd_cuda(const BwdParams& p);

// The nvcc-compiled launchers behind them (attention_cuda_fwd.cu, attention_cuda_bwd_*.cu; the
// kernels are in attention_cuda.cuh), for p.pb.dtype float16 / bfloat16. The backward's T is that
// dtype's CPU element type, c10::Half or c10::BFloat16 (instantiated one per file, for parallel
// compiles). delta: (B, H, Sq) float32 scratch; dq_acc: (B, H, Sq, D) float32 scratch, unused when
// p.deterministic.
namespace gpu {
void fwd_launch(const FwdParams& p, cudaStream_t stream);
template <typename T>
void bwd_launch(const BwdParams& p, float* delta, float* dq_acc, cudaStream_t stream);
}  // namespace gpu
#endif

}  // namespace ff::attention
