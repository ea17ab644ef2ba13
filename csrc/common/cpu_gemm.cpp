// The CPU kernels' low-precision GEMM strategy (cpu_gemm.h): the decision, the override, MKL's
// bfloat16 GEMM, and two small ops through which Python reads and sets them:
//
//   fusedformer_C::cpu_bf16_gemm_mode(str mode) -> str          "" reads; auto / on / off sets;
//                                                               returns the mode before the call
//   fusedformer_C::cpu_bf16_gemm_path(str op) -> (bool, str)    op: gelu_ffn or attention
//   fusedformer_C::cpu_bf16_attention_tile_gain() -> float      the measurement behind attention's
//                                                               choice: MKL sgemm time / bf16 time
#include "common/cpu_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/cpu/Utils.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <vector>

// MKL's interfaces, as torch links them (declared weak: a torch without MKL still loads us).
// cblas enums: CblasRowMajor = 101, CblasNoTrans = 111, CblasTrans = 112.
extern "C" void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                                       const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                                       int ldc) __attribute__((weak));
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
// The C interface of the thread setting. The lower-case mkl_set_num_threads_local is its Fortran
// twin, which takes the count by pointer (called with an int, it dereferences the count).
extern "C" int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));

namespace ff::cpu {
namespace {

constexpr const char* kEnv = "FUSEDFORMER_CPU_BF16_GEMM";
// bf16 tiles for attention only where MKL's bf16 GEMM beats its sgemm by this much at the tile
// shape (the float32 path also converts q / k / v once, which this leaves out: a small cost).
constexpr double kAttentionMinGain = 1.25;

// ---------------------------------------------------------------------------------------------
// The override
// ---------------------------------------------------------------------------------------------
constexpr int kUnread = -1;
std::atomic<int> g_mode{kUnread};
std::atomic<bool> g_mode_from_env{false};

const char* mode_name(Bf16GemmMode m) {
  switch (m) {
    case Bf16GemmMode::kOn: return "on";
    case Bf16GemmMode::kOff: return "off";
    default: return "auto";
  }
}

Bf16GemmMode parse_mode(const std::string& s, const char* where) {
  if (s.empty() || s == "auto") return Bf16GemmMode::kAuto;
  if (s == "on" || s == "1") return Bf16GemmMode::kOn;
  if (s == "off" || s == "0") return Bf16GemmMode::kOff;
  TORCH_CHECK_VALUE(false, where, " must be auto, on or off, got '", s, "'");
  return Bf16GemmMode::kAuto;  // not reached
}

// ---------------------------------------------------------------------------------------------
// What the CPU reports (torch's cpuinfo)
// ---------------------------------------------------------------------------------------------
struct Caps {
  bool avx512_bf16 = false, amx_bf16 = false;
  bool any() const { return avx512_bf16 || amx_bf16; }
  std::string flags() const {
    std::string s;
    if (avx512_bf16) s += "avx512_bf16";
    if (amx_bf16) s += s.empty() ? "amx_bf16" : ", amx_bf16";
    return s;
  }
};

const Caps& caps() {
  static const Caps c = [] {
    Caps r;
    const auto map = at::cpu::get_cpu_capabilities();
    auto flag = [&](const char* key) {
      const auto it = map.find(key);
      return it != map.end() && it->second.isBool() && it->second.toBool();
    };
    r.avx512_bf16 = flag("avx512_bf16");
    r.amx_bf16 = flag("amx_bf16");
    return r;
  }();
  return c;
}

constexpr const char* kNoInstructions =
    "the CPU has no bf16 dot-product instructions (neither avx512_bf16 nor amx_bf16), where a bfloat16 GEMM "
    "is emulated and slower than float32";

bool onednn_enabled() {
#if AT_MKLDNN_ENABLED()
  return at::globalContext().userEnabledMkldnn();
#else
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------
// gelu_ffn: torch's bf16 matmul (oneDNN) where the instructions are
// ---------------------------------------------------------------------------------------------
Bf16GemmPath decide_gelu_ffn() {
  if (!caps().any()) return {false, std::string("float32 GEMMs on float32 copies: ") + kNoInstructions};
  if (!onednn_enabled())
    return {false, "float32 GEMMs on float32 copies: the CPU has " + caps().flags() +
                       ", but torch's oneDNN (mkldnn) is not built or is disabled, and its other bfloat16 "
                       "matmul does not use them"};
  return {true, "bfloat16 GEMMs (torch's matmul through oneDNN, float32 accumulation): the CPU has " +
                    caps().flags()};
}

// ---------------------------------------------------------------------------------------------
// attention: MKL's bf16 GEMM on the tiles where it measures faster than sgemm
// ---------------------------------------------------------------------------------------------
void sgemm_rowmajor(bool trans_b, int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c,
                    int ldc) {
  const float one = 1.f, zero = 0.f;
  const char tb = trans_b ? 'T' : 'N', ta = 'N';
  sgemm_(&tb, &ta, &n, &m, &k, &one, b, &ldb, a, &lda, &zero, c, &ldc);
}

template <typename Fn>
double best_seconds(const Fn& fn) {
  fn();  // warm-up: packing buffers, page faults
  double best = 1e30;
  for (int round = 0; round < 5; ++round) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 4; ++i) fn();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 4);
  }
  return best;
}

