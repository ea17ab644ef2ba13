// fusedformer_C::gelu_ffn_fwd / gelu_ffn_bwd: schemas and the entry points.
// Argument checks, allocation and launch only; the math lives in gelu_ffn_cpu.cpp and
// gelu_ffn_cuda.cuh (entry points gelu_ffn_cuda_fwd.cu / gelu_ffn_cuda_bwd.cu).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include "common/checks.h"
#include "gelu_ffn/gelu_ffn.h"

namespace ff::gelu_ffn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// A contiguous matrix of the given shape, on x's device, of x's dtype. With `transposed_ok`, the
// transpose of a contiguous matrix is taken too: the CPU kernels hand the weights to torch's GEMMs,
// which read either layout at the same cost (HF's Conv1D stores its weight as (in, out), so a
// GPT-2 MLP's weights arrive as such transposes; a copy of each would cost more than the GELU).
void check_matrix(const char* op, const char* name, const Tensor& t, const Tensor& x, int64_t rows, int64_t cols,
                  bool transposed_ok = false) {
  FF_CHECK_ARG(t.defined(), op, name, " is undefined");
  FF_CHECK_ARG(t.device() == x.device(), op, name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, name, " has dtype ", t.scalar_type(), ", expected ",
                   x.scalar_type(), " (x's dtype)");
  const bool dense = t.dim() == 2 && (t.is_contiguous() || (transposed_ok && t.t().is_contiguous()));
  FF_CHECK_ARG(dense && t.size(0) == rows && t.size(1) == cols, op, name, " must be a contiguous (", rows, ", ", cols,
               ") tensor", transposed_ok ? " or the transpose of one" : "", ", got sizes ", t.sizes(), " strides ",
               t.strides());
}

void check_bias(const char* op, const char* name, const OptTensor& b, const Tensor& x, int64_t n) {
  if (!b.has_value()) return;
  FF_CHECK_ARG(b->device() == x.device(), op, name, " is on ", b->device(), " but x is on ", x.device());
  TORCH_CHECK_TYPE(b->scalar_type() == x.scalar_type(), op, name, " has dtype ", b->scalar_type(), ", expected ",
                   x.scalar_type());
  FF_CHECK_ARG(b->dim() == 1 && b->size(0) == n && b->is_contiguous(), op, name, " must be a contiguous (", n,
               ",) tensor, got ", b->sizes());
}

bool parse_approximate(const char* op, const std::string& approximate) {
  FF_CHECK_ARG(approximate == "none" || approximate == "tanh", op, "approximate must be 'none' or 'tanh', got '",
               approximate, "'");
  return approximate == "tanh";
}

void check_x(const char* op, const Tensor& x) {
  FF_CHECK_ARG(x.defined() && x.dim() == 2 && x.is_contiguous(), op, "x must be a contiguous (M, C) tensor, got ",
               x.sizes());
  check_dtype_of(op, "x", x);
  FF_CHECK_ARG(x.size(0) > 0 && x.size(1) > 0, op, "x is empty: ", x.sizes());
}

void check_dropout(const char* op, double p, int64_t offset) {
  FF_CHECK_ARG(p >= 0.0 && p < 1.0, op, "dropout_p must be in [0, 1), got ", p);
  FF_CHECK_ARG(offset >= 0, op, "offset must be >= 0, got ", offset);
}

// The CUDA kernels' limits (gelu_ffn_cuda.cuh): tensor-core GEMMs on float16 / bfloat16, rows
// copied in 16-byte chunks (8 elements), so every width must be a multiple of 8. Compiled into
// every build: gelu_ffn_cuda_limits below exposes it to tests/test_limits.py, which compares it
// with the limits the Python side declares (fusedformer/ops/limits.py).
void check_cuda_limits(const char* op, c10::ScalarType dtype, int64_t C, int64_t F, int64_t C2) {
  TORCH_CHECK_TYPE(LowPrecisionDtypes::contains(dtype), op, "x has dtype ", dtype, "; the CUDA kernels take ",
                   LowPrecisionDtypes::names());
  FF_CHECK_ARG(C % 8 == 0 && F % 8 == 0 && C2 % 8 == 0, op,
               "the CUDA kernels need C, F and C2 to be multiples of 8 (16-byte row chunks), got C = ", C,
               ", F = ", F, ", C2 = ", C2);
  FF_CHECK_ARG(std::max({C, F, C2}) <= std::numeric_limits<int32_t>::max(), op,
               "the CUDA kernels need C, F and C2 below 2^31, got C = ", C, ", F = ", F, ", C2 = ", C2);
}

void gelu_ffn_cuda_limits(c10::ScalarType dtype, int64_t C, int64_t F, int64_t C2) {
  check_cuda_limits("fusedformer_C::gelu_ffn_cuda_limits: ", dtype, C, F, C2);
}

#ifdef FF_WITH_CUDA
// t, or a (16-byte aligned) copy of it when its data pointer is not 16-byte aligned (a contiguous
// view at an odd storage offset): the kernels read their GEMM operands in 16-byte chunks.
Tensor aligned16(const Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
}
#endif

