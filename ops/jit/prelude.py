"""The device functions every generated kernel starts with (ops/jit/lower.generate): half, bfloat16 and fp8 E4M3
conversions as inline PTX on the GPU and as integer code for a host compiler (tests/host_cuda.py), and floor division
and modulo with Python's signs. Nothing is included, so NVRTC needs no include path."""

# Not a raw string, so that a backslash at a line's end joins the next line to it: long lines are wrapped that way,
# the generated text unchanged. Write any other backslash doubled.
PRELUDE = """typedef long long i64;
#ifdef __CUDA_ARCH__
__device__ __forceinline__ float h2f(unsigned short h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); \
return f; }
__device__ __forceinline__ unsigned short f2h(float f) { unsigned short h; \
asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ unsigned short f2bf(float f) { unsigned short h; \
asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
#else  // a host compiler (tests/host_cuda.py runs this source on the CPU): the same conversions in integer code
__device__ __forceinline__ float h2f(unsigned short h) {  // exact: subnormals normalised, inf and NaN kept
    const unsigned s = (unsigned)(h & 0x8000u) << 16, e = (h >> 10) & 31u;
    unsigned m = h & 0x3ffu;
    if (e == 31u) return __uint_as_float(s | 0x7f800000u | (m << 13));
    if (e) return __uint_as_float(s | ((e + 112u) << 23) | (m << 13));
    if (!m) return __uint_as_float(s);
    unsigned x = 113u;
    while (!(m & 0x400u)) { m <<= 1; --x; }
    return __uint_as_float(s | (x << 23) | ((m & 0x3ffu) << 13));
}
__device__ __forceinline__ unsigned short f2h(float f) {  // round to nearest even, subnormals too; NaN stays quiet
    const unsigned u = __float_as_uint(f), s = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (unsigned short)(s | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) return (unsigned short)(s | 0x7c00u);  // 65520 and up: inf
    if (a >= 0x38800000u) {  // a normal half: rebias the exponent, round the 13 dropped bits
        const unsigned r = a - 0x38000000u;
        return (unsigned short)(s | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
    }
    if (a <= 0x33000000u) return (unsigned short)s;  // up to 2^-25 (the tie goes to even): zero
    const unsigned sh = 126u - (a >> 23), m = (a & 0x7fffffu) | 0x800000u, half = 1u << (sh - 1u);
    const unsigned q = m >> sh, rem = m & ((1u << sh) - 1u);
    return (unsigned short)(s | (q + (rem > half || (rem == half && (q & 1u)))));  // 0x400: the least normal
}
__device__ __forceinline__ unsigned short f2bf(float f) {  // round to nearest even; NaN -> 0x7fc0 (ops/jit/dtypes.py)
    const unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)0x7fc0u;
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
#endif
__device__ __forceinline__ float bf2f(unsigned short h) { return __uint_as_float((unsigned)h << 16); }
__device__ __forceinline__ float e4m32f(unsigned v) {  // fp8 E4M3: exact decode; S.1111.111 is NaN
    const unsigned e = (v >> 3) & 15u, m = v & 7u;
    float mag = e ? __uint_as_float(((e + 120u) << 23) | (m << 20)) : (float)m * 0.001953125f;
    if (e == 15u && m == 7u) mag = __int_as_float(0x7fc00000);
    return (v & 0x80u) ? -mag : mag;
}
__device__ __forceinline__ unsigned char f2e4m3(float f) {  // round to nearest even, saturate to 448, NaN -> 0x7f
    const unsigned u = __float_as_uint(f), sign = (u >> 24) & 0x80u;
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7f;
    const float a = fminf(fabsf(f), 448.f);
    unsigned code;
    if (a < 0.015625f) {
        code = (unsigned)rintf(a * 512.f);  // subnormals (8 rounds up into the first normal, code 8)
    } else {
        int e = (int)(__float_as_uint(a) >> 23) - 127;
        unsigned q = (unsigned)rintf((a * __uint_as_float((unsigned)(127 - e) << 23) - 1.f) * 8.f);
        if (q == 8u) { q = 0u; ++e; }
        code = ((unsigned)(e + 7) << 3) | q;
    }
    return (unsigned char)(sign | code);
}
__device__ __forceinline__ int fdiv(int a, int b) { const int q = a / b; \
return (q * b != a && ((a < 0) != (b < 0))) ? q - 1 : q; }
__device__ __forceinline__ int pmod(int a, int b) { const int r = a % b; \
return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r; }
"""
