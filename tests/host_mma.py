"""Test support: the attention kernels (ops/kernels/attention_{decode,prefill}.cu) on the CPU, by the emulator of
tests/host_cuda.py. HOST_MMA stands in for what ops/kernels/mma.cuh leaves out under CUPYLLM_HOST_EMU: the fp16/bf16
types, and the PTX wrappers (mma.sync m16n8k16, ldmatrix x4 and x4.trans, cp.async, ex2), written from the fragment
layouts of the PTX ISA. Everything else of mma.cuh (the swizzle, the E4M3 decode) is the real header.

The warp-collective instructions exchange their operands through the runtime (emu_exchange: a warp barrier), so each
lane computes its own part from all 32 lanes' registers; ldmatrix reads shared memory after that barrier and waits
at a second one, so no lane writes the tile again before all have read it. cp.async copies at once (the earliest a
GPU may land it), so a missing cp.async.wait_group goes unseen; the rest (16-byte alignment, out-of-range shared
addresses, reading shared memory no one wrote: 0xff filler, NaN in fp16/bf16) fails the launch or the comparison.
The products are exact in float32 and summed in k order, where the tensor cores sum in their own order: results
agree with a GPU's to float32 rounding, and the fp16/bf16 P and outputs round the same way (nearest even).

    module, restore = load_cuda_module("attention")   # ops/cuda/attention.py, its launches emulated

runs a real launcher (ops/cuda/attention.py: the grid, the split plan, shared-memory sizes, the combine step; or
ops/cuda/moe.py) on numpy arrays through a stand-in for CuPy, each get_kernel launch emulated.
"""
from __future__ import annotations

import ctypes
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np

from ops.kernel_source import KERNEL_DIR, kernel_source
from tests import host_cuda

