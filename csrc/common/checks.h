// Argument checks for the native ops. The Python layer validates user input first and names the
// argument; these checks guard direct callers of torch.ops.fusedformer_C.* so a bad call is an
// error, never an illegal memory access.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#define FF_CHECK_ARG(cond, op, ...) TORCH_CHECK_VALUE(cond, op, ": ", __VA_ARGS__)

namespace ff {

inline bool is_fast_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                        int64_t ndim) {
  FF_CHECK_ARG(t.defined(), op, name, " is undefined");
  FF_CHECK_ARG(t.device() == ref.device(), op, name, " is on ", t.device(), " but expected ", ref.device());
  FF_CHECK_ARG(t.dim() == ndim, op, name, " must have ", ndim, " dims, got ", t.sizes());
  FF_CHECK_ARG(t.is_contiguous(), op, name, " must be contiguous");
}

}  // namespace ff
