// Argument checks for the native ops. The Python layer validates user input first and names the
// argument; these checks guard direct callers of torch.ops.fusedformer_C.* so a bad call is an
// error, never an illegal memory access.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>

#include "common/dtype.h"

#define FF_CHECK_ARG(cond, op, ...) TORCH_CHECK_VALUE(cond, op, ": ", __VA_ARGS__)

namespace ff {

// A TypeError unless t's dtype is one of Set's (common/dtype.h): "<op>x must be float32, float16 or
// bfloat16, got Double".
template <typename Set = FloatDtypes>
void check_dtype_of(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(Set::contains(t.scalar_type()), op, name, " must be ", Set::names(), ", got ", t.scalar_type());
}

inline void check_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                        int64_t ndim) {
  FF_CHECK_ARG(t.defined(), op, name, " is undefined");
  FF_CHECK_ARG(t.device() == ref.device(), op, name, " is on ", t.device(), " but expected ", ref.device());
  FF_CHECK_ARG(t.dim() == ndim, op, name, " must have ", ndim, " dims, got ", t.sizes());
  FF_CHECK_ARG(t.is_contiguous(), op, name, " must be contiguous");
}

// The dropout seed every op takes: the op-level seed tensor (one integer; fusedformer/ops/_common.py:
// make_seed gives a (1,) int64 CPU tensor) or None without dropout (seed 0). The one conversion.
inline int64_t seed_value(const char* op, const std::optional<at::Tensor>& seed) {
  if (!seed.has_value() || !seed->defined()) return 0;
  FF_CHECK_ARG(seed->numel() == 1 && !seed->is_floating_point() && !seed->is_complex() &&
                   seed->scalar_type() != at::kBool,
               op, "seed must be a tensor holding one integer, got ", seed->scalar_type(), " of shape ",
               seed->sizes());
  return seed->item<int64_t>();
}

}  // namespace ff
