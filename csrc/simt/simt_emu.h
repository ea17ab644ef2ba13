// Host emulation of the SIMT execution model, behind the interface of simt/simt.cuh. Selected by
// -DFF_SIMT_EMULATION with a plain C++ compiler (never by nvcc); see simt.cuh for the interface and
// docs/architecture.md ("Testing CUDA kernels without a GPU") for how the tests use it.
//
// Model. `launch` runs the grid synchronously on the calling host thread: the blocks one after the
// other in a random order, and inside a block every CUDA thread as a fiber (its own stack,
// cooperative switching). A fiber runs until it reaches a collective — __syncthreads, a warp
// collective (__syncwarp, __shfl*_sync, __ballot/any/all_sync, mma, ldmatrix) — or exits; then
// the scheduler picks the next runnable fiber at random (seeded by FF_SIMT_SEED, default fixed, and
// a per-process launch counter, so runs are reproducible). Memory effects between two collectives
// of one thread therefore happen "at once", and the order of threads between collectives is
// random: a missing __syncthreads between a write by one warp and a read by another shows up as
// a wrong result in some runs.
//
//   * __syncthreads: a fiber waits until every live thread of the block has arrived; exited
//     threads count as arrived, as on hardware.
//   * Warp collectives: warps are the consecutive linear thread ids (x fastest). Every lane of the
//     mask deposits pointers to its operands and result on its own (suspended) stack; the last
//     arrival computes all lanes' results and releases them. Lanes that arrive at different kinds of
//     collective (or with different masks, or, for the .aligned mma / ldmatrix, from different
//     source lines), a collective whose mask names an exited lane or a lane waiting at
//     __syncthreads, a shuffle that reads a lane outside the mask, and a deadlock are errors.
//   * mma.m16n8k16: the 32 lanes' A/B/C fragments are assembled into the 16x16, 16x8 and 16x8
//     matrices (layouts in simt.cuh), D = A B + C is computed with the 16-bit inputs converted to
//     float and the products summed in float in k order, and D is scattered back. Products of two
//     fp16/bf16 numbers are exact in float; tensor cores may differ from this in the order and
//     rounding of the additions, i.e. in the last bits of D.
//   * ldmatrix: every used row address must lie inside the block's shared memory, 16-byte
//     aligned; the result is built from the addressed rows per the PTX layout.
//   * cp.async: at issue the destination is checked (inside shared memory, 16-byte aligned) and
//     the 16 source bytes are captured (zeros when pred is false); the bytes are written to shared
//     memory only when cp_async_wait<N> retires their group. A kernel that reads shared memory
//     without waiting reads the old contents. Copies still pending when a thread exits are an error.
//   * Dynamic shared memory is filled with 0xff bytes (a NaN in float, half and bfloat16) at the
//     start of every block, so reads of never-written shared memory are visible in the output.
// An error inside a fiber (or any exception a kernel throws) abandons the launch: `launch` throws
// std::runtime_error naming the kernel, the block, the thread and the collective with its source
// line (pybind11 turns it into a Python RuntimeError). Nothing here hangs or crashes on the errors
// above; what the emulation cannot see: out-of-bounds global or shared memory accesses through
// plain pointers, data races between threads of one warp between two collectives, spin-waits on
// memory written by other threads (they never yield, so they hang), register pressure and timing.
// __CUDA_ARCH__ is not defined, so `#if __CUDA_ARCH__` code takes its host branch.
#pragma once
#ifndef FF_SIMT_EMULATION
#error "simt_emu.h is the host emulation; include simt/simt.cuh with -DFF_SIMT_EMULATION instead"
#endif
#if defined(__CUDACC__)
#error "the SIMT emulation is for a host C++ compiler, not nvcc"
#endif

#include <cuda_runtime.h>  // g++ sees its host half: dim3, uint3, cudaStream_t, __global__, ...
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#if !defined(__x86_64__) || defined(FF_SIMT_EMU_UCONTEXT)
#include <ucontext.h>
#define FF_SIMT_EMU_USE_UCONTEXT 1
#endif

#include "simt/simt_emu_fiber.h"