// x (M, C), w1 (F, C) and w2 (C2, F), all non-empty: returns {M, C, F, C2}.
std::array<int64_t, 4> check_shapes(const char* op, const Tensor& x, const Tensor& w1, const Tensor& w2) {
  check_x(op, x);
  const int64_t M = x.size(0), C = x.size(1);
  FF_CHECK_ARG(w1.defined() && w1.dim() == 2 && w2.defined() && w2.dim() == 2, op, "w1 and w2 must be matrices");
  const int64_t F = w1.size(0), C2 = w2.size(0);
  FF_CHECK_ARG(F > 0 && C2 > 0, op, "w1 / w2 are empty");
  check_matrix(op, "w1", w1, x, F, C, /*transposed_ok=*/x.is_cpu());
  check_matrix(op, "w2", w2, x, C2, F, /*transposed_ok=*/x.is_cpu());
  return {M, C, F, C2};
}

std::tuple<Tensor, Tensor> gelu_ffn_fwd(const Tensor& x, const Tensor& w1, const OptTensor& b1, const Tensor& w2,
                                        const OptTensor& b2, const std::string& approximate, double dropout_p,
                                        const OptTensor& seed, int64_t offset) {
  constexpr const char* op = "fusedformer_C::gelu_ffn_fwd: ";
  const auto [M, C, F, C2] = check_shapes(op, x, w1, w2);
  check_bias(op, "b1", b1, x, F);
  check_bias(op, "b2", b2, x, C2);
  check_dropout(op, dropout_p, offset);

  const c10::DeviceGuard guard(x.device());
  FwdArgs a;
  a.x = x;
  a.w1 = w1;
  a.b1 = b1.has_value() ? *b1 : Tensor();
  a.w2 = w2;
  a.b2 = b2.has_value() ? *b2 : Tensor();
  a.y = at::empty({M, C2}, x.options());
  a.pre = at::empty({M, F}, x.options());
  a.tanh = parse_approximate(op, approximate);
  a.dropout = make_dropout(dropout_p, seed_value(op, seed), offset);
  if (x.is_cuda()) {
#ifdef FF_WITH_CUDA
    check_cuda_limits(op, x.scalar_type(), C, F, C2);
    a.x = aligned16(x);
    a.w1 = aligned16(w1);
    a.w2 = aligned16(w2);
    fwd_cuda(a);
#else
    TORCH_CHECK(false, op, "fusedformer._C was built without CUDA");
#endif
  } else {
    fwd_cpu(a);
  }
  return {a.y, a.pre};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gelu_ffn_bwd(const Tensor& dy, const Tensor& x, const Tensor& w1,
                                                                const Tensor& w2, const Tensor& pre,
                                                                const std::string& approximate, double dropout_p,
                                                                const OptTensor& seed, int64_t offset, bool has_b1,
                                                                bool has_b2) {
  constexpr const char* op = "fusedformer_C::gelu_ffn_bwd: ";
  const auto [M, C, F, C2] = check_shapes(op, x, w1, w2);
  check_matrix(op, "dy", dy, x, M, C2);
  check_matrix(op, "pre", pre, x, M, F);
  check_dropout(op, dropout_p, offset);

  const c10::DeviceGuard guard(x.device());
  BwdArgs a;
  a.dy = dy;
  a.x = x;
  a.w1 = w1;
  a.w2 = w2;
  a.pre = pre;
  a.dx = at::empty_like(x);
  a.dw1 = at::empty_like(w1);
  a.dw2 = at::empty_like(w2);
  a.db1 = has_b1 ? at::empty({F}, x.options()) : Tensor();
  a.db2 = has_b2 ? at::empty({C2}, x.options()) : Tensor();
  a.tanh = parse_approximate(op, approximate);
  a.dropout = make_dropout(dropout_p, seed_value(op, seed), offset);
  if (x.is_cuda()) {
#ifdef FF_WITH_CUDA
    check_cuda_limits(op, x.scalar_type(), C, F, C2);
    a.dy = aligned16(dy);
    a.x = aligned16(x);
    a.w1 = aligned16(w1);
    a.w2 = aligned16(w2);
    a.pre = aligned16(pre);
    bwd_cuda(a);
#else
    TORCH_CHECK(false, op, "fusedformer._C was built without CUDA");
#endif
  } else {
    bwd_cpu(a);
  }
  return {a.dx, a.dw1, has_b1 ? a.db1 : x.new_empty({0}), a.dw2, has_b2 ? a.db2 : x.new_empty({0})};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedformer_C, m) {
  m.def("gelu_ffn_cuda_limits(ScalarType dtype, int C, int F, int C2) -> ()", &gelu_ffn_cuda_limits);
  m.def("gelu_ffn_fwd(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str approximate, float dropout_p, "
        "Tensor? seed, int offset) -> (Tensor, Tensor)");
  m.def("gelu_ffn_bwd(Tensor dy, Tensor x, Tensor w1, Tensor w2, Tensor pre, str approximate, float dropout_p, "
        "Tensor? seed, int offset, bool has_b1, bool has_b2) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedformer_C, CPU, m) {
  m.impl("gelu_ffn_fwd", &gelu_ffn_fwd);
  m.impl("gelu_ffn_bwd", &gelu_ffn_bwd);
}

#ifdef FF_WITH_CUDA
TORCH_LIBRARY_IMPL(fusedformer_C, CUDA, m) {
  m.impl("gelu_ffn_fwd", &gelu_ffn_fwd);
  m.impl("gelu_ffn_bwd", &gelu_ffn_bwd);
}
#endif

}  // namespace ff::gelu_ffn
