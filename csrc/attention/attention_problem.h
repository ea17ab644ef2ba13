// From tensors to the attention Problem (attention.h), with every argument check: shared by the op
// entry points (attention_ops.cpp) and the emulated CUDA tests (csrc/tests/emu/emu_attention.cpp),
// so the tests run the kernels on exactly the Problem the op would build; strided() serves the CPU
// kernels' float32 stand-ins too (attention_cpu.cpp).
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "attention/attention.h"

namespace ff::attention {

// The (batch, head, row) strides and base pointer of a rank-4 tensor.
inline Strided4 strided(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

// A (B, H, S, D) operand: on ref's device, of ref's dtype, the given sizes, unit stride in the
// last dim and no negative strides (a ValueError / TypeError naming `name` otherwise).
void check_operand(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                   at::IntArrayRef sizes);

// Shapes, masks and scalars shared by forward and backward; fills everything but the pointers to
// the outputs. `op` prefixes the error messages.
Problem make_problem(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& key_padding_mask,
                     double dropout_p, bool is_causal, double scale, int64_t seed, int64_t offset);

// Points the backward's parameters at dout, out, lse and the gradient outputs dq, dk, dv (the
// caller checks them).
void set_bwd_operands(BwdParams& p, const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
                      const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv);

// The CUDA kernels' limits (attention_cuda.cuh): 16-bit dtypes, head dims that are multiples of 8
// up to 256 (one 16-byte copy = 8 elements), grids within CUDA's y limit.
void check_cuda_problem(const char* op, const Problem& pb);

}  // namespace ff::attention
