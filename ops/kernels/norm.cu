// RMSNorm and fused residual-add + RMSNorm over the rows of [T, H] activations, fp32 math.
//   rms_norm:     out[t, :] = x[t, :] / sqrt(mean(x[t, :]^2) + eps) * weight
//   add_rms_norm: residual[t, :] += x[t, :] (stored in DTYPE, as vLLM does); out = rms_norm(residual)
// Layout: x, residual, out [T, H] row-major, weight [H]; H * sizeof(DTYPE) a multiple of 16 bytes.
// One block per row. Each thread keeps VPT 16-byte vectors of x (and of weight) in registers, so
// the row crosses HBM once and every load is issued before the block-wide reduction waits.
// Defines: DTYPE (half | __nv_bfloat16), VPT (16-byte vectors per thread: 1, 2, 4 or 8; blockDim <= 512).
// nvcc-variants: -DDTYPE=half -DVPT=1; -DDTYPE=__nv_bfloat16 -DVPT=2; -DDTYPE=half -DVPT=4; -DDTYPE=__nv_bfloat16 -DVPT=8
#include "vec.cuh"

#ifndef VPT
#define VPT 1
#endif

// the k-th pair (k < 4) of elements in a 16-byte vector
__device__ __forceinline__ float2 pair_at(const uint4 &v, int k) {
    return to_float2(reinterpret_cast<const pair_t *>(&v)[k]);
}
__device__ __forceinline__ void set_pair(uint4 &v, int k, float2 f) {
    from_float2(f, reinterpret_cast<pair_t *>(&v)[k]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Sum over the block; every thread gets the total. Each warp re-reduces the per-warp partials
// itself, which saves the second __syncthreads of the usual broadcast through shared memory.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    v = warp_sum(v);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
    __syncthreads();
    const unsigned num_warps = (blockDim.x + 31) >> 5;
    v = threadIdx.x % 32 < num_warps ? partial[threadIdx.x % 32] : 0.f;
    return warp_sum(v);
}

__device__ __forceinline__ float sum_squares(const uint4 &v) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const float2 f = pair_at(v, k);
        s += f.x * f.x + f.y * f.y;
    }
    return s;
}

__device__ __forceinline__ uint4 scale(const uint4 &v, const uint4 &w, float inv_rms) {
    uint4 o;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const float2 f = pair_at(v, k), g = pair_at(w, k);
        set_pair(o, k, make_float2(f.x * inv_rms * g.x, f.y * inv_rms * g.y));
    }
    return o;
}

// x, out: [T, n_vec] 16-byte vectors; weight: [n_vec]; grid = T blocks; hidden = 8 * n_vec
extern "C" __global__ void __launch_bounds__(512)
rms_norm_kernel(const uint4 *__restrict__ x, const uint4 *__restrict__ weight, uint4 *__restrict__ out,
                int n_vec, float eps) {
    const u64 row = (u64)blockIdx.x * n_vec;
    uint4 xv[VPT], wv[VPT];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
        const int c = threadIdx.x + i * blockDim.x;
        if (c < n_vec) {
            xv[i] = x[row + c];
            wv[i] = weight[c];
            ss += sum_squares(xv[i]);
        }
    }
    const float inv_rms = rsqrtf(block_sum(ss) / (float)(8 * n_vec) + eps);
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
        const int c = threadIdx.x + i * blockDim.x;
        if (c < n_vec) out[row + c] = scale(xv[i], wv[i], inv_rms);
    }
}

// residual is read and written in place; the norm is taken of the rounded sum, i.e. of exactly
// the residual the next layer will read.
extern "C" __global__ void __launch_bounds__(512)
add_rms_norm_kernel(const uint4 *__restrict__ x, uint4 *__restrict__ residual, const uint4 *__restrict__ weight,
                    uint4 *__restrict__ out, int n_vec, float eps) {
    const u64 row = (u64)blockIdx.x * n_vec;
    uint4 rv[VPT], wv[VPT];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
        const int c = threadIdx.x + i * blockDim.x;
        if (c < n_vec) {
            const uint4 xv = x[row + c];
            rv[i] = residual[row + c];
            wv[i] = weight[c];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float2 a = pair_at(xv, k), b = pair_at(rv[i], k);
                set_pair(rv[i], k, make_float2(a.x + b.x, a.y + b.y));
            }
            residual[row + c] = rv[i];
            ss += sum_squares(rv[i]);
        }
    }
    const float inv_rms = rsqrtf(block_sum(ss) / (float)(8 * n_vec) + eps);
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
        const int c = threadIdx.x + i * blockDim.x;
        if (c < n_vec) out[row + c] = scale(rv[i], wv[i], inv_rms);
    }
}
