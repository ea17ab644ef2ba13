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

namespace ff::simt::emu {

// ---------------------------------------------------------------------------------------------
// Fiber contexts. On x86-64 a 16-instruction switch (callee-saved registers, MXCSR and the x87
// control word); elsewhere ucontext (whose swapcontext makes a signal-mask system call per switch).

#ifndef FF_SIMT_EMU_USE_UCONTEXT
struct Context {
  void* sp = nullptr;
};

// Saves the callee-saved state on the current stack, stores the stack pointer in *save and resumes
// the context whose stack pointer is `to`.
__attribute__((naked, noinline)) inline void switch_stack(void** /*save*/, void* /*to*/) {
  __asm__ volatile(
      "pushq %rbp\n\t"
      "pushq %rbx\n\t"
      "pushq %r12\n\t"
      "pushq %r13\n\t"
      "pushq %r14\n\t"
      "pushq %r15\n\t"
      "subq $8, %rsp\n\t"
      "stmxcsr (%rsp)\n\t"
      "fnstcw 4(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\t"
      "movq %rsi, %rsp\n\t"
      "ldmxcsr (%rsp)\n\t"
      "fldcw 4(%rsp)\n\t"
      "addq $8, %rsp\n\t"
      "popq %r15\n\t"
      "popq %r14\n\t"
      "popq %r13\n\t"
      "popq %r12\n\t"
      "popq %rbx\n\t"
      "popq %rbp\n\t"
      "ret\n\t");
}

inline void switch_context(Context& from, Context& to) { switch_stack(&from.sp, to.sp); }

// A context that starts `entry` (which must never return) on the stack [lo, lo + size).
inline void make_context(Context& c, char* lo, size_t size, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(lo) + size) & ~uintptr_t(15);
  uint64_t* s = reinterpret_cast<uint64_t*>(top);
  s[-1] = 0;                                    // fake return address of `entry`
  s[-2] = reinterpret_cast<uint64_t>(entry);    // popped by `ret`: entry runs with rsp % 16 == 8
  for (int i = 3; i <= 8; ++i) s[-i] = 0;       // rbp rbx r12 r13 r14 r15
  uint32_t csr[2] = {0, 0};
  __asm__ volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(csr[0]), "=m"(csr[1]));
  std::memcpy(&s[-9], csr, 8);                  // MXCSR, x87 control word
  c.sp = &s[-9];
}
#else
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void make_context(Context& c, char* lo, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = lo;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

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

// ---------------------------------------------------------------------------------------------
// The interface of simt.cuh

#define FF_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::ff::simt::emu::dynamic_smem())

#define FF_SIMT_SITE_PARAMS const char *ff_file_ = __builtin_FILE(), int ff_line_ = __builtin_LINE()
#define FF_SIMT_SITE ::ff::simt::emu::Site{ff_file_, ff_line_}

namespace ff::simt {

// D += A * B for one m16n8k16 tile; T is __half or __nv_bfloat16 (the type of A and B).
template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], FF_SIMT_SITE_PARAMS) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "mma_m16n8k16: T is __half or __nv_bfloat16");
  emu::Thread& t = emu::self();
  t.out = d;
  t.in_a = a;
  t.in_b = b;
  emu::warp_arrive(std::is_same_v<T, __half> ? emu::Coll::MmaF16 : emu::Coll::MmaBF16, 0xffffffffu, FF_SIMT_SITE);
}

namespace emu {
template <int N>
inline void ldmatrix(Coll kind, uint32_t* r, const void* row, Site site) {
  Thread& t = self();
  t.out = r;
  t.in_a = row;
  warp_arrive(kind, 0xffffffffu, site);
}
}  // namespace emu

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, FF_SIMT_SITE_PARAMS) {
  emu::ldmatrix<4>(emu::Coll::LdmX4, r, row, FF_SIMT_SITE);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row, FF_SIMT_SITE_PARAMS) {
  emu::ldmatrix<4>(emu::Coll::LdmX4T, r, row, FF_SIMT_SITE);
}
inline void ldmatrix_x2(uint32_t (&r)[2], const void* row, FF_SIMT_SITE_PARAMS) {
  emu::ldmatrix<2>(emu::Coll::LdmX2, r, row, FF_SIMT_SITE);
}
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row, FF_SIMT_SITE_PARAMS) {
  emu::ldmatrix<2>(emu::Coll::LdmX2T, r, row, FF_SIMT_SITE);
}

