// SiLU-and-multiply of the merged gate/up projection, fp32 math.
//   out[t, i] = silu(x[t, i]) * x[t, I + i],  silu(g) = g / (1 + exp(-g))
// Layout: x [T, 2*I] (gate half, then up half), out [T, I]; I * sizeof(DTYPE) a multiple of 16 bytes.
// One thread per 16-byte vector of out, flat over T * I/8 so any T fills the GPU.
// Defines: DTYPE (half | __nv_bfloat16).
// nvcc-variants: -DDTYPE=half; -DDTYPE=__nv_bfloat16
#include "vec.cuh"

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