HOST_MMA = r"""// tests/host_mma.py: the types and PTX wrappers mma.cuh leaves out under CUPYLLM_HOST_EMU
#define CUPYLLM_HOST_EMU 1
#define __align__(n) __attribute__((aligned(n)))
#include <string.h>
#define EMU_XSLOT 64  // bytes between lanes in emu_exchange's answer (the runtime's XSLOT)
struct float2 { float x, y; };
struct __attribute__((aligned(16))) float4 {  // its copies check a GPU's 16-byte alignment, as uint4's do
    float x, y, z, w;
    float4() = default;
    float4(const float4 &o) { emu_aligned(&o, 16, "16-byte vector load"); x = o.x; y = o.y; z = o.z; w = o.w; }
};
static inline float2 make_float2(float x, float y) { float2 r; r.x = x; r.y = y; return r; }

static inline float emu_h2f(unsigned short h) {
    const unsigned sign = (unsigned)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0) { const float v = (float)m * 5.9604644775390625e-08f; return sign ? -v : v; }  // m x 2^-24
    if (e == 31) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    return __uint_as_float(sign | ((e + 112) << 23) | (m << 13));
}
static inline unsigned short emu_f2h(float f) {  // round to nearest even, subnormals and overflow included
    const unsigned x = __float_as_uint(f), sign = (x >> 16) & 0x8000, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (unsigned short)(sign | 0x7e00);
    if (ax >= 0x47800000u) return (unsigned short)(sign | 0x7c00);  // >= 65536 (65520 and up round there below)
    if (ax < 0x38800000u) return (unsigned short)(sign | (unsigned)nearbyintf(__uint_as_float(ax) * 16777216.0f));
    unsigned h = (((ax >> 23) - 112) << 10) | ((ax >> 13) & 0x3ff);
    const unsigned rem = ax & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) ++h;
    return (unsigned short)(sign | h);
}
static inline float emu_b2f(unsigned short b) { return __uint_as_float((unsigned)b << 16); }
static inline unsigned short emu_f2b(float f) {
    const unsigned x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x40);
    return (unsigned short)((x + 0x7fffu + ((x >> 16) & 1)) >> 16);
}
struct __half {
    unsigned short x;
    __half() = default;
    __half(float f) : x(emu_f2h(f)) {}
    operator float() const { return emu_h2f(x); }
};
typedef __half half;
struct __half2 { __half x, y; };
struct __nv_bfloat16 {
    unsigned short x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : x(emu_f2b(f)) {}
    operator float() const { return emu_b2f(x); }
};
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
static inline __half2 __floats2half2_rn(float a, float b) { __half2 r; r.x = __half(a); r.y = __half(b); return r; }
static inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    __nv_bfloat162 r; r.x = __nv_bfloat16(a); r.y = __nv_bfloat16(b); return r;
}
static inline __half __float2half_rn(float f) { return __half(f); }
static inline float __half2float(__half h) { return float(h); }
static inline float __bfloat162float(__nv_bfloat16 b) { return float(b); }
static inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
static inline __half __ushort_as_half(unsigned short u) { __half h; h.x = u; return h; }
static inline __half2 __halves2half2(__half a, __half b) { __half2 r; r.x = a; r.y = b; return r; }
static inline __half2 __hmul2(__half2 a, __half2 b) {
    return __floats2half2_rn(float(a.x) * float(b.x), float(a.y) * float(b.y));
}
static inline float2 __half22float2(__half2 h) { return make_float2(float(h.x), float(h.y)); }
static inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }

static inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {  // byte i of the result: byte s[4i..4i+2]
    const unsigned long long v = (unsigned long long)y << 32 | x;           // of y:x (the sign-replicate bit unused)
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= (unsigned)(v >> (8 * ((s >> (4 * i)) & 7)) & 0xff) << (8 * i);
    return r;
}
static inline float emu_elem(unsigned reg, int hi, bool bf16) {
    const unsigned short b = (unsigned short)(hi ? reg >> 16 : reg & 0xffff);
    return bf16 ? emu_b2f(b) : emu_h2f(b);
}
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: g = lane / 4, t = lane % 4. A (16 x 16): registers
// {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}; B (16 x 8): {(k 2t..2t+1, n g), (k 2t+8.., n g)};
// C, D (16 x 8, f32): (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
template <bool BF16> static inline void emu_mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    unsigned mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
    const unsigned char* all = emu_exchange(mine, sizeof mine);
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    auto reg = [&](int l, int i) { unsigned v; memcpy(&v, all + l * EMU_XSLOT + 4 * i, 4); return v; };
    for (int i = 0; i < 4; ++i) {
        const int r = g + 8 * (i >> 1), n = 2 * t + (i & 1);
        float acc = c[i];
        for (int k = 0; k < 16; ++k) {
            const float x = emu_elem(reg((r % 8) * 4 + (k % 8) / 2, (r / 8) + 2 * (k / 8)), k & 1, BF16);
            const float y = emu_elem(reg(n * 4 + (k % 8) / 2, 4 + k / 8), k & 1, BF16);
            acc += x * y;
        }
        c[i] = acc;
    }
}
template <typename X> struct Mma;
template <> struct Mma<half> {
    static inline void run(float* c, const unsigned* a, unsigned b0, unsigned b1) { emu_mma<false>(c, a, b0, b1); }
    static inline unsigned pack(float lo, float hi) { return emu_f2h(lo) | (unsigned)emu_f2h(hi) << 16; }
};
template <> struct Mma<__nv_bfloat16> {
    static inline void run(float* c, const unsigned* a, unsigned b0, unsigned b1) { emu_mma<true>(c, a, b0, b1); }
    static inline unsigned pack(float lo, float hi) { return emu_f2b(lo) | (unsigned)emu_f2b(hi) << 16; }
};

// A shared address is 32 bits: slot << 20 | the low 20 bits of the host address, the slot naming its 1 MB chunk
// (and slot + 1 the next chunk, so an offset added to an address may cross into it). Dynamic and static __shared__
// arrays alike; the runtime's dynamic shared memory is at the same host address in every launch.
static unsigned long long emu_chunks[4096];
static int emu_nchunks;
static inline unsigned smem_addr(const void* p) {
    const unsigned long long a = (unsigned long long)p, c = a >> 20;
    int s = 0;
    while (s < emu_nchunks && emu_chunks[s] != c) s += 2;
    if (s == emu_nchunks) {
        if (s + 2 > 4096) emu_fail("smem_addr: more than 2048 chunks of host memory named as shared");
        emu_chunks[s] = c;
        emu_chunks[s + 1] = c + 1;
        emu_nchunks += 2;
    }
    return (unsigned)s << 20 | (unsigned)(a & 0xfffff);
}
static inline unsigned char* emu_shared(unsigned addr, unsigned bytes, const char* what) {
    if ((int)(addr >> 20) >= emu_nchunks) emu_fail(what);
    unsigned char* p = (unsigned char*)(emu_chunks[addr >> 20] << 20 | (addr & 0xfffff));
    const unsigned char* dyn_end = emu_dyn_smem + emu_dyn_smem_bytes;
    if (emu_dyn_smem && p >= emu_dyn_smem - 4096 && p < dyn_end + 4096 && (p < emu_dyn_smem || p + bytes > dyn_end))
        emu_fail(what);
    return p;
}
static inline void cp_async16(unsigned dst, const void* src, int src_bytes) {
    if (dst % 16) emu_fail("cp.async to a shared address not 16-byte aligned");
    unsigned char* d = emu_shared(dst, 16, "cp.async outside the shared memory");
    if (src_bytes < 0 || src_bytes > 16) emu_fail("cp.async src-size outside 0..16");
    if (src_bytes) { emu_aligned(src, 16, "cp.async source"); memcpy(d, src, (size_t)src_bytes); }
    memset(d + src_bytes, 0, (size_t)(16 - src_bytes));
}
static inline void cp_async_commit() {}
template <int N> static inline void cp_async_wait() {}
// ldmatrix .x4 (.trans): lane l addresses row l % 8 of matrix l / 8. Register j of lane l holds row l / 4, columns
// 2 (l % 4) and 2 (l % 4) + 1 of matrix j; with .trans, column l / 4, rows 2 (l % 4) and 2 (l % 4) + 1.
static inline void emu_ldmatrix(unsigned* r, unsigned addr, bool trans) {
    const unsigned char* all = emu_exchange(&addr, 4);
    const int lane = threadIdx.x & 31;
    auto row = [&](int l) {
        unsigned a;
        memcpy(&a, all + l * EMU_XSLOT, 4);
        if (a % 16) emu_fail("ldmatrix row address not 16-byte aligned");
        return emu_shared(a, 16, "ldmatrix outside the shared memory");
    };
    for (int j = 0; j < 4; ++j) {
        if (!trans) {
            memcpy(&r[j], row(8 * j + lane / 4) + 4 * (lane % 4), 4);
        } else {
            unsigned short lo, hi;
            memcpy(&lo, row(8 * j + 2 * (lane % 4)) + 2 * (lane / 4), 2);
            memcpy(&hi, row(8 * j + 2 * (lane % 4) + 1) + 2 * (lane / 4), 2);
            r[j] = lo | (unsigned)hi << 16;
        }
    }
    __syncwarp();  // all lanes have read the tile before any writes it again
}
static inline void ldmatrix_x4(unsigned* r, unsigned addr) { emu_ldmatrix(r, addr, false); }
static inline void ldmatrix_x4_trans(unsigned* r, unsigned addr) { emu_ldmatrix(r, addr, true); }
static inline float fast_exp2(float x) { return exp2f(x); }
// warp votes and reductions, through the same exchange: every lane of the warp calls them together, as the
// kernels do (__reduce_add_sync's masks partition the warp: each lane sums over the lanes its mask names)
static inline unsigned emu_vote(unsigned mask, unsigned v, int op) {
    if (mask != 0xffffffffu && op != 2) emu_fail("a warp vote with a partial mask is not emulated");
    if (!(mask >> (threadIdx.x & 31) & 1)) emu_fail("__reduce_add_sync: a lane's mask leaves the lane out");
    const unsigned char* all = emu_exchange(&v, 4);
    const int lane = threadIdx.x & 31;
    unsigned mine, r = 0;
    memcpy(&mine, all + lane * EMU_XSLOT, 4);
    for (int l = 0; l < 32; ++l) {
        unsigned x;
        memcpy(&x, all + l * EMU_XSLOT, 4);
        if (op == 0) r |= (x != 0) << l;        // ballot
        else if (op == 1) r |= (x == mine) << l;  // match_any
        else if (mask >> l & 1) r += x;       // reduce_add over the lanes of the mask
    }
    return r;
}
static inline unsigned __ballot_sync(unsigned m, int p) { return emu_vote(m, p != 0, 0); }
static inline int __any_sync(unsigned m, int p) { return emu_vote(m, p != 0, 0) != 0; }
static inline unsigned __match_any_sync(unsigned m, unsigned v) { return emu_vote(m, v, 1); }
static inline unsigned __reduce_add_sync(unsigned m, unsigned v) { return emu_vote(m, v, 2); }
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
// round-to-nearest float ops, never contracted (no FMA in the x86-64 baseline g++ targets)
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline unsigned __float2uint_rn(float f) { return f <= 0.f ? 0u : f >= 4294967295.f ? 0xffffffffu \
: (unsigned)nearbyintf(f); }
static inline float __uint2float_rn(unsigned u) { return (float)u; }
// threads switch only at barriers, so a read-modify-write is atomic as it stands (int atomicAdd: host_cuda.py)
static inline unsigned atomicAdd(unsigned* p, unsigned v) { const unsigned o = *p; *p = o + v; return o; }
static inline float atomicAdd(float* p, float v) { const float o = *p; *p = o + v; return o; }
static inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { \
const unsigned long long o = *p; *p = o + v; return o; }
static inline unsigned atomicOr(unsigned* p, unsigned v) { const unsigned o = *p; *p = o | v; return o; }
static inline int atomicOr(int* p, int v) { const int o = *p; *p = o | v; return o; }
static inline int atomicMin(int* p, int v) { const int o = *p; *p = v < o ? v : o; return o; }
static inline unsigned atomicMin(unsigned* p, unsigned v) { const unsigned o = *p; *p = v < o ? v : o; return o; }
#line 1 "kernel"
"""


