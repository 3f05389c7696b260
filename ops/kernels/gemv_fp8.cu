// W8A16 GEMV for decode at a few tokens: out[t, n] = (sum_k x[t, k] * code[n, k]) * scale[n] (+ bias[n]),
// the weight as E4M3 codes with a float32 scale per output row (ops/quant.Fp8Weight), x, bias and out in T.
//
// At up to 8 tokens a projection reads its weights once and does `tokens` FMAs per weight byte: the bound is
// the weight bytes, half of fp16's. The activations stay in T (no per-token quantizer), and the result is
// scaled and rounded in registers (no float32 pass, which cuBLASLt's FP8 path needs where it cannot apply
// per-row and per-token scale vectors itself, as on Hopper with cuBLAS 13.1).
//
// A warp owns ROWS consecutive output rows; its lanes stride over K in pieces of 16 codes (one 16-byte load
// a row), decode them exactly (mma.cuh's e4m3x2_half2), and accumulate in float32 against x (read through
// L1: every warp of an SM reads the same x). Shuffles reduce each (row, token) sum; lane r * MAXT + t writes it.
// Defines: T (half | __nv_bfloat16), MAXT (1, 2, 4, 8: the tokens the launch may have), ROWS (1, 2, 4),
// WARPS (per block), HAS_BIAS (0 | 1). K must be a multiple of 16, rows of x 16-byte aligned.
// nvcc-variants: -DT=half -DMAXT=1 -DROWS=2; -DT=half -DMAXT=8 -DROWS=4 -DHAS_BIAS=1; -DT=__nv_bfloat16 -DMAXT=4 -DROWS=1; -DT=__nv_bfloat16 -DMAXT=2 -DROWS=2 -DHAS_BIAS=1
#include "mma.cuh"

#ifndef T
#define T half
#endif
#ifndef MAXT
#define MAXT 1
#endif
#ifndef ROWS
#define ROWS 2
#endif
#ifndef WARPS
#define WARPS 4
#endif
#ifndef HAS_BIAS
#define HAS_BIAS 0
#endif
static_assert(ROWS * MAXT <= 32, "one lane writes each (row, token) sum");

__device__ __forceinline__ float to_f32(T v) { return (float)v; }

// 8 consecutive T values (one 16-byte load) as floats
__device__ __forceinline__ void load8(const T* p, float* f) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = to_f32(e[i]);
}

// 16 E4M3 codes as floats (exact: the fp16 decode, then fp16 -> float)
__device__ __forceinline__ void codes16(const uint4& c, float* f) {
    const unsigned words[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 a = __half22float2(e4m3x2_half2(__byte_perm(words[i], 0, 0x1404)));
        const float2 b = __half22float2(e4m3x2_half2(__byte_perm(words[i], 0, 0x3424)));
        f[4 * i] = a.x; f[4 * i + 1] = a.y; f[4 * i + 2] = b.x; f[4 * i + 3] = b.y;
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
gemv_fp8(const T* __restrict__ x, int x_stride, const unsigned char* __restrict__ w, const float* __restrict__ scale,
         const T* __restrict__ bias, T* __restrict__ out, int out_stride, int n_rows, int k, int tokens) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * WARPS + warp) * ROWS;
    if (row0 >= n_rows) return;
    float acc[ROWS][MAXT];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int t = 0; t < MAXT; ++t) acc[r][t] = 0.0f;

    const int pieces = k / 16;
#pragma unroll 2
    for (int p = lane; p < pieces; p += 32) {
        float wf[ROWS][16];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int row = min(row0 + r, n_rows - 1);  // a ragged last warp recomputes a row, never stores it
            codes16(__ldg(reinterpret_cast<const uint4*>(w + (size_t)row * k) + p), wf[r]);
        }
#pragma unroll
        for (int t = 0; t < MAXT; ++t) {
            if (t < tokens) {
                float xf[16];
                load8(x + (size_t)t * x_stride + p * 16, xf);
                load8(x + (size_t)t * x_stride + p * 16 + 8, xf + 8);
#pragma unroll
                for (int r = 0; r < ROWS; ++r)
#pragma unroll
                    for (int i = 0; i < 16; ++i) acc[r][t] = fmaf(wf[r][i], xf[i], acc[r][t]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int t = 0; t < MAXT; ++t) {
            float v = acc[r][t];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
            const int row = row0 + r;
            if (lane == r * MAXT + t && t < tokens && row < n_rows) {
                v *= scale[row];
#if HAS_BIAS
                v += to_f32(bias[row]);
#endif
                out[(size_t)t * out_stride + row] = T(v);
            }
        }
}
