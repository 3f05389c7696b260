// SiLU-and-multiply of the merged gate/up projection, fp32 math.
//   out[t, i] = silu(x[t, i]) * x[t, I + i],  silu(g) = g / (1 + exp(-g))
// Layout: x [T, 2*I] (gate half, then up half), out [T, I]; I * sizeof(DTYPE) a multiple of 16 bytes.
// One thread per 16-byte vector of out, flat over T * I/8 so any T fills the GPU.
// Defines: DTYPE (half | __nv_bfloat16).
// nvcc-variants: -DDTYPE=half; -DDTYPE=__nv_bfloat16
#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef unsigned long long u64;  // NVRTC has no <cstddef>

#ifndef DTYPE
#define DTYPE half
#endif

template <typename S> struct PairOf;
template <> struct PairOf<__half> { typedef __half2 type; };
template <> struct PairOf<__nv_bfloat16> { typedef __nv_bfloat162 type; };
typedef PairOf<DTYPE>::type pair_t;

__device__ __forceinline__ float2 to_float2(__half2 v) { return __half22float2(v); }
// bf16 -> f32 is a 16-bit shift; spelled out because sm_90's cvt path made ptxas keep every converted
// value live across the reduction (twice the registers, spills at VPT 8)
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) {
    const unsigned u = *reinterpret_cast<const unsigned *>(&v);
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}
__device__ __forceinline__ void from_float2(float2 f, __half2 &o) { o = __float22half2_rn(f); }
__device__ __forceinline__ void from_float2(float2 f, __nv_bfloat162 &o) { o = __float22bfloat162_rn(f); }

// exp(-g) overflows to inf for g < -88 and the quotient is then -0, the limit of silu
__device__ __forceinline__ float silu(float g) { return g / (1.f + __expf(-g)); }

// x: [T, 2 * n_vec] vectors, out: [T, n_vec]; total = T * n_vec < 2^31 (the launcher checks)
extern "C" __global__ void silu_and_mul_kernel(const uint4 *__restrict__ x, uint4 *__restrict__ out,
                                               unsigned n_vec, unsigned total) {
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const unsigned row = i / n_vec, c = i - row * n_vec;
    const uint4 *xr = x + (u64)row * 2 * n_vec;
    const uint4 gate = xr[c], up = xr[n_vec + c];
    const pair_t *g = reinterpret_cast<const pair_t *>(&gate);
    const pair_t *u = reinterpret_cast<const pair_t *>(&up);
    uint4 o;
    pair_t *op = reinterpret_cast<pair_t *>(&o);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const float2 gf = to_float2(g[k]), uf = to_float2(u[k]);
        from_float2(make_float2(silu(gf.x) * uf.x, silu(gf.y) * uf.y), op[k]);
    }
    out[i] = o;
}