def emulated_source(filename: str, defines: dict) -> str:
    """`filename` as NVRTC gets it (headers pasted in), its -D defines in front, HOST_MMA before all."""
    text = "".join(f"#define {k} {v}\n" for k, v in defines.items())
    return HOST_MMA + text + kernel_source(filename)


# ---- a stand-in for CuPy, enough for ops/cuda/attention.py and ops/cuda/moe.py
class DevArray(np.ndarray):
    """A numpy array posing as device memory."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)

    @property
    def device(self):
        return types.SimpleNamespace(id=0)

    def get(self, stream=None):
        return np.array(self.view(np.ndarray))


def dev(a) -> DevArray:
    return np.ascontiguousarray(a).view(DevArray)


class EmulatedKernel:
    def __init__(self, filename: str, name: str, defines: dict):
        self.filename, self.name, self.defines = filename, name, defines
        self.max_dynamic_shared_size_bytes = 0
        self.source = emulated_source(filename, defines)

    def __call__(self, grid, block, args, shared_mem=0):
        assert len(block) == 1
        if shared_mem > max(self.max_dynamic_shared_size_bytes, 48 << 10):
            raise ValueError(f"{self.name}: {shared_mem} bytes of shared memory over the kernel's limit "
                             f"{self.max_dynamic_shared_size_bytes}")
        plain = [a.view(np.ndarray) if isinstance(a, np.ndarray) else a for a in args]
        host_cuda.run_source(self.source, self.name, block[0], tuple(grid), plain, shared_mem=shared_mem)


def _pinned(n: int):
    """Page-locked host memory as CuPy gives it: a buffer with .ptr (numpy can wrap it)."""
    kind = type("Pinned", (ctypes.c_uint8 * n,), {"ptr": property(lambda self: ctypes.addressof(self))})
    return kind()


def _filled(shape, dtype) -> DevArray:
    """Fresh "device memory": 0xff bytes (NaN as any float, -1 as any int), so output never written shows."""
    a = np.empty(shape, dtype)
    a.reshape(-1).view(np.uint8)[:] = 0xFF
    return dev(a)


def load_cuda_module(name: str, sms: int = 132, max_smem: int = 227 << 10, stubs: dict | None = None):
    """ops/cuda/<name>.py imported against the stand-in (a GPU of `sms` SMs), its kernels emulated; `stubs` are
    other ops.cuda modules it imports, by name (e.g. {"basic": a module with silu_and_mul}). Returns (module,
    restore): the caller calls restore() to put sys.modules back."""
    cp = types.ModuleType("cupy")
    cp.ndarray = DevArray
    cp.float32, cp.uint8, cp.int32 = np.float32, np.uint8, np.int32
    cp.empty = lambda shape, dtype=np.float32: _filled(shape, dtype)
    cp.zeros = lambda shape, dtype=np.float32: dev(np.zeros(shape, dtype))
    cp.full = lambda shape, value, dtype=np.float32: dev(np.full(shape, value, dtype))
    cp.asarray = lambda a, dtype=None: dev(np.array(a, dtype))
    cp.asnumpy = lambda a: np.array(np.asarray(a).view(np.ndarray))
    stream = types.SimpleNamespace(is_capturing=lambda: False, ptr=0)
    event = types.SimpleNamespace(record=lambda stream=None: None, synchronize=lambda: None)
    runtime = types.SimpleNamespace(memcpyHostToDevice=1, memcpyDeviceToHost=2,
                                    memcpyAsync=lambda dst, src, n, kind, stream: ctypes.memmove(dst, src, n),
                                    memsetAsync=lambda ptr, value, n, stream: ctypes.memset(ptr, value, n))
    cp.cuda = types.SimpleNamespace(
        Device=lambda i=0: types.SimpleNamespace(id=0, attributes={"MultiProcessorCount": sms,
                                                                   "MaxSharedMemoryPerBlockOptin": max_smem}),
        get_current_stream=lambda: stream, Event=lambda disable_timing=False: event, runtime=runtime,
        alloc_pinned_memory=_pinned)
    compile_stub = types.ModuleType("ops.cuda.compile")
    kernels: dict = {}

    def get_kernel(filename, kernel, **defines):
        key = (filename, kernel, tuple(sorted(defines.items())))
        if key not in kernels:
            kernels[key] = EmulatedKernel(filename, kernel, defines)
        return kernels[key]
    compile_stub.get_kernel = get_kernel
    compile_stub.cuda_type = lambda dtype: {np.dtype(np.float32): "float", np.dtype(np.float16): "half",
                                            np.dtype(np.uint16): "__nv_bfloat16"}[np.dtype(dtype)]
    package = types.ModuleType("ops.cuda")  # not ops/cuda/__init__.py: the whole backend would need CuPy
    package.__path__ = [str(Path(KERNEL_DIR).parent / "cuda")]
    modules = {"cupy": cp, "ops.cuda": package, "ops.cuda.compile": compile_stub,
               **{f"ops.cuda.{k}": v for k, v in (stubs or {}).items()}}
    for k, v in (stubs or {}).items():
        setattr(package, k, v)
    saved = {k: sys.modules.get(k) for k in [*modules, f"ops.cuda.{name}"]}
    sys.modules.update(modules)
    spec = importlib.util.spec_from_file_location(f"ops.cuda.{name}", f"{package.__path__[0]}/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"ops.cuda.{name}"] = module
    spec.loader.exec_module(module)
    module.cp = cp  # the stand-in, for the caller's arrays too
    def restore():
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module, restore
