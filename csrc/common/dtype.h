// The one dtype switch of the native code: which float dtypes an op takes, and the call of a
// template for the C++ type of a run-time dtype.
//
//   ff::visit_dtype(p.dtype, "layer_norm (cpu)", [&]<typename T>(ff::TypeTag<T>) { forward<T>(p); });
//
// calls the lambda with T = float, c10::Half or c10::BFloat16 for float32 / float16 / bfloat16 and
// throws a TypeError naming the op and the dtypes it takes for anything else. A first template
// argument narrows the set (visit_dtype<LowPrecisionDtypes>); the CUDA kernels' device types
// (__half, __nv_bfloat16) come from the same sets through common/cuda_utils.cuh: visit_device_dtype.
// Only c10 headers, no ATen: the nvcc-compiled launchers and the SIMT emulation include it too.
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <string>

namespace ff {

// A type passed as a value, so that a lambda can take it as a template parameter.
template <typename T>
struct TypeTag {
  using type = T;
};

// The dtype of a CPU element type, and its name as torch writes it.
template <typename T>
struct DtypeOf;
template <>
struct DtypeOf<float> {
  static constexpr c10::ScalarType value = c10::ScalarType::Float;
  static constexpr const char* name = "float32";
};
template <>
struct DtypeOf<c10::Half> {
  static constexpr c10::ScalarType value = c10::ScalarType::Half;
  static constexpr const char* name = "float16";
};
template <>
struct DtypeOf<c10::BFloat16> {
  static constexpr c10::ScalarType value = c10::ScalarType::BFloat16;
  static constexpr const char* name = "bfloat16";
};

// A set of dtypes, by their CPU element types, in the order the messages list them.
template <typename... Ts>
struct Dtypes {
  static constexpr bool contains(c10::ScalarType t) { return ((t == DtypeOf<Ts>::value) || ...); }
  // "float32, float16 or bfloat16"
  static std::string names() {
    const char* each[] = {DtypeOf<Ts>::name...};
    std::string s;
    for (size_t i = 0; i < sizeof...(Ts); ++i) {
      if (i > 0) s += i + 1 == sizeof...(Ts) ? " or " : ", ";
      s += each[i];
    }
    return s;
  }
};

// What every op's CPU kernels (and the layer_norm CUDA kernels) take.
using FloatDtypes = Dtypes<float, c10::Half, c10::BFloat16>;
// What the tensor-core kernels (attention, gelu_ffn on CUDA) take.
using LowPrecisionDtypes = Dtypes<c10::Half, c10::BFloat16>;

// A TypeError unless t is in Set: "<op>: float32, float16 or bfloat16 expected, got Double".
template <typename Set = FloatDtypes>
void check_dtype(c10::ScalarType t, const char* op) {
  TORCH_CHECK_TYPE(Set::contains(t), op, ": ", Set::names(), " expected, got ", t);
}

namespace detail {

template <typename Set>
struct Visit;

template <typename T0, typename... Ts>
struct Visit<Dtypes<T0, Ts...>> {
  // t is one of T0, Ts... (checked): the last candidate needs no comparison.
  template <typename F>
  static decltype(auto) call(c10::ScalarType t, F& f) {
    if constexpr (sizeof...(Ts) == 0) {
      return f(TypeTag<T0>{});
    } else {
      if (t == DtypeOf<T0>::value) return f(TypeTag<T0>{});
      return Visit<Dtypes<Ts...>>::call(t, f);
    }
  }
};

}  // namespace detail

// f(TypeTag<T>{}) for the element type T of dtype t among Set's; a TypeError naming op otherwise.
// f returns the same type for every T.
template <typename Set = FloatDtypes, typename F>
decltype(auto) visit_dtype(c10::ScalarType t, const char* op, F&& f) {
  check_dtype<Set>(t, op);
  return detail::Visit<Set>::call(t, f);
}

}  // namespace ff
