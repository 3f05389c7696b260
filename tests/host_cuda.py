"""Test support: the CUDA C that ops/jit/lower.py generates, compiled with g++ and run on the CPU on numpy arrays,
so the lowering is checked where there is no GPU (tests/test_jit_host.py holds it to the interpreter).

    emulate(ir, num_threads, arrays, grid, scalars)   # the signature of ops.jit.core._launch

How it runs. The generated source (lower.generate) is prefixed with HOST_PRELUDE, which defines the CUDA pieces
the lowering emits (__global__, __shared__ as `static`, __ldg, uint4/uint2, bit casts, rsqrtf, shuffles,
__syncthreads, threadIdx, ...) for a host compiler, and suffixed with a wrapper that calls the kernel from a
`void **` argument list; prelude.PRELUDE's PTX conversions have integer host versions under #ifndef __CUDA_ARCH__.
Each source is compiled once (g++ -O1 -shared -fPIC) into a .so cached by the SHA-256 of what was compiled, in
memory and on disk (CUPYLLM_HOST_CUDA_CACHE, default $TMPDIR/cupyllm-host-cuda-<uid>). `run_source` runs any
CUDA C kernel of that shape (tests/test_jit_host.py checks the emulator itself with a hand-written one).

The runtime (RUNTIME, one .so loaded RTLD_GLOBAL) runs the blocks one after another. Within a block every CUDA
thread is a fiber on its own stack in one OS thread, switched only at barriers: __syncthreads waits for the whole
block, a shuffle or __syncwarp for the 32 lanes of its warp (values pass through a per-warp slot array), and a
barrier not reached by every thread it waits for is reported as an error (on a GPU: a hang or undefined
behaviour). Warps run in turn between block barriers, in forward order on even blocks and backward on odd ones,
so a missing __syncthreads shows up as a wrong result whichever warp writes first. `static` shared arrays keep
their contents between blocks, like uninitialised shared memory. Fibers switch by a few lines of x86-64 assembly
(elsewhere, or with CUPYLLM_HOST_CUDA_UCONTEXT=1, by swapcontext). Lanes of a warp are not in lockstep: as under
CUDA's independent thread scheduling, nothing orders two lanes between barriers.

Memory: each array (arrays that overlap, such as two views of one buffer, share one copy) is copied between
PROT_NONE guard pages with 0xff filler around it (NaN in every float format); an access that faults (a guard
page, a misaligned 16/8-byte vector access, an integer division by zero) or a write into the filler fails the
launch with the operand and offset; outputs are copied back into the caller's arrays.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import mmap
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from ops.jit import core, lower
from ops.jit.ir import KernelIR

CXX = os.environ.get("CXX_HOST_CUDA") or shutil.which("g++")
FLAGS = ("-std=c++17", "-O1", "-shared", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing",
         "-ffp-contract=off", "-fno-fast-math", "-U_FORTIFY_SOURCE", "-w")
FILL = 0xFF          # filler around the arrays: NaN as float32/fp16/bf16/fp8 bits, -1 as int32
PAGE = mmap.PAGESIZE

# Not a raw string, so that a backslash at a line's end joins the next line to it: long lines are wrapped that way,
# the text unchanged. Write any other backslash doubled.
HOST_PRELUDE = """// tests/host_cuda.py: the CUDA pieces ops/jit/lower.py emits, for a host C++ compiler
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static  /* blocks run one after another; a static local is shared by the block's threads */
#define EMU_API extern "C" __attribute__((visibility("default")))
struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; };
EMU_API uint3 threadIdx, blockIdx;
EMU_API dim3 blockDim, gridDim;
EMU_API void emu_syncthreads(void);
EMU_API void emu_syncwarp(unsigned mask);
EMU_API unsigned long long emu_shfl(int kind, unsigned mask, unsigned long long bits, int arg, int width);
EMU_API const unsigned char *emu_exchange(const void *mine, int bytes);
EMU_API void emu_misaligned(const void *p, int align, const char *what);
EMU_API void emu_fail(const char *what);
EMU_API unsigned char *emu_dyn_smem;
EMU_API long long emu_dyn_smem_bytes;
static const int warpSize = 32;