namespace ff::simt::emu {

// ---------------------------------------------------------------------------------------------
// State of one launch.

enum class Coll : uint8_t {
  None, SyncWarp, ShflXor, ShflIdx, ShflUp, ShflDown, Ballot, Any, All,
  MmaF16, MmaBF16, LdmX4, LdmX4T, LdmX2, LdmX2T,
};

inline const char* coll_name(Coll k) {
  switch (k) {
    case Coll::None: return "(none)";
    case Coll::SyncWarp: return "__syncwarp";
    case Coll::ShflXor: return "__shfl_xor_sync";
    case Coll::ShflIdx: return "__shfl_sync";
    case Coll::ShflUp: return "__shfl_up_sync";
    case Coll::ShflDown: return "__shfl_down_sync";
    case Coll::Ballot: return "__ballot_sync";
    case Coll::Any: return "__any_sync";
    case Coll::All: return "__all_sync";
    case Coll::MmaF16: return "mma_m16n8k16<__half>";
    case Coll::MmaBF16: return "mma_m16n8k16<__nv_bfloat16>";
    case Coll::LdmX4: return "ldmatrix_x4";
    case Coll::LdmX4T: return "ldmatrix_x4_trans";
    case Coll::LdmX2: return "ldmatrix_x2";
    case Coll::LdmX2T: return "ldmatrix_x2_trans";
  }
  return "?";
}

// .aligned instructions: every lane of the warp must execute the same instruction.
inline bool coll_aligned(Coll k) { return k >= Coll::MmaF16; }

struct Site {
  const char* file = "?";
  int line = 0;
};

inline std::string site_str(const Site& s) {
  const char* f = std::strrchr(s.file, '/');
  return std::string(f ? f + 1 : s.file) + ":" + std::to_string(s.line);
}

enum class State : uint8_t { Runnable, Barrier, Warp, Exited };

struct CpAsync {
  unsigned char* dst;
  unsigned char bytes[16];
};

struct Thread {
  Context ctx;
  uint3 tid;
  unsigned linear = 0, warp = 0, lane = 0;
  State state = State::Runnable;
  Site site;  // of the collective or barrier it waits at
  // Operands of the pending warp collective (pointers into this fiber's suspended stack).
  uint64_t value = 0;  // shuffle value bits, vote predicate
  int arg = 0;         // shuffle lane / laneMask / delta
  int width = 32;
  void* out = nullptr;       // shuffle/vote result (uint64_t*), ldmatrix r, mma d
  const void* in_a = nullptr;  // ldmatrix row address, mma a
  const void* in_b = nullptr;  // mma b
  std::vector<CpAsync> uncommitted;
  std::deque<std::vector<CpAsync>> committed;
};

struct Warp {
  Coll kind = Coll::None;
  uint32_t mask = 0, arrived = 0;
  uint32_t exited = 0;      // lanes that exited (or do not exist)
  uint32_t at_barrier = 0;  // lanes waiting at __syncthreads
  Site site;
};

struct Failure {
  bool failed = false;
  std::string message;
  const Thread* thread = nullptr;
};

struct Runtime {
  // Stacks: one mapping, a guard page below each stack; reused by every block and launch.
  static constexpr size_t kStackBytes = 256 * 1024;
  char* stacks = nullptr;
  size_t stack_count = 0;
  size_t page = 4096;

  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::vector<Thread*> runnable, at_barrier;
  int live = 0;
  Thread* current = nullptr;
  Context scheduler;

  dim3 grid, block;
  uint3 block_idx;
  std::vector<unsigned char> smem_storage;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;

  void (*body)(void*) = nullptr;
  void* body_ctx = nullptr;
  Failure failure;

  uint64_t rng_state = 0;
  uint64_t launches = 0;
  bool active = false;

  uint64_t next_random() {  // splitmix64
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }

  void reserve_stacks(size_t n) {
    if (n <= stack_count) return;
    if (stacks) munmap(stacks, stack_count * (kStackBytes + page));
    stacks = nullptr;
    stack_count = 0;
    page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t each = kStackBytes + page;
    void* p = mmap(nullptr, n * each, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("simt emulation: cannot map fiber stacks");
    stacks = static_cast<char*>(p);
    stack_count = n;
    for (size_t i = 0; i < n; ++i) mprotect(stacks + i * each, page, PROT_NONE);  // overflow -> fault
  }
  char* stack_of(size_t i) { return stacks + i * (kStackBytes + page) + page; }
};

inline Runtime& runtime() {
  thread_local Runtime rt;
  return rt;
}

// Raised inside a fiber; the fiber's entry catches it and fails the launch.
struct EmuError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline Thread& self() {
  Runtime& rt = runtime();
  if (!rt.active || !rt.current)
    throw std::logic_error("simt emulation: a device function was called outside of a launched kernel");
  return *rt.current;
}

inline std::string lanes_str(uint32_t m) {
  std::string s;
  for (int i = 0; i < 32; ++i)
    if (m >> i & 1u) {
      int j = i;
      while (j + 1 < 32 && (m >> (j + 1) & 1u)) ++j;
      if (!s.empty()) s += ",";
      s += std::to_string(i);
      if (j > i) s += "-" + std::to_string(j);
      i = j;
    }
  return s.empty() ? "none" : s;
}

inline void make_runnable(Runtime& rt, Thread& t) {
  t.state = State::Runnable;
  rt.runnable.push_back(&t);
}

// Hand control back to the scheduler; returns when this fiber is picked again.
inline void yield(Thread& t) { switch_context(t.ctx, runtime().scheduler); }

// ---------------------------------------------------------------------------------------------
// __syncthreads

inline void release_barrier_if_complete(Runtime& rt) {
  if (rt.at_barrier.empty() || static_cast<int>(rt.at_barrier.size()) != rt.live) return;
  for (Thread* t : rt.at_barrier) {
    rt.warps[t->warp].at_barrier &= ~(1u << t->lane);
    make_runnable(rt, *t);
  }
  rt.at_barrier.clear();
}

inline void syncthreads(Site site) {
  Runtime& rt = runtime();
  Thread& t = self();
  Warp& w = rt.warps[t.warp];
  if (w.kind != Coll::None && (w.mask >> t.lane & 1u))
    throw EmuError("__syncthreads() at " + site_str(site) + " reached while lanes " + lanes_str(w.arrived) +
                   " of this warp wait for this lane at " + coll_name(w.kind) + " (" + site_str(w.site) +
                   "): divergent warp");
  t.state = State::Barrier;
  t.site = site;
  w.at_barrier |= 1u << t.lane;
  rt.at_barrier.push_back(&t);
  release_barrier_if_complete(rt);
  yield(t);
}

// ---------------------------------------------------------------------------------------------
// Warp collectives

inline void check_smem_row(const Runtime& rt, const void* p, const char* what, unsigned lane) {
  const auto* b = static_cast<const unsigned char*>(p);
  if (b < rt.smem || b + 16 > rt.smem + rt.smem_bytes) {
    std::ostringstream os;
    os << what << ": lane " << lane << "'s row address " << p << " is outside the block's dynamic shared memory ["
       << static_cast<const void*>(rt.smem) << ", +" << rt.smem_bytes << " bytes)";
    throw EmuError(os.str());
  }
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    std::ostringstream os;
    os << what << ": lane " << lane << "'s row address " << p << " (shared offset " << (b - rt.smem)
       << ") is not 16-byte aligned";
    throw EmuError(os.str());
  }
}

inline float half_bits_to_float(uint16_t h, Coll k) {
  if (k == Coll::MmaF16) return __half2float(__ushort_as_half(h));
  uint32_t u = static_cast<uint32_t>(h) << 16;  // bfloat16 is the top half of a float
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline void compute_mma(Runtime& rt, Warp& w, Thread* lanes) {
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const uint32_t* a = static_cast<const uint32_t*>(lanes[l].in_a);
    const uint32_t* b = static_cast<const uint32_t*>(lanes[l].in_b);
    const float* c = static_cast<const float*>(lanes[l].out);
    for (int r = 0; r < 4; ++r) {
      const int row = g + (r & 1) * 8, col = 2 * t + (r >> 1) * 8;
      A[row][col] = half_bits_to_float(static_cast<uint16_t>(a[r]), w.kind);
      A[row][col + 1] = half_bits_to_float(static_cast<uint16_t>(a[r] >> 16), w.kind);
    }
    for (int r = 0; r < 2; ++r) {
      const int k = 2 * t + r * 8;
      B[k][g] = half_bits_to_float(static_cast<uint16_t>(b[r]), w.kind);
      B[k + 1][g] = half_bits_to_float(static_cast<uint16_t>(b[r] >> 16), w.kind);
    }
    C[g][2 * t] = c[0];
    C[g][2 * t + 1] = c[1];
    C[g + 8][2 * t] = c[2];
    C[g + 8][2 * t + 1] = c[3];
  }
  (void)rt;
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    float* d = static_cast<float*>(lanes[l].out);
    for (int r = 0; r < 4; ++r) {
      const int i = g + (r >> 1) * 8, j = 2 * t + (r & 1);
      float acc = 0.f;
      for (int k = 0; k < 16; ++k) acc += A[i][k] * B[k][j];
      d[r] = C[i][j] + acc;
    }
  }
}

