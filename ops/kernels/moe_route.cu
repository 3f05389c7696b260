// Mixture-of-experts routing and combine (ops/cuda/moe.py runs the MLP in five graph-capturable launches, no host
// sync; the grouped GEMMs between them are moe_gemm.cu):
//   moe_route    one warp a token: softmax of the router's logits [T, E] in float32, the top K (ties to the lower
//                expert), renormalised when NORMALIZE; ids/weights [T, K]; counts[e] += 1 per pick (atomics; the
//                launcher zeroes counts first).
//   moe_offsets  one block: each expert's rows start = exclusive sum of counts (rows are grouped by expert); the
//                GEMM tiles of BM rows each expert needs (tile_expert / tile_row, num_tiles[0] in all); each
//                expert's cursor set to its start.
//   moe_permute  one thread a (token, slot) pair: takes the next row of its expert (atomic cursor): src[row] = token,
//                pos[pair] = row. The order within an expert varies from run to run; no row's result depends on it.
//                Afterwards cursor[e] is the end of expert e's rows.
//   moe_combine  one block a token: out[t] = sum_j w[t, j] * y[pos[t, j]] in float32, plus sigmoid(gate[t]) *
//                shared[t] when SHARED (Qwen2-MoE's shared expert, computed by the dense ops beforehand).
// tests/test_moe_kernels.py runs these on the CPU (tests/host_mma.py), T = float and, through ops/cuda/moe.py, half.
// nvcc-variants: -DT=half; -DT=__nv_bfloat16 -DBM=64 -DSHARED=1 -DNORMALIZE=0
#ifndef CUPYLLM_HOST_EMU  // the CPU emulator (tests/host_mma.py) brings its own fp16/bf16 types
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif
__device__ __forceinline__ float to_f(half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void from_f(float f, half& o) { o = __float2half_rn(f); }
__device__ __forceinline__ void from_f(float f, __nv_bfloat16& o) { o = __float2bfloat16_rn(f); }
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ void from_f(float f, float& o) { o = f; }

#ifndef T
#define T half
#endif
#ifndef BM
#define BM 16                                 // rows (token, expert pairs) per GEMM tile: moe_gemm.cu's
#endif
#ifndef NORMALIZE
#define NORMALIZE 1
#endif
#ifndef SHARED
#define SHARED 0
#endif
#define MAX_E 256                             // ops/moe_layout.MAX_EXPERTS
#define MAX_K 16                              // ops/moe_layout.MAX_TOP_K
#define NEG_INF (-__int_as_float(0x7f800000))

extern "C" __global__ void __launch_bounds__(128) moe_route(const T* __restrict__ logits, int num_tokens, int num_experts, int top_k,
                                     int* __restrict__ ids, float* __restrict__ weights, int* __restrict__ counts) {
    const int t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (t >= num_tokens) return;
    float p[MAX_E / 32];
    float mx = NEG_INF;
#pragma unroll
    for (int i = 0; i < MAX_E / 32; ++i) {
        const int e = i * 32 + lane;
        p[i] = e < num_experts ? to_f(logits[(long long)t * num_experts + e]) : NEG_INF;
        mx = fmaxf(mx, p[i]);
    }
    for (int o = 16; o; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < MAX_E / 32; ++i) {
        p[i] = i * 32 + lane < num_experts ? expf(p[i] - mx) : -1.f;  // -1: never picked (probabilities are >= 0)
        sum += fmaxf(p[i], 0.f);
    }
    for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    float picked[MAX_K];
    int picked_id[MAX_K];
    float total = 0.f;
    for (int j = 0; j < top_k; ++j) {
        float best = -2.f;
        int arg = MAX_E;
#pragma unroll
        for (int i = 0; i < MAX_E / 32; ++i)
            if (p[i] > best) best = p[i], arg = i * 32 + lane;  // this lane's lowest expert of the largest value
        for (int o = 16; o; o >>= 1) {
            const float ob = __shfl_xor_sync(0xffffffffu, best, o);
            const int oa = __shfl_xor_sync(0xffffffffu, arg, o);
            if (ob > best || (ob == best && oa < arg)) best = ob, arg = oa;
        }
        if (arg % 32 == lane) {
#pragma unroll
            for (int i = 0; i < MAX_E / 32; ++i)
                if (i == arg / 32) p[i] = -1.f;
        }
        picked[j] = best / sum, picked_id[j] = arg;
        total += best / sum;
    }
    if (lane == 0) {
        for (int j = 0; j < top_k; ++j) {
            ids[t * top_k + j] = picked_id[j];
            weights[t * top_k + j] = NORMALIZE ? picked[j] / total : picked[j];
            atomicAdd(&counts[picked_id[j]], 1);
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) moe_offsets(int num_experts, int* __restrict__ counts,
        int* __restrict__ cursor, int* __restrict__ tile_expert, int* __restrict__ tile_row,
        int* __restrict__ num_tiles) {
    __shared__ int rows[MAX_E], tiles[MAX_E];
    const int e = threadIdx.x;
    const int c = e < num_experts ? counts[e] : 0;
    rows[e] = c, tiles[e] = (c + BM - 1) / BM;
    __syncthreads();
    for (int step = 1; step < MAX_E; step <<= 1) {  // inclusive scans (Hillis-Steele)
        const int r = e >= step ? rows[e - step] : 0, n = e >= step ? tiles[e - step] : 0;
        __syncthreads();
        rows[e] += r, tiles[e] += n;
        __syncthreads();
    }
    if (e >= num_experts) return;
    const int start = rows[e] - c, first = tiles[e] - (c + BM - 1) / BM;
    for (int i = 0; first + i < tiles[e]; ++i) tile_expert[first + i] = e, tile_row[first + i] = start + i * BM;
    cursor[e] = start;
    if (e == num_experts - 1) num_tiles[0] = tiles[e];
}

extern "C" __global__ void __launch_bounds__(128) moe_permute(const int* __restrict__ ids, int pairs, int top_k, int* __restrict__ cursor,
                                       int* __restrict__ src, int* __restrict__ pos) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= pairs) return;
    const int row = atomicAdd(&cursor[ids[p]], 1);
    src[row] = p / top_k, pos[p] = row;
}

extern "C" __global__ void __launch_bounds__(256) moe_combine(const T* __restrict__ y, const int* __restrict__ pos,
                                       const float* __restrict__ weights, int top_k, int hidden,
                                       const T* __restrict__ shared, const T* __restrict__ gate, T* __restrict__ out) {
    const int t = blockIdx.x;
    float s = 0.f;
    if (SHARED) s = 1.f / (1.f + expf(-to_f(gate[t])));
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        float v = SHARED ? s * to_f(shared[(long long)t * hidden + c]) : 0.f;
        for (int j = 0; j < top_k; ++j)
            v += weights[t * top_k + j] * to_f(y[(long long)pos[t * top_k + j] * hidden + c]);
        from_f(v, out[(long long)t * hidden + c]);
    }
}