static inline void emu_aligned(const void *p, int align, const char *what) {
    if ((uintptr_t)p % (uintptr_t)align) emu_misaligned(p, align, what);
}
static inline void __syncthreads(void) { emu_syncthreads(); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) { emu_syncwarp(mask); }
template <class T> static inline T emu_shfl_t(int kind, unsigned mask, T v, int arg, int width) {
    static_assert(sizeof(T) <= 8, "a shuffle moves at most 8 bytes");
    unsigned long long b = 0;
    __builtin_memcpy(&b, &v, sizeof(T));
    b = emu_shfl(kind, mask, b, arg, width);
    T r;
    __builtin_memcpy(&r, &b, sizeof(T));
    return r;
}
template <class T> static inline T __shfl_sync(unsigned m, T v, int lane, int w = 32) { \
return emu_shfl_t(0, m, v, lane, w); }
template <class T> static inline T __shfl_up_sync(unsigned m, T v, unsigned d, int w = 32) { \
return emu_shfl_t(1, m, v, (int)d, w); }
template <class T> static inline T __shfl_down_sync(unsigned m, T v, unsigned d, int w = 32) { \
return emu_shfl_t(2, m, v, (int)d, w); }
template <class T> static inline T __shfl_xor_sync(unsigned m, T v, int lm, int w = 32) { \
return emu_shfl_t(3, m, v, lm, w); }

static inline float __uint_as_float(unsigned u) { float f; __builtin_memcpy(&f, &u, 4); return f; }
static inline float __int_as_float(int u) { float f; __builtin_memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; __builtin_memcpy(&u, &f, 4); return u; }
static inline int __float_as_int(float f) { int u; __builtin_memcpy(&u, &f, 4); return u; }
// threads switch only at barriers, so a read-modify-write is atomic as it stands
static inline int atomicAdd(int *p, int v) { int old = *p; *p = old + v; return old; }
static inline float rsqrtf(float x) { return 1.f / sqrtf(x); }  // the interpreter's 1/sqrt (the GPU's is ~1 ulp off)
static inline float __fdividef(float a, float b) { return a / b; }
static inline float __saturatef(float x) { return x > 0.f ? (x < 1.f ? x : 1.f) : 0.f; }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }

// CUDA's vector types; their copies check the alignment a GPU's vector access needs (it faults otherwise)
struct __attribute__((aligned(16))) uint4 {
    unsigned x, y, z, w;
    uint4() = default;
    uint4(const uint4 &o) { emu_aligned(&o, 16, "16-byte vector load"); x = o.x; y = o.y; z = o.z; w = o.w; }
    uint4 &operator=(const uint4 &o) {
        emu_aligned(this, 16, "16-byte vector store");
        x = o.x; y = o.y; z = o.z; w = o.w;
        return *this;
    }
};
struct __attribute__((aligned(8))) uint2 {
    unsigned x, y;
    uint2() = default;
    uint2(const uint2 &o) { emu_aligned(&o, 8, "8-byte vector load"); x = o.x; y = o.y; }
    uint2 &operator=(const uint2 &o) { emu_aligned(this, 8, "8-byte vector store"); x = o.x; y = o.y; return *this; }
};
static inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { uint4 r; r.x = a; r.y = b; r.z = c; \
r.w = d; return r; }
static inline uint2 make_uint2(unsigned a, unsigned b) { uint2 r; r.x = a; r.y = b; return r; }
template <class T> static inline T __ldg(const T *p) { emu_aligned(p, alignof(T), "__ldg"); return *p; }
#line 1 "generated.cu"
"""

# Raw up to the context switch's asm (its \n escapes are the assembler's), then not raw, so that a backslash at a
# line's end joins the next line to it: long lines are wrapped that way, the text unchanged.
RUNTIME = r"""// tests/host_cuda.py: blocks in turn, a block's threads as fibers switched at barriers
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#if !defined(__x86_64__) || defined(EMU_UCONTEXT)
#define EMU_USE_UCONTEXT 1
#include <ucontext.h>
#endif
#define EMU_API extern "C" __attribute__((visibility("default")))

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; };
EMU_API uint3 threadIdx, blockIdx;
EMU_API dim3 blockDim, gridDim;
uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

#ifdef EMU_USE_UCONTEXT
typedef ucontext_t Ctx;
static void ctx_swap(Ctx *save, Ctx *load) { swapcontext(save, load); }
static void ctx_make(Ctx *c, char *stack, size_t size, void (*entry)()) {
    getcontext(c);
    c->uc_stack.ss_sp = stack;
    c->uc_stack.ss_size = size;
    c->uc_link = nullptr;
    makecontext(c, entry, 0);
}
#else
struct Ctx { void *sp; };
extern "C" void emu_swap_sp(void **save, void *load);
// callee-saved registers onto the old stack, switch stacks, pop them from the new one (x86-64 System V)
asm(".text\n.p2align 4\n.globl emu_swap_sp\n.hidden emu_swap_sp\n.type emu_swap_sp,@function\nemu_swap_sp:\n"
    "pushq %rbp\npushq %rbx\npushq %r12\npushq %r13\npushq %r14\npushq %r15\n"
    "movq %rsp, (%rdi)\nmovq %rsi, %rsp\n"
    "popq %r15\npopq %r14\npopq %r13\npopq %r12\npopq %rbx\npopq %rbp\nret\n"
    ".size emu_swap_sp, .-emu_swap_sp\n");