// 16-byte asynchronous copy global -> shared; the bytes land at the cp_async_wait that retires the group.
inline void cp_async_16(void* dst, const void* src, bool pred, FF_SIMT_SITE_PARAMS) {
  emu::cp_async_issue(dst, src, pred, FF_SIMT_SITE);
}
inline void cp_async_commit() { emu::cp_async_commit_group(); }
template <int N>
inline void cp_async_wait() {
  emu::cp_async_wait_groups(N);
}

template <typename T>
inline uint32_t pack2(float lo, float hi) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "pack2: T is __half or __nv_bfloat16");
  uint16_t l, h;
  if constexpr (std::is_same_v<T, __half>) {
    l = __half_as_ushort(__float2half_rn(lo));
    h = __half_as_ushort(__float2half_rn(hi));
  } else {
    l = __bfloat16_as_ushort(__float2bfloat16_rn(lo));
    h = __bfloat16_as_ushort(__float2bfloat16_rn(hi));
  }
  return static_cast<uint32_t>(l) | static_cast<uint32_t>(h) << 16;
}

// Runs the grid to completion on the calling thread (see the header comment); `stream` is ignored.
template <typename... KArgs, typename Stream, typename... Args>
inline void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, Stream /*stream*/,
                   Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "launch: wrong number of kernel arguments");
  // Converted once, as the real launch converts the arguments into the parameter buffer; every
  // thread then gets its own copy.
  std::tuple<std::decay_t<KArgs>...> params(std::forward<Args>(args)...);
  struct Call {
    void (*kernel)(KArgs...);
    std::tuple<std::decay_t<KArgs>...>* params;
    static void run(void* self) {
      auto* c = static_cast<Call*>(self);
      std::apply(c->kernel, *c->params);
    }
  } call{kernel, &params};
  static const std::string signature = emu::demangled_type(typeid(kernel).name());
  emu::run_grid(reinterpret_cast<const void*>(kernel), signature.c_str(), grid, block, smem_bytes, &Call::run, &call);
}

}  // namespace ff::simt

// ---------------------------------------------------------------------------------------------
// CUDA built-ins for host code

#define threadIdx (::ff::simt::emu::self().tid)
#define blockIdx (::ff::simt::emu::runtime().block_idx)
#define blockDim (::ff::simt::emu::runtime().block)
#define gridDim (::ff::simt::emu::runtime().grid)
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

constexpr int warpSize = 32;

inline void __syncthreads(FF_SIMT_SITE_PARAMS) { ::ff::simt::emu::syncthreads(FF_SIMT_SITE); }
inline void __syncwarp(unsigned mask = 0xffffffffu, FF_SIMT_SITE_PARAMS) {
  ::ff::simt::emu::self().out = nullptr;
  ::ff::simt::emu::warp_arrive(::ff::simt::emu::Coll::SyncWarp, mask, FF_SIMT_SITE);
}
inline void __threadfence_block() {}
inline void __threadfence() {}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32, FF_SIMT_SITE_PARAMS) {
  return ::ff::simt::emu::shuffle(::ff::simt::emu::Coll::ShflXor, mask, var, laneMask, width, FF_SIMT_SITE);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32, FF_SIMT_SITE_PARAMS) {
  return ::ff::simt::emu::shuffle(::ff::simt::emu::Coll::ShflIdx, mask, var, srcLane, width, FF_SIMT_SITE);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, FF_SIMT_SITE_PARAMS) {
  return ::ff::simt::emu::shuffle(::ff::simt::emu::Coll::ShflUp, mask, var, static_cast<int>(delta), width,
                                  FF_SIMT_SITE);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, FF_SIMT_SITE_PARAMS) {
  return ::ff::simt::emu::shuffle(::ff::simt::emu::Coll::ShflDown, mask, var, static_cast<int>(delta), width,
                                  FF_SIMT_SITE);
}
inline unsigned __ballot_sync(unsigned mask, int pred, FF_SIMT_SITE_PARAMS) {
  return ::ff::simt::emu::vote(::ff::simt::emu::Coll::Ballot, mask, pred, FF_SIMT_SITE);
}
inline int __any_sync(unsigned mask, int pred, FF_SIMT_SITE_PARAMS) {
  return static_cast<int>(::ff::simt::emu::vote(::ff::simt::emu::Coll::Any, mask, pred, FF_SIMT_SITE));
}
inline int __all_sync(unsigned mask, int pred, FF_SIMT_SITE_PARAMS) {
  return static_cast<int>(::ff::simt::emu::vote(::ff::simt::emu::Coll::All, mask, pred, FF_SIMT_SITE));
}