// The forward's two tile GEMMs (128 x 512 scores from head dim 64, then 128 x 64 from 512 keys),
// bf16 and float32. Returns {bf16, f32} seconds.
std::pair<double, double> measure_attention_tiles() {
  constexpr int BQ = 128, BK = 512, D = 64;
  std::vector<float> qf(BQ * D), kf(BK * D), vf(BK * D), s(BQ * BK), o(BQ * D);
  for (size_t i = 0; i < qf.size(); ++i) qf[i] = static_cast<float>((i * 7919) % 97) / 97.f - 0.5f;
  for (size_t i = 0; i < kf.size(); ++i) kf[i] = vf[i] = static_cast<float>((i * 104729) % 89) / 89.f - 0.5f;
  std::vector<c10::BFloat16> qb(qf.begin(), qf.end()), kb(kf.begin(), kf.end()), vb(vf.begin(), vf.end()),
      pb(s.size());
  // One MKL thread on this thread, as inside the kernel's parallel region.
  const int previous_threads = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
  const double t_bf16 = best_seconds([&] {
    gemm_bf16_f32(false, true, BQ, BK, D, 1.f, qb.data(), D, kb.data(), D, 0.f, s.data(), BK);
    gemm_bf16_f32(false, false, BQ, D, BK, 1.f, pb.data(), BK, vb.data(), D, 0.f, o.data(), D);
  });
  const double t_f32 = best_seconds([&] {
    sgemm_rowmajor(true, BQ, BK, D, qf.data(), D, kf.data(), D, s.data(), BK);
    sgemm_rowmajor(false, BQ, D, BK, s.data(), BK, vf.data(), D, o.data(), D);
  });
  if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_threads);  // 0: back to the global setting
  return {t_bf16, t_f32};
}

Bf16GemmPath decide_attention() {
  if (!caps().any()) return {false, std::string("float32 tile GEMMs on float32 copies: ") + kNoInstructions};
  if (!has_mkl_bf16_gemm() || sgemm_ == nullptr)
    return {false, "float32 tile GEMMs on float32 copies: the CPU has " + caps().flags() +
                       ", but this torch links no MKL bfloat16 GEMM (cblas_gemm_bf16bf16f32)"};
  const auto [t_bf16, t_f32] = measure_attention_tiles();
  const double gain = t_f32 / t_bf16;
  std::ostringstream why;
  why.precision(2);
  why << std::fixed;
  if (gain >= kAttentionMinGain) {
    why << "bfloat16 tile GEMMs (MKL gemm_bf16bf16f32, float32 scores and accumulators): the CPU has "
        << caps().flags() << " and MKL's bf16 tile GEMM measured " << gain << "x its sgemm at this process's start";
    return {true, why.str()};
  }
  why << "float32 tile GEMMs on float32 copies: the CPU has " << caps().flags()
      << ", but MKL's bf16 tile GEMM measured only " << gain << "x its sgemm (needs " << kAttentionMinGain << "x)";
  return {false, why.str()};
}

const Bf16GemmPath& auto_path(GemmOp op) {
  if (op == GemmOp::kGeluFfn) {
    static const Bf16GemmPath p = decide_gelu_ffn();
    return p;
  }
  static const Bf16GemmPath p = decide_attention();
  return p;
}

std::string forced_by() {
  return g_mode_from_env.load() ? std::string(kEnv) + "=" + mode_name(bf16_gemm_mode())
                                : std::string("fusedformer.cpu_caps.set_bf16_gemm('") + mode_name(bf16_gemm_mode()) +
                                      "')";
}

GemmOp parse_op(const std::string& op) {
  if (op == "gelu_ffn") return GemmOp::kGeluFfn;
  if (op == "attention") return GemmOp::kAttention;
  TORCH_CHECK_VALUE(false, "cpu_bf16_gemm_path: op must be gelu_ffn or attention, got '", op, "'");
  return GemmOp::kGeluFfn;  // not reached
}

}  // namespace

Bf16GemmMode bf16_gemm_mode() {
  int m = g_mode.load(std::memory_order_acquire);
  if (m != kUnread) return static_cast<Bf16GemmMode>(m);
  const char* env = std::getenv(kEnv);
  const Bf16GemmMode parsed = parse_mode(env ? env : "", kEnv);
  int expected = kUnread;
  if (g_mode.compare_exchange_strong(expected, static_cast<int>(parsed))) {
    g_mode_from_env.store(env != nullptr && parsed != Bf16GemmMode::kAuto);
    return parsed;
  }
  return static_cast<Bf16GemmMode>(expected);
}