""" + """\
static void ctx_swap(Ctx *save, Ctx *load) { emu_swap_sp(&save->sp, load->sp); }
static void ctx_make(Ctx *c, char *stack, size_t size, void (*entry)()) {
    void **sp = (void **)(((uintptr_t)(stack + size)) & ~(uintptr_t)15);
    *--sp = nullptr;          // entry's return address (it never returns)
    *--sp = (void *)entry;    // emu_swap_sp's `ret` lands here, with the stack as after a call
    for (int i = 0; i < 6; ++i) *--sp = nullptr;
    c->sp = sp;
}
#endif

enum { RUN, AT_WARP, AT_BLOCK, DONE };
static const char *WARP_OPS[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync", "__syncwarp",
                                 "a warp-collective (mma.sync, ldmatrix)"};
enum { XSLOT = 64 };  // bytes a lane puts into a warp-collective exchange
#define EMU_MAX_DYN_SMEM (256 << 10)  // an H100 block's is 227 KB
struct Fiber { Ctx ctx; int state, warp_op; long long nwarp, nblock; };

static Fiber *g_f;
static Ctx g_sched;
static volatile int g_cur = -1;
static int g_nt;
static long long g_block;
static unsigned long long *g_slots;  // [2][nt]: shuffle k writes half k & 1
static unsigned char *g_xslots;       // [2][nt][XSLOT]: the same for warp-collective exchanges
EMU_API unsigned char *emu_dyn_smem;  // the block's dynamic shared memory (extern __shared__), refilled per block
EMU_API long long emu_dyn_smem_bytes;
unsigned char *emu_dyn_smem;
long long emu_dyn_smem_bytes;
static void (*g_invoke)(void **);
static void **g_args;
static char g_err[2048];
static int g_failed;
static char *g_stacks;
static size_t g_stack, g_stacks_len;
static sigjmp_buf g_jmp;
static volatile sig_atomic_t g_sig;
static void *volatile g_addr;
static volatile int g_sig_thread;

static void fail(const char *fmt, ...) {
    if (g_failed) return;
    g_failed = 1;
    int n = snprintf(g_err, sizeof g_err, "block %lld%s", g_block, g_cur >= 0 ? "" : ": ");
    if (g_cur >= 0) n += snprintf(g_err + n, sizeof g_err - n, " thread %d: ", g_cur);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_err + n, sizeof g_err - n, fmt, ap);
    va_end(ap);
}

static void to_scheduler(int state) {
    g_f[g_cur].state = state;
    ctx_swap(&g_f[g_cur].ctx, &g_sched);
}

[[noreturn]] static void abandon(void) {  // the launch has failed: this fiber is never resumed
    to_scheduler(DONE);
    abort();
}

EMU_API void emu_misaligned(const void *p, int align, const char *what) {
    fail("%s at %p, not %d-byte aligned (a GPU faults: misaligned address)", what, p, align);
    abandon();
}

EMU_API void emu_syncthreads(void) {
    ++g_f[g_cur].nblock;
    to_scheduler(AT_BLOCK);
}

static void warp_barrier(int op) {
    Fiber &f = g_f[g_cur];
    f.warp_op = op;
    ++f.nwarp;
    to_scheduler(AT_WARP);
}

EMU_API void emu_syncwarp(unsigned mask) {
    if (mask != 0xffffffffu) { fail("__syncwarp(0x%x): only the full mask is emulated", mask); abandon(); }
    warp_barrier(4);
}