// Atomics: fibers of one launch never run concurrently, so a plain read-modify-write is atomic.
inline float atomicAdd(float* p, float v) { float o = *p; *p = o + v; return o; }
inline double atomicAdd(double* p, double v) { double o = *p; *p = o + v; return o; }
inline int atomicAdd(int* p, int v) { int o = *p; *p = o + v; return o; }
inline unsigned atomicAdd(unsigned* p, unsigned v) { unsigned o = *p; *p = o + v; return o; }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  unsigned long long o = *p; *p = o + v; return o;
}
inline int atomicMax(int* p, int v) { int o = *p; *p = o > v ? o : v; return o; }
inline int atomicMin(int* p, int v) { int o = *p; *p = o < v ? o : v; return o; }
inline int atomicExch(int* p, int v) { int o = *p; *p = v; return o; }
inline int atomicCAS(int* p, int cmp, int v) { int o = *p; if (o == cmp) *p = v; return o; }
inline unsigned atomicCAS(unsigned* p, unsigned cmp, unsigned v) { unsigned o = *p; if (o == cmp) *p = v; return o; }

// Math intrinsics. glibc declares __expf & co. itself (as aliases of its own functions), so those
// are macros; the emulation computes them with the accurate library function (the GPU's are approximate).
#define __expf(x) ::std::exp(static_cast<float>(x))
#define __logf(x) ::std::log(static_cast<float>(x))
#define __log2f(x) ::std::log2(static_cast<float>(x))
#define __sinf(x) ::std::sin(static_cast<float>(x))
#define __cosf(x) ::std::cos(static_cast<float>(x))
#define __tanf(x) ::std::tan(static_cast<float>(x))
#define __powf(x, y) ::std::pow(static_cast<float>(x), static_cast<float>(y))
#define __exp10f(x) ::std::pow(10.f, static_cast<float>(x))
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.f / std::sqrt(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __saturatef(float x) { return x > 0.f ? (x < 1.f ? x : 1.f) : 0.f; }  // NaN -> 0
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline int __float_as_int(float x) { int u; std::memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned u) { float x; std::memcpy(&x, &u, 4); return x; }
inline float __int_as_float(int u) { float x; std::memcpy(&x, &u, 4); return x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t(a) * b) >> 32); }
template <typename T>
inline T __ldg(const T* p) { return *p; }

// CUDA's integer/float min and max overloads (C++ host code has only std::min/std::max).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(int a, unsigned b) { return min(static_cast<unsigned>(a), b); }
inline unsigned max(int a, unsigned b) { return max(static_cast<unsigned>(a), b); }
inline unsigned min(unsigned a, int b) { return min(a, static_cast<unsigned>(b)); }
inline unsigned max(unsigned a, int b) { return max(a, static_cast<unsigned>(b)); }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline double min(float a, double b) { return std::fmin(double(a), b); }
inline double max(float a, double b) { return std::fmax(double(a), b); }
inline double min(double a, float b) { return std::fmin(a, double(b)); }
inline double max(double a, float b) { return std::fmax(a, double(b)); }
