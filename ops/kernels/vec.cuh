// fp16 / bf16 pairs <-> float2, shared by the elementwise kernels (activation, norm, rope_cache).
// Include after DTYPE is defined (half | __nv_bfloat16; default half). ops/cuda/compile.py pastes this
// file in place of its #include line (NVRTC gets one source string); nvcc finds it beside the .cu.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef unsigned long long u64;  // NVRTC has no <cstddef>

#ifndef DTYPE
#define DTYPE half
#endif

template <typename S> struct PairOf;
template <> struct PairOf<__half> { typedef __half2 type; };
template <> struct PairOf<__nv_bfloat16> { typedef __nv_bfloat162 type; };
typedef DTYPE scalar_t;
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