EMU_API unsigned long long emu_shfl(int kind, unsigned mask, unsigned long long bits, int arg, int width) {
    if (mask != 0xffffffffu) { fail("%s(0x%x, ...): only the full mask is emulated", WARP_OPS[kind], mask); abandon(); }
    if (width < 1 || width > 32 || (width & (width - 1))) { \
fail("%s: width %d is not a power of 2 up to 32", WARP_OPS[kind], width); abandon(); }
    if (arg < 0 || arg > 31) { fail("%s: lane argument %d outside [0, 32)", WARP_OPS[kind], arg); abandon(); }
    const int me = g_cur, half = (int)(g_f[me].nwarp & 1) * g_nt;
    g_slots[half + me] = bits;
    warp_barrier(kind);
    // every lane has written its value; half k & 1 is next written at warp barrier k + 2, after all have read
    const int lane = me & 31, seg = lane & ~(width - 1);
    int src = lane;
    switch (kind) {
        case 0: src = seg + (arg & (width - 1)); break;
        case 1: src = lane - arg < seg ? lane : lane - arg; break;
        case 2: src = lane + arg >= seg + width ? lane : lane + arg; break;
        case 3: src = (lane ^ arg) >= seg + width ? lane : (lane ^ arg); break;
    }
    return g_slots[half + (me - lane) + src];
}

// A warp-collective op (the host versions of mma.sync and ldmatrix, tests/host_mma.py): every lane puts `bytes` of
// its operands in, waits for the warp, and reads all 32 lanes' (lane l's at l * XSLOT), until its next warp barrier.
EMU_API const unsigned char *emu_exchange(const void *mine, int bytes) {
    if (bytes > XSLOT) { fail("emu_exchange of %d bytes: at most %d", bytes, (int)XSLOT); abandon(); }
    const int me = g_cur, lane = me & 31;
    unsigned char *half = g_xslots + (size_t)(g_f[me].nwarp & 1) * g_nt * XSLOT;
    memcpy(half + (size_t)me * XSLOT, mine, (size_t)bytes);
    warp_barrier(5);
    return half + (size_t)(me - lane) * XSLOT;
}

EMU_API void emu_fail(const char *what) {
    fail("%s", what);
    abandon();
}

static void fiber_entry() {
    g_invoke(g_args);
    abandon();  // DONE; never resumed
}

static void resume(int t) {
    g_cur = t;
    threadIdx.x = (unsigned)t;
    ctx_swap(&g_sched, &g_f[t].ctx);
    g_cur = -1;
}

static int run_block(bool forward) {
    for (int t = 0; t < g_nt; ++t) {
        ctx_make(&g_f[t].ctx, g_stacks + (size_t)t * g_stack + (size_t)getpagesize(), g_stack - getpagesize(), \
fiber_entry);
        g_f[t].state = RUN;
        g_f[t].nwarp = g_f[t].nblock = 0;
    }
    const int nw = g_nt / 32;
    for (;;) {
        for (int i = 0; i < nw; ++i) {
            const int w = forward ? i : nw - 1 - i;
            Fiber *lanes = g_f + 32 * w;
            for (;;) {  // this warp until each lane waits at __syncthreads or has returned
                for (int l = 0; l < 32; ++l) {
                    if (lanes[l].state == RUN) resume(32 * w + l);
                    if (g_failed) return -1;
                }
                int at = 0, block = 0, done = 0;
                for (int l = 0; l < 32; ++l) {
                    at += lanes[l].state == AT_WARP;
                    block += lanes[l].state == AT_BLOCK;
                    done += lanes[l].state == DONE;
                }
                if (!at) break;
                int first = 0;
                while (lanes[first].state != AT_WARP) ++first;
                if (at < 32) {
                    fail("warp %d: %s reached by %d of its 32 lanes (%d wait at __syncthreads, %d returned): "
                         "a hang or undefined behaviour on a GPU", w, WARP_OPS[lanes[first].warp_op], at, block, done);
                    return -1;
                }
                for (int l = 0; l < 32; ++l)
                    if (lanes[l].nwarp != lanes[0].nwarp || lanes[l].warp_op != lanes[0].warp_op) {
                        fail("warp %d: lane 0 is at its warp barrier %lld (%s), lane %d at %lld (%s)", \
w, lanes[0].nwarp,
                             WARP_OPS[lanes[0].warp_op], l, lanes[l].nwarp, WARP_OPS[lanes[l].warp_op]);
                        return -1;
                    }
                for (int l = 0; l < 32; ++l) lanes[l].state = RUN;
            }
        }
        int block = 0, done = 0;
        for (int t = 0; t < g_nt; ++t) {
            block += g_f[t].state == AT_BLOCK;
            done += g_f[t].state == DONE;
        }
        if (done == g_nt) return 0;
        if (block != g_nt) {
            fail("__syncthreads reached by %d of %d threads, %d returned without it: undefined behaviour on a GPU",
                 block, g_nt, done);
            return -1;
        }
        for (int t = 0; t < g_nt; ++t)
            if (g_f[t].nblock != g_f[0].nblock) {
                fail("thread 0 is at its __syncthreads %lld, thread %d at %lld", g_f[0].nblock, t, g_f[t].nblock);
                return -1;
            }
        for (int t = 0; t < g_nt; ++t) g_f[t].state = RUN;
    }
}