inline void compute_ldmatrix(Runtime& rt, Warp& w, Thread* lanes) {
  const bool x4 = w.kind == Coll::LdmX4 || w.kind == Coll::LdmX4T;
  const bool trans = w.kind == Coll::LdmX4T || w.kind == Coll::LdmX2T;
  const int nmat = x4 ? 4 : 2;
  for (int l = 0; l < nmat * 8; ++l) check_smem_row(rt, lanes[l].in_a, coll_name(w.kind), l);
  auto elem = [&](int m, int row, int col) {  // element (row, col) of 8x8 matrix m, 16-bit
    uint16_t v;
    std::memcpy(&v, static_cast<const unsigned char*>(lanes[8 * m + row].in_a) + 2 * col, 2);
    return static_cast<uint32_t>(v);
  };
  // Gather every result before writing any: a lane's output registers may not alias, but keep the
  // instruction's all-reads-then-writes semantics anyway.
  uint32_t res[32][4];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int m = 0; m < nmat; ++m)
      res[l][m] = trans ? (elem(m, 2 * t, g) | elem(m, 2 * t + 1, g) << 16)
                        : (elem(m, g, 2 * t) | elem(m, g, 2 * t + 1) << 16);
  }
  for (int l = 0; l < 32; ++l) std::memcpy(lanes[l].out, res[l], 4 * nmat);
}

inline void compute_shuffle(Warp& w, Thread* lanes) {
  uint64_t res[32];
  for (int l = 0; l < 32; ++l) {
    if (!(w.mask >> l & 1u)) continue;
    const Thread& t = lanes[l];
    const int width = t.width;
    if (width < 1 || width > 32 || (width & (width - 1)) != 0)
      throw EmuError(std::string(coll_name(w.kind)) + ": lane " + std::to_string(l) + " passed width " +
                     std::to_string(width) + "; it must be a power of two in [1, 32]");
    const int start = l & ~(width - 1), end = start + width - 1;
    int src = l;
    switch (w.kind) {
      case Coll::ShflXor: src = l ^ (t.arg & 31); if (src > end) src = l; break;
      case Coll::ShflIdx: src = start + (t.arg & (width - 1)); break;
      case Coll::ShflUp: src = l - t.arg; if (src < start) src = l; break;
      case Coll::ShflDown: src = l + t.arg; if (src > end) src = l; break;
      default: break;
    }
    if (!(w.mask >> src & 1u))
      throw EmuError(std::string(coll_name(w.kind)) + " (" + site_str(w.site) + "): lane " + std::to_string(l) +
                     " reads lane " + std::to_string(src) + ", which is not in the mask 0x" +
                     [&] { std::ostringstream o; o << std::hex << w.mask; return o.str(); }() +
                     " (undefined on hardware)");
    res[l] = lanes[src].value;
  }
  for (int l = 0; l < 32; ++l)
    if (w.mask >> l & 1u) *static_cast<uint64_t*>(lanes[l].out) = res[l];
}

inline void compute_vote(Warp& w, Thread* lanes) {
  uint32_t ballot = 0;
  for (int l = 0; l < 32; ++l)
    if ((w.mask >> l & 1u) && lanes[l].value) ballot |= 1u << l;
  uint64_t r = w.kind == Coll::Ballot ? ballot : w.kind == Coll::Any ? (ballot != 0) : (ballot == w.mask);
  for (int l = 0; l < 32; ++l)
    if (w.mask >> l & 1u) *static_cast<uint64_t*>(lanes[l].out) = r;
}

