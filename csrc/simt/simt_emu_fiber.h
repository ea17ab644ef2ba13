// SIMT host emulation (simt_emu.h): fiber contexts, the stack switch every emulated CUDA thread
// runs on. Included by simt_emu.h only.
#pragma once

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

}  // namespace ff::simt::emu