Bf16GemmMode set_bf16_gemm_mode(Bf16GemmMode mode) {
  g_mode_from_env.store(false);
  const int previous = g_mode.exchange(static_cast<int>(mode), std::memory_order_acq_rel);
  if (previous != kUnread) return static_cast<Bf16GemmMode>(previous);
  // Never read: what the environment said, without failing on a bad value (this call replaces it).
  const char* env = std::getenv(kEnv);
  try {
    return parse_mode(env ? env : "", kEnv);
  } catch (const c10::Error&) {
    return Bf16GemmMode::kAuto;
  }
}

bool has_mkl_bf16_gemm() {
  static const bool has = cblas_gemm_bf16bf16f32 != nullptr && at::hasMKL();
  return has;
}

Bf16GemmPath bf16_gemm_path(GemmOp op) {
  switch (bf16_gemm_mode()) {
    case Bf16GemmMode::kOff:
      return {false, "float32 GEMMs on float32 copies: forced by " + forced_by()};
    case Bf16GemmMode::kOn:
      if (op == GemmOp::kAttention && !has_mkl_bf16_gemm())
        return {false, "float32 tile GEMMs on float32 copies: " + forced_by() +
                           " asked for bf16, but this torch links no MKL bfloat16 GEMM"};
      return {true, std::string(op == GemmOp::kAttention ? "bfloat16 tile GEMMs (MKL gemm_bf16bf16f32)"
                                                         : "bfloat16 GEMMs (torch's matmul)") +
                        ": forced by " + forced_by() +
                        (caps().any() ? "" : " (no bf16 instructions here: emulated, for tests)")};
    default:
      return auto_path(op);
  }
}

bool use_bf16_gemm(GemmOp op) {
  switch (bf16_gemm_mode()) {
    case Bf16GemmMode::kOff: return false;
    case Bf16GemmMode::kOn: return op != GemmOp::kAttention || has_mkl_bf16_gemm();
    default: return auto_path(op).bf16;
  }
}

void gemm_bf16_f32(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const c10::BFloat16* a,
                   int64_t lda, const c10::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  TORCH_CHECK(has_mkl_bf16_gemm(), "gemm_bf16_f32: this torch links no MKL bfloat16 GEMM");
  // BLAS wants each leading dim >= the stored row length even for a single row.
  const int ilda = static_cast<int>(std::max<int64_t>(lda, trans_a ? m : k));
  const int ildb = static_cast<int>(std::max<int64_t>(ldb, trans_b ? k : n));
  const int ildc = static_cast<int>(std::max<int64_t>(ldc, n));
  cblas_gemm_bf16bf16f32(101, trans_a ? 112 : 111, trans_b ? 112 : 111, static_cast<int>(m), static_cast<int>(n),
                         static_cast<int>(k), alpha, reinterpret_cast<const uint16_t*>(a), ilda,
                         reinterpret_cast<const uint16_t*>(b), ildb, beta, c, ildc);
}

namespace {

std::string cpu_bf16_gemm_mode_op(const std::string& mode) {
  if (mode.empty()) return mode_name(bf16_gemm_mode());
  return mode_name(set_bf16_gemm_mode(parse_mode(mode, "cpu_bf16_gemm_mode")));
}

// The attention measurement itself, on any CPU (the automatic choice makes it only where the CPU
// has the instructions): so that every machine's tests run it.
double cpu_bf16_attention_tile_gain_op() {
  TORCH_CHECK(has_mkl_bf16_gemm() && sgemm_ != nullptr,
              "cpu_bf16_attention_tile_gain: this torch links no MKL bfloat16 GEMM or sgemm");
  const auto [t_bf16, t_f32] = measure_attention_tiles();
  return t_f32 / t_bf16;
}

std::tuple<bool, std::string> cpu_bf16_gemm_path_op(const std::string& op) {
  const Bf16GemmPath p = bf16_gemm_path(parse_op(op));
  return {p.bf16, p.reason};
}

}  // namespace
}  // namespace ff::cpu

TORCH_LIBRARY_FRAGMENT(fusedformer_C, m) {
  m.def("cpu_bf16_gemm_mode(str mode) -> str", &ff::cpu::cpu_bf16_gemm_mode_op);
  m.def("cpu_bf16_gemm_path(str op) -> (bool, str)", &ff::cpu::cpu_bf16_gemm_path_op);
  m.def("cpu_bf16_attention_tile_gain() -> float", &ff::cpu::cpu_bf16_attention_tile_gain_op);
}
