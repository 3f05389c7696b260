// Tensor-core and async-copy helpers of the attention kernels, as inline PTX (no <mma.h>: pip-only CUDA
// installs lack its headers): m16n8k16 mma for fp16/bf16, cp.async, ldmatrix, ex2. Pasted in place of
// the #include line by ops/cuda/compile.py; nvcc finds it beside the .cu. Also the E4M3 decode of an FP8 KV
// cache into the same swizzled tiles.
#pragma once
#define NEG_INF (-__int_as_float(0x7f800000))
#ifndef CUPYLLM_HOST_EMU  // tests/host_mma.py: host versions of the types and of these PTX wrappers, for the emulator
#include <cuda_fp16.h>
#include <cuda_bf16.h>

template <typename X> struct Mma;
template <> struct Mma<half> {
    static __device__ __forceinline__ void run(float* c, const unsigned* a, unsigned b0, unsigned b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ unsigned pack(float lo, float hi) {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<unsigned*>(&h);
    }
};
template <> struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float* c, const unsigned* a, unsigned b0, unsigned b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ unsigned pack(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<unsigned*>(&h);
    }
};

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
// 16-byte global->shared copy; src_bytes 0 writes zeros (rows past the query span, keys past the context:
// stale cache slots may hold NaN, and 0 * NaN would poison P.V).
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
__device__ __forceinline__ void ldmatrix_x4(unsigned* r, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ float fast_exp2(float x) {  // ex2.approx: exp2(-inf) = 0
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
#endif  // CUPYLLM_HOST_EMU

// Where 16-byte chunk c of row `row` lies in a shared tile of CH chunks a row (head_dim / 8): byte offset
// (row * CH + swizzled c) * 16. The XOR swizzle spreads the 8 rows an ldmatrix reads at one logical chunk over
// the banks. Chunks go in aligned groups of 8, swizzled by row & 7. A last partial group (CH % 8 of 2, 4 or 6
// chunks: head_dim 80, 96, 112, or 16, 32, 48) swizzles its first P chunks, P the largest power of two in it, by
// row & (P - 1) and leaves the rest in place: a permutation of the row's chunks for every even CH, and, for
// head_dim 16 * 2^k, the map these kernels have always used.
template <int CH> __host__ __device__ __forceinline__ int tile_offset(int row, int c) {
    static_assert(CH % 2 == 0, "rows of a whole number of 32-byte pieces (head_dim a multiple of 16)");
    constexpr int FULL = CH / 8 * 8, REM = CH % 8, P = REM >= 4 ? 4 : REM;
    constexpr bool POW2 = (CH & (CH - 1)) == 0;  // one XOR for the whole row, as before
    const int sc = POW2 ? c ^ (row & ((CH < 8 ? CH : 8) - 1))
                        : c < FULL ? c ^ (row & 7) : c < FULL + P ? c ^ (row & (P - 1)) : c;
    return (row * CH + sc) * 16;
}

// E4M3 codes (OCP FP8, the KV cache as ops/quant.Fp8Cache stores it) to fp16, exact for every finite code and
// without FP8 hardware: a code's 4 exponent and 3 mantissa bits become a half's top exponent and mantissa bits,
// which reads as the value times 2^-8 (exponent bias 15 against 7, subnormals included), and x 256 is exact.
// The quantizer saturates at 448, so the NaN code never occurs. v holds two codes at bits 8-15 and 24-31.
__device__ __forceinline__ __half2 e4m3x2_half2(unsigned v) {
    const unsigned bits = (v & 0x80008000u) | ((v & 0x7f007f00u) >> 1);
    const __half2 two8 = __halves2half2(__ushort_as_half(0x5c00), __ushort_as_half(0x5c00));  // 256
    return __hmul2(*reinterpret_cast<const __half2*>(&bits), two8);
}
template <typename X> __device__ __forceinline__ unsigned e4m3x2(unsigned v);  // -> a packed X pair
template <> __device__ __forceinline__ unsigned e4m3x2<half>(unsigned v) {
    const __half2 h = e4m3x2_half2(v);
    return *reinterpret_cast<const unsigned*>(&h);
}
template <> __device__ __forceinline__ unsigned e4m3x2<__nv_bfloat16>(unsigned v) {  // every E4M3 value is a bf16
    const __nv_bfloat162 b = __float22bfloat162_rn(__half22float2(e4m3x2_half2(v)));
    return *reinterpret_cast<const unsigned*>(&b);
}
// 16 codes (byte i = element i) -> elements 0-7 in lo, 8-15 in hi.
template <typename X> __device__ __forceinline__ void e4m3x16(const uint4& in, uint4& lo, uint4& hi) {
    // __byte_perm selectors 0x1404 / 0x3424 move bytes 0,1 / 2,3 of a word to bits 8-15 and 24-31.
    lo = make_uint4(e4m3x2<X>(__byte_perm(in.x, 0, 0x1404)), e4m3x2<X>(__byte_perm(in.x, 0, 0x3424)),
                    e4m3x2<X>(__byte_perm(in.y, 0, 0x1404)), e4m3x2<X>(__byte_perm(in.y, 0, 0x3424)));
    hi = make_uint4(e4m3x2<X>(__byte_perm(in.z, 0, 0x1404)), e4m3x2<X>(__byte_perm(in.z, 0, 0x3424)),
                    e4m3x2<X>(__byte_perm(in.w, 0, 0x1404)), e4m3x2<X>(__byte_perm(in.w, 0, 0x3424)));
}
// Rows of HEAD E4M3 codes, contiguous at `raw` (shared memory, as cp.async landed them), into the attention
// kernels' swizzled X tile at `dst` (tile_offset). Threads first, first + step, ... take the n16 16-code pieces.
template <typename X, int HEAD>
__device__ __forceinline__ void e4m3_tile(unsigned char* dst, const unsigned char* raw, int n16, int first, int step) {
    constexpr int PIECES = HEAD / 16;
    for (int i = first; i < n16; i += step) {
        const int row = i / PIECES, c = 2 * (i % PIECES);
        uint4 lo, hi;
        e4m3x16<X>(*reinterpret_cast<const uint4*>(raw + 16 * i), lo, hi);
        *reinterpret_cast<uint4*>(dst + tile_offset<HEAD / 8>(row, c)) = lo;
        *reinterpret_cast<uint4*>(dst + tile_offset<HEAD / 8>(row, c + 1)) = hi;
    }
}