// The calling lane arrives at collective `kind` over `mask` (its operands already stored in its
// Thread); the last arrival computes every lane's result. Returns after the warp has been released.
inline void warp_arrive(Coll kind, uint32_t mask, Site site) {
  Runtime& rt = runtime();
  Thread& t = self();
  Warp& w = rt.warps[t.warp];
  const uint32_t bit = 1u << t.lane;
  auto fail = [&](const std::string& why) {
    throw EmuError(std::string(coll_name(kind)) + " at " + site_str(site) + ": " + why);
  };
  if (coll_aligned(kind) && mask != 0xffffffffu) fail("internal: aligned collective without a full mask");
  if (!(mask & bit)) fail("the mask does not include the calling lane " + std::to_string(t.lane));
  if (w.exited & mask) {
    const int nthreads = static_cast<int>(rt.block.x * rt.block.y * rt.block.z);
    if (nthreads % 32 != 0 && (t.warp + 1) * 32 > static_cast<unsigned>(nthreads))
      fail("this warp has only " + std::to_string(nthreads % 32) + " threads (blockDim " +
           std::to_string(rt.block.x) + "x" + std::to_string(rt.block.y) + "x" + std::to_string(rt.block.z) +
           " is not a multiple of 32) but the collective needs lanes " + lanes_str(mask));
    fail("lanes " + lanes_str(w.exited & mask) + " of this warp have already exited but the collective needs them");
  }
  if (w.at_barrier & mask)
    fail("lanes " + lanes_str(w.at_barrier & mask) +
         " of this warp wait at __syncthreads instead of joining this collective: divergent warp");
  if (w.kind == Coll::None) {
    w.kind = kind;
    w.mask = mask;
    w.arrived = 0;
    w.site = site;
  } else if (w.kind != kind || w.mask != mask ||
             (coll_aligned(kind) && (w.site.line != site.line || std::strcmp(w.site.file, site.file) != 0))) {
    std::ostringstream os;
    os << "lane " << t.lane << " arrived with mask 0x" << std::hex << mask << std::dec << " while lanes "
       << lanes_str(w.arrived) << " of this warp wait at " << coll_name(w.kind) << " (" << site_str(w.site)
       << ", mask 0x" << std::hex << w.mask << std::dec << "): divergent warp collectives";
    fail(os.str());
  }
  t.state = State::Warp;
  t.site = site;
  w.arrived |= bit;
  if (w.arrived == w.mask) {
    Thread* lanes = &rt.threads[t.warp * 32];
    switch (kind) {
      case Coll::MmaF16: case Coll::MmaBF16: compute_mma(rt, w, lanes); break;
      case Coll::LdmX4: case Coll::LdmX4T: case Coll::LdmX2: case Coll::LdmX2T: compute_ldmatrix(rt, w, lanes); break;
      case Coll::ShflXor: case Coll::ShflIdx: case Coll::ShflUp: case Coll::ShflDown: compute_shuffle(w, lanes); break;
      case Coll::Ballot: case Coll::Any: case Coll::All: compute_vote(w, lanes); break;
      default: break;
    }
    for (int l = 0; l < 32; ++l)
      if (w.mask >> l & 1u) make_runnable(rt, lanes[l]);
    w.kind = Coll::None;
    w.arrived = 0;
  }
  yield(t);
}

template <typename T>
inline T shuffle(Coll kind, unsigned mask, T var, int arg, int width, Site site) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  Thread& t = self();
  uint64_t bits = 0, out = 0;
  std::memcpy(&bits, &var, sizeof(T));
  t.value = bits;
  t.arg = arg;
  t.width = width;
  t.out = &out;
  warp_arrive(kind, mask, site);
  T r;
  std::memcpy(&r, &out, sizeof(T));
  return r;
}

inline uint32_t vote(Coll kind, unsigned mask, int pred, Site site) {
  Thread& t = self();
  uint64_t out = 0;
  t.value = pred != 0;
  t.out = &out;
  warp_arrive(kind, mask, site);
  return static_cast<uint32_t>(out);
}

// ---------------------------------------------------------------------------------------------
// cp.async

inline void cp_async_issue(void* dst, const void* src, bool pred, Site site) {
  Runtime& rt = runtime();
  Thread& t = self();
  auto* d = static_cast<unsigned char*>(dst);
  if (d < rt.smem || d + 16 > rt.smem + rt.smem_bytes) {
    std::ostringstream os;
    os << "cp_async_16 at " << site_str(site) << ": destination " << dst
       << " is outside the block's dynamic shared memory [" << static_cast<void*>(rt.smem) << ", +" << rt.smem_bytes
       << " bytes)";
    throw EmuError(os.str());
  }
  if (reinterpret_cast<uintptr_t>(dst) % 16 || reinterpret_cast<uintptr_t>(src) % 16) {
    std::ostringstream os;
    os << "cp_async_16 at " << site_str(site) << ": destination " << dst << " and source " << src
       << " must both be 16-byte aligned";
    throw EmuError(os.str());
  }
  CpAsync c;
  c.dst = d;
  if (pred) std::memcpy(c.bytes, src, 16);
  else std::memset(c.bytes, 0, 16);
  t.uncommitted.push_back(c);
}