static void on_fault(int sig, siginfo_t *info, void *) {
    g_sig = sig;
    g_addr = info->si_addr;
    g_sig_thread = g_cur;
    siglongjmp(g_jmp, 1);
}

EMU_API const char *emu_error(void) { return g_err; }
EMU_API void *emu_fault_address(void) { return g_addr; }
EMU_API void *emu_map(size_t len) {
    void *p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? nullptr : p;
}
EMU_API int emu_guard(void *p, size_t len) { return mprotect(p, len, PROT_NONE); }
EMU_API int emu_unmap(void *p, size_t len) { return munmap(p, len); }

// 0: done; -1: failed (emu_error says why; emu_fault_address is set for a fault). A grid of gx x gy x gz blocks
// (x fastest), each with smem_bytes of dynamic shared memory (0xff filler, a guard page after it).
EMU_API int emu_launch_grid(void (*invoke)(void **), void **args, long long gx, long long gy, long long gz, int nt,
                            long long stack_bytes, long long smem_bytes) {
    const long long blocks = gx * gy * gz;
    g_failed = 0;
    g_err[0] = 0;
    g_addr = nullptr;
    g_cur = -1;
    g_block = -1;
    if (nt < 32 || nt > 1024 || nt % 32) { fail("%d threads a block: a multiple of 32 up to 1024 is emulated", nt); \
return -1; }
    const size_t page = (size_t)getpagesize();
    g_stack = page + ((size_t)stack_bytes + page - 1) / page * page;  // a guard page below each stack
    g_stacks_len = g_stack * (size_t)nt;
    g_stacks = (char *)emu_map(g_stacks_len);
    g_f = (Fiber *)calloc((size_t)nt, sizeof(Fiber));
    g_slots = (unsigned long long *)calloc(2 * (size_t)nt, sizeof(unsigned long long));
    g_xslots = (unsigned char *)calloc(2 * (size_t)nt, XSLOT);
    // one mapping for every launch (the same addresses each time), the used part ending at its guard page
    static unsigned char *smem_map;
    const size_t smem_len = (size_t)EMU_MAX_DYN_SMEM;
    if (!smem_map && (smem_map = (unsigned char *)emu_map(smem_len + page))) emu_guard(smem_map + smem_len, page);
    if (!g_stacks || !g_f || !g_slots || !g_xslots || !smem_map) { \
fail("out of memory for %d fiber stacks", nt); return -1; }
    if (smem_bytes < 0 || smem_bytes > EMU_MAX_DYN_SMEM) { \
fail("%lld bytes of dynamic shared memory: at most %d are emulated", smem_bytes, EMU_MAX_DYN_SMEM); return -1; }
    emu_dyn_smem = smem_bytes ? smem_map + (smem_len - (size_t)smem_bytes) / 128 * 128 : nullptr;
    emu_dyn_smem_bytes = smem_bytes;
    for (int t = 0; t < nt; ++t) emu_guard(g_stacks + (size_t)t * g_stack, page);
    g_nt = nt;
    g_invoke = invoke;
    g_args = args;
    blockDim.x = (unsigned)nt; blockDim.y = blockDim.z = 1;
    gridDim.x = (unsigned)gx; gridDim.y = (unsigned)gy; gridDim.z = (unsigned)gz;
    threadIdx.y = threadIdx.z = 0;

    static char altstack[1 << 16];
    stack_t ss, old_ss;
    ss.ss_sp = altstack;
    ss.ss_size = sizeof altstack;
    ss.ss_flags = 0;
    sigaltstack(&ss, &old_ss);
    struct sigaction sa, old[4];
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    const int sigs[4] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};
    for (int i = 0; i < 4; ++i) sigaction(sigs[i], &sa, &old[i]);
    int rc = 0;
    if (sigsetjmp(g_jmp, 1)) {
        const int t = g_sig_thread;
        g_cur = t;
        const char *what = g_sig == SIGSEGV ? "SIGSEGV" : g_sig == SIGBUS ? "SIGBUS" : g_sig == SIGFPE
            ? "SIGFPE (an integer division by zero?)" : "SIGILL";
        char *a = (char *)g_addr;
        if (t >= 0 && a >= g_stacks && a < g_stacks + g_stacks_len && (size_t)(a - g_stacks) % g_stack < page)
            fail("%s at %p: thread %d overflowed its %lld-byte emulator stack", what, g_addr,
                 (int)((a - g_stacks) / g_stack), stack_bytes);
        else
            fail("%s at %p", what, g_addr);
        g_cur = -1;
        rc = -1;
    } else {
        for (long long b = 0; b < blocks; ++b) {
            g_block = b;
            blockIdx.x = (unsigned)(b % gx);
            blockIdx.y = (unsigned)(b / gx % gy);
            blockIdx.z = (unsigned)(b / (gx * gy));
            if (emu_dyn_smem) memset(emu_dyn_smem, 0xff, (size_t)smem_bytes);  // uninitialised: NaN in every format
            if (run_block(!(b & 1))) { rc = -1; break; }
        }
    }
    for (int i = 0; i < 4; ++i) sigaction(sigs[i], &old[i], nullptr);
    sigaltstack(&old_ss, nullptr);
    munmap(g_stacks, g_stacks_len);
    free(g_f);
    free(g_slots);
    free(g_xslots);
    emu_dyn_smem = nullptr;
    g_f = nullptr;
    g_slots = nullptr;
    g_xslots = nullptr;
    g_stacks = nullptr;
    return rc;
}