inline void cp_async_commit_group() {
  Thread& t = self();
  t.committed.emplace_back(std::move(t.uncommitted));
  t.uncommitted.clear();
}

inline void cp_async_wait_groups(int n) {
  Thread& t = self();
  while (static_cast<int>(t.committed.size()) > n) {
    for (const CpAsync& c : t.committed.front()) std::memcpy(c.dst, c.bytes, 16);
    t.committed.pop_front();
  }
}

// ---------------------------------------------------------------------------------------------
// Fibers and the launch

inline void fiber_exit_checks(Runtime& rt, Thread& t) {
  size_t pending = t.uncommitted.size();
  for (const auto& g : t.committed) pending += g.size();
  if (pending)
    throw EmuError("the thread exits with " + std::to_string(pending) +
                   " cp.async copies never retired by cp_async_wait (" + std::to_string(t.uncommitted.size()) +
                   " of them never committed)");
  const Warp& w = rt.warps[t.warp];
  if (w.kind != Coll::None && (w.mask >> t.lane & 1u))
    throw EmuError("the thread exits while lanes " + lanes_str(w.arrived) + " of its warp wait for it at " +
                   coll_name(w.kind) + " (" + site_str(w.site) + "): divergent warp");
}

[[noreturn]] inline void fiber_main() {
  Runtime& rt = runtime();
  Thread& t = *rt.current;
  try {
    rt.body(rt.body_ctx);
    fiber_exit_checks(rt, t);
    t.state = State::Exited;
    --rt.live;
    rt.warps[t.warp].exited |= 1u << t.lane;
    release_barrier_if_complete(rt);
  } catch (const std::exception& e) {
    rt.failure = Failure{true, e.what(), &t};
  } catch (...) {
    rt.failure = Failure{true, "the kernel threw a non-standard exception", &t};
  }
  switch_context(t.ctx, rt.scheduler);
  std::abort();  // an exited fiber is never resumed
}

// The kernel's demangled name when it is an exported symbol; otherwise (internal linkage, e.g. an
// anonymous namespace) its module and offset, for addr2line, and its signature.
inline std::string kernel_name(const void* fn, const char* signature) {
  Dl_info info;
  std::ostringstream os;
  const bool found = dladdr(fn, &info) != 0;
  if (found && info.dli_sname && info.dli_saddr == fn) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    os << (status == 0 && d ? d : info.dli_sname);
    std::free(d);
  } else {
    os << "kernel " << signature << " at ";
    if (found && info.dli_fname)
      os << info.dli_fname << "+0x" << std::hex
         << (reinterpret_cast<uintptr_t>(fn) - reinterpret_cast<uintptr_t>(info.dli_fbase));
    else
      os << fn;
  }
  return os.str();
}

inline std::string demangled_type(const char* mangled) {
  int status = 0;
  char* d = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
  std::string s = status == 0 && d ? d : mangled;
  std::free(d);
  return s;
}

inline std::string dims_str(uint3 v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}

inline std::string deadlock_report(const Runtime& rt) {
  std::ostringstream os;
  os << "deadlock: no thread can make progress (" << rt.live << " live)";
  int shown = 0;
  for (const Thread& t : rt.threads) {
    if (t.state == State::Exited || t.state == State::Runnable) continue;
    if (shown++ == 8) {
      os << "; ...";
      break;
    }
    os << "; thread " << dims_str(t.tid) << " waits at "
       << (t.state == State::Barrier ? "__syncthreads" : coll_name(rt.warps[t.warp].kind)) << " ("
       << site_str(t.site) << ")";
  }
  return os.str();
}

// Runs every block of the grid; `body(ctx)` is one thread's kernel invocation.
inline void run_grid(const void* kernel, const char* signature, dim3 grid, dim3 block, size_t smem_bytes, void (*body)(void*), void* ctx) {
  Runtime& rt = runtime();
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  auto launch_error = [&](const std::string& why) {
    return std::runtime_error("simt emulation: launch of " + kernel_name(kernel, signature) + " with grid " +
                              dims_str(uint3{grid.x, grid.y, grid.z}) + ", block " +
                              dims_str(uint3{block.x, block.y, block.z}) + ", " + std::to_string(smem_bytes) +
                              " bytes of shared memory: " + why);
  };
  if (rt.active) throw launch_error("a kernel launched another kernel (not supported)");
  if (nthreads == 0 || nthreads > 1024 || block.z > 64) throw launch_error("invalid block size");
  if (nblocks == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu) throw launch_error("invalid grid size");
  if (smem_bytes > 227 * 1024) throw launch_error("more dynamic shared memory than any GPU has (227 KiB)");

  const char* seed_env = std::getenv("FF_SIMT_SEED");
  const uint64_t seed = seed_env ? std::strtoull(seed_env, nullptr, 0) : 0x5EEDull;
  rt.rng_state = seed * 0x9E3779B97F4A7C15ull + (++rt.launches);

  rt.reserve_stacks(nthreads);
  rt.threads.clear();
  rt.threads.resize(nthreads);
  rt.warps.assign((nthreads + 31) / 32, Warp{});
  rt.grid = grid;
  rt.block = block;
  rt.smem_storage.assign(smem_bytes + 128, 0);
  rt.smem = rt.smem_storage.data() + (128 - reinterpret_cast<uintptr_t>(rt.smem_storage.data()) % 128) % 128;
  rt.smem_bytes = smem_bytes;
  rt.body = body;
  rt.body_ctx = ctx;
  rt.failure = Failure{};

  std::vector<uint64_t> order(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) order[i] = i;
  for (uint64_t i = nblocks; i > 1; --i) std::swap(order[i - 1], order[rt.next_random() % i]);

  rt.active = true;
  struct Deactivate {
    Runtime& rt;
    ~Deactivate() { rt.active = false; rt.current = nullptr; }
  } deactivate{rt};

  for (uint64_t b : order) {
    rt.block_idx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                         static_cast<unsigned>(b / (uint64_t(grid.x) * grid.y))};
    std::memset(rt.smem, 0xff, smem_bytes);
    rt.runnable.clear();
    rt.at_barrier.clear();
    rt.live = static_cast<int>(nthreads);
    for (Warp& w : rt.warps) w = Warp{};
    if (nthreads % 32) rt.warps.back().exited = ~((1u << (nthreads % 32)) - 1);
    for (uint64_t i = 0; i < nthreads; ++i) {
      Thread& t = rt.threads[i];
      t.tid = uint3{static_cast<unsigned>(i % block.x), static_cast<unsigned>(i / block.x % block.y),
                    static_cast<unsigned>(i / (uint64_t(block.x) * block.y))};
      t.linear = static_cast<unsigned>(i);
      t.warp = static_cast<unsigned>(i / 32);
      t.lane = static_cast<unsigned>(i % 32);
      t.uncommitted.clear();
      t.committed.clear();
      make_context(t.ctx, rt.stack_of(i), Runtime::kStackBytes, &fiber_main);
      make_runnable(rt, t);
    }
    while (rt.live > 0) {
      if (rt.runnable.empty()) {
        throw std::runtime_error("simt emulation: " + kernel_name(kernel, signature) + " block " + dims_str(rt.block_idx) +
                                 ": " + deadlock_report(rt));
      }
      const size_t k = rt.next_random() % rt.runnable.size();
      std::swap(rt.runnable[k], rt.runnable.back());
      Thread* t = rt.runnable.back();
      rt.runnable.pop_back();
      rt.current = t;
      switch_context(rt.scheduler, t->ctx);
      rt.current = nullptr;
      if (rt.failure.failed) {
        const Thread& f = *rt.failure.thread;
        throw std::runtime_error("simt emulation: " + kernel_name(kernel, signature) + " block " + dims_str(rt.block_idx) +
                                 " thread " + dims_str(f.tid) + " (warp " + std::to_string(f.warp) + ", lane " +
                                 std::to_string(f.lane) + "): " + rt.failure.message);
      }
    }
  }
}

inline unsigned char* dynamic_smem() {
  self();
  return runtime().smem;
}

}  // namespace ff::simt::emu

#include "simt/simt_emu_cuda.h"