EMU_API int emu_launch(void (*invoke)(void **), void **args, long long blocks, int nt, long long stack_bytes) {
    return emu_launch_grid(invoke, args, blocks, 1, 1, nt, stack_bytes, 0);
}
"""

STACK_BYTES = 256 << 10  # per emulated thread (touched pages only)

_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL] = {}
_runtime: ctypes.CDLL | None = None
_SIGNATURE = re.compile(r'extern "C" __global__ void __launch_bounds__\(([^)]*)\)\s*(\w+)\(([^)]*)\)\s*\{')
_DYNAMIC_SMEM = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?unsigned char (\w+)\[\];")


def available() -> bool:
    """g++ is there, on Linux (mmap guard pages, the signals of a fault)."""
    return CXX is not None and sys.platform.startswith("linux")


def cache_dir() -> Path:
    root = os.environ.get("CUPYLLM_HOST_CUDA_CACHE")
    path = Path(root) if root else Path(tempfile.gettempdir()) / f"cupyllm-host-cuda-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _compiler_id() -> str:
    if not hasattr(_compiler_id, "text"):
        _compiler_id.text = subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout
    return _compiler_id.text


def _build(source: str, name: str, defines=()) -> str:
    """Compile `source` into a cached shared library; returns its path."""
    flags = FLAGS + tuple(defines)
    key = hashlib.sha256("\0".join((source, " ".join(flags), _compiler_id())).encode()).hexdigest()
    out = cache_dir() / f"{name}-{key[:24]}.so"
    if out.exists():
        return str(out)
    src = out.with_suffix(f".{os.getpid()}.cpp")
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    src.write_text(source)
    proc = subprocess.run([CXX, *flags, "-o", str(tmp), str(src)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"g++ could not compile the host version of {name} ({src}):\n{proc.stderr[-6000:]}")
    os.replace(tmp, out)
    src.unlink()
    return str(out)


def runtime() -> ctypes.CDLL:
    global _runtime
    if _runtime is None:
        defines = ("-DEMU_UCONTEXT",) if os.environ.get("CUPYLLM_HOST_CUDA_UCONTEXT") else ()
        lib = ctypes.CDLL(_build(RUNTIME, "emu_runtime", defines), mode=ctypes.RTLD_GLOBAL)
        lib.emu_launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_longlong]
        lib.emu_launch.restype = ctypes.c_int
        lib.emu_launch_grid.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong,
                                        ctypes.c_longlong, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
        lib.emu_launch_grid.restype = ctypes.c_int
        lib.emu_error.restype = ctypes.c_char_p
        lib.emu_fault_address.restype = ctypes.c_void_p
        lib.emu_map.argtypes = [ctypes.c_size_t]
        lib.emu_map.restype = ctypes.c_void_p
        lib.emu_guard.argtypes = lib.emu_unmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _runtime = lib
    return _runtime


def parse_params(source: str, name: str, nt: int) -> list[tuple[str, str]]:
    """(C type, name) of each parameter of the generated kernel `name`, read from its signature."""
    uncommented = re.sub(r"//[^\n]*", "", source)  # comments among the parameters may hold parentheses
    m = next((m for m in _SIGNATURE.finditer(uncommented) if m.group(2) == name), None)
    if m is None:
        raise ValueError(f"no extern \"C\" __global__ kernel named {name} in the source")
    bound = m.group(1).split(",")[0].strip()
    if bound.isdigit() and int(bound) != nt:  # an expression of macros (NUM_WARPS * 32) is not checked
        raise ValueError(f"{name}: __launch_bounds__({m.group(1)}) but launched with {nt} threads")
    params = []
    for p in m.group(3).split(","):
        p = " ".join(p.split())
        pm = re.fullmatch(r"(.*?)\s*(\w+)", p)
        ctype = pm.group(1).replace("__restrict__", "").strip()
        params.append((" ".join(ctype.replace("*", " * ").split()), pm.group(2)))
    return params


def host_source(source: str, name: str, nt: int) -> tuple[str, list[tuple[str, str]]]:
    """What is compiled for a CUDA C `source`: the host prelude, the source, a `void **` entry to kernel `name`."""
    params = parse_params(source, name, nt)
    call = ", ".join(f"({t})a[{i}]" if t.endswith("*") else f"*({t} *)a[{i}]" for i, (t, _) in enumerate(params))
    wrapper = f'\nEMU_API void emu_invoke(void **a) {{ {name}({call}); }}\n'
    # dynamic shared memory (the launch's shared_mem bytes) is the runtime's per-block buffer
    # (a macro: the declaration may sit at file scope, before any launch has set the buffer)
    source = _DYNAMIC_SMEM.sub(r"\n#define \1 emu_dyn_smem\n", source)
    return HOST_PRELUDE + source + wrapper, params


def _library(source: str, name: str, nt: int):
    host, params = host_source(source, name, nt)
    lib = _libs.get(host)
    if lib is None:
        runtime()  # first: the kernel library's undefined emu_* symbols resolve against it
        lib = _libs[host] = ctypes.CDLL(_build(host, name))
        lib.params = params
    return lib


class _Region:
    """A guarded copy of host bytes [start, start + n): guard page, filler, the bytes, < 64 filler, guard page."""

    def __init__(self, start: int, n: int, members: list[int], written: bool):
        rt = runtime()
        self.start, self.n, self.members, self.written = start, n, members, written
        body = -(-(n + 256 + 64) // PAGE) * PAGE
        self.len = body + 2 * PAGE
        self.base = rt.emu_map(self.len)
        if not self.base:
            raise MemoryError(f"host_cuda: cannot map {self.len} bytes")
        rt.emu_guard(self.base, PAGE)
        rt.emu_guard(self.base + PAGE + body, PAGE)
        self.body = np.ctypeslib.as_array((ctypes.c_uint8 * body).from_address(self.base + PAGE))
        self.body[:] = FILL
        end = PAGE + body  # offset of the back guard page
        data = (end - n) // 64 * 64 + start % 64  # the caller's alignment modulo 64 (the vector decisions)
        if data + n > end:
            data -= 64
        self.data = self.base + data
        self.lo = data - PAGE  # offset of the bytes in `body`
        self.original = bytes((ctypes.c_uint8 * n).from_address(start)) if n else b""
        self.body[self.lo:self.lo + n] = np.frombuffer(self.original, np.uint8)

    def contains(self, addr: int) -> bool:
        return self.base <= addr < self.base + self.len

    def filler_damage(self) -> np.ndarray:
        """Offsets (from the array start) of filler bytes that changed: writes out of bounds."""
        bad = np.flatnonzero(self.body != FILL)
        return bad[(bad < self.lo) | (bad >= self.lo + self.n)] - self.lo

    def changed(self) -> bool:
        return self.body[self.lo:self.lo + self.n].tobytes() != self.original

    def copy_back(self):
        if self.n:
            ctypes.memmove(self.start, self.data, self.n)

    def free(self):
        self.body = None
        runtime().emu_unmap(self.base, self.len)


def emulate(ir: KernelIR, nt: int, arrays, grid, scalars) -> None:
    """Run the kernel generated for (ir, nt) on the CPU on numpy arrays, outputs written in place: core._launch's
    signature, and its argument list (core.kernel_args)."""
    blocks = math.prod(grid)
    if blocks == 0:
        return
    if blocks >= 2**31:
        raise ValueError(f"{ir.name}: a grid of {blocks} programs is over 2^31; split the call")
    run_source(lower.generate(ir, nt), ir.name, nt, blocks, core.kernel_args(ir, arrays, grid, scalars),
               what=f"{ir.name} ({nt} threads, grid {tuple(grid)})")


def run_source(source: str, name: str, nt: int, blocks, args, what: str | None = None, shared_mem: int = 0) -> None:
    """Run kernel `name` of CUDA C `source` over `blocks` blocks (a count, or a grid (x, y, z)) of `nt` threads on
    the CPU, with `shared_mem` bytes of dynamic shared memory. `args` in parameter order: C-contiguous numpy arrays
    for pointers (written in place through the non-const ones), numpy int32 or float32 scalars."""
    grid = tuple(blocks) + (1,) * (3 - len(blocks)) if isinstance(blocks, (tuple, list)) else (int(blocks), 1, 1)
    what = what or f"{name} ({nt} threads, grid {grid})"
    if 0 in grid:
        return
    with _lock:
        lib = _library(source, name, nt)
        if len(args) != len(lib.params):
            raise TypeError(f"{what}: {len(args)} arguments for {len(lib.params)} parameters")
        arrays = [(i, a) for i, a in enumerate(args) if isinstance(a, np.ndarray)]
        writable = set()
        for i, a in arrays:
            ctype, pname = lib.params[i]
            if not ctype.endswith("*"):
                raise TypeError(f"{what}: parameter {pname} ({ctype}) gets an array")
            if not a.flags.c_contiguous:
                raise TypeError(f"{what}: the array for {pname} must be C-contiguous")
            if not ctype.startswith("const"):
                writable.add(i)
        # one guarded copy per set of overlapping arrays (views of one buffer stay views of one copy)
        groups: list[list] = []
        for lo, hi, i in sorted((a.ctypes.data, a.ctypes.data + a.nbytes, i) for i, a in arrays):
            if groups and lo < groups[-1][1]:
                groups[-1][1] = max(groups[-1][1], hi)
                groups[-1][2].append(i)
            else:
                groups.append([lo, hi, [i]])
        regions, ptrs, keep = [], {}, []
        try:
            for lo, hi, members in groups:
                region = _Region(lo, hi - lo, members, any(m in writable for m in members))
                regions.append(region)
                for m in members:
                    ptrs[m] = region.data + args[m].ctypes.data - lo
            for i, ((ctype, pname), value) in enumerate(zip(lib.params, args)):
                if i in ptrs:
                    continue
                if ctype.endswith("*") and isinstance(value, (np.uint64, int)) and int(value) == 0:
                    ptrs[i] = 0  # a null pointer (ops/cuda/sampling.py's _NULL): pointers go in argv as they are
                    continue
                if ctype == "float" and isinstance(value, np.float32):
                    c = ctypes.c_float(value)
                elif ctype == "int" and isinstance(value, np.int32):
                    c = ctypes.c_int32(value)
                else:
                    raise TypeError(f"{what}: parameter {pname} ({ctype}) gets {type(value).__name__}; the emulator "
                                    "passes numpy int32 to int and float32 to float")
                keep.append(c)
                ptrs[i] = ctypes.addressof(c)
            argv = (ctypes.c_void_p * len(args))(*(ptrs[i] for i in range(len(args))))
            rt = runtime()
            rc = rt.emu_launch_grid(ctypes.cast(lib.emu_invoke, ctypes.c_void_p).value, argv, *grid, nt, STACK_BYTES,
                                    shared_mem)
            if rc:
                message = rt.emu_error().decode()
                addr = rt.emu_fault_address()
                for region in regions:
                    if addr and region.contains(addr):
                        message += (f" (byte {addr - region.data} of the {region.n} bytes of "
                                    f"{_names(region, lib.params, args)}: out of bounds)")
                raise RuntimeError(f"{what} on the host: {message}")
            for region in regions:
                damage = region.filler_damage()
                if damage.size:
                    raise AssertionError(
                        f"{what}: wrote out of bounds of {_names(region, lib.params, args)} ({region.n} bytes): "
                        f"{damage.size} bytes at offsets {damage[:8].tolist()}{' ...' if damage.size > 8 else ''}")
                if not region.written and region.changed():
                    raise AssertionError(f"{what}: {_names(region, lib.params, args)} is const but changed")
            for region in regions:
                if region.written:
                    region.copy_back()
        finally:
            for region in regions:
                region.free()


def _names(region: _Region, params, args) -> str:
    return ", ".join(f"{params[m][1]} {args[m].dtype}{list(args[m].shape)}" for m in region.members)
