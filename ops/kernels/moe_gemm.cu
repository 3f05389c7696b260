// Grouped GEMM of the mixture-of-experts MLP (ops/cuda/moe.py; the routing that feeds it is moe_route.cu):
// out[row, n] = sum_k A[a_row, k] * W[e][n, k] on tensor cores (mma.sync m16n8k16, fp32 accumulate, ldmatrix,
// a cp.async ring of STAGES), e = the tile's expert (tile_expert), rows tile_row .. min(+BM, cursor[e]) (the
// expert's end), a_row = src[row] when gather (x read in token order), else row. Tiles past num_tiles[0] exit, so
// the grid is sized from T alone: T*K/BM + min(E, T*K) + 1 tiles x ceil(N / BN). W [E, N, K] row-major (checkpoint
// layout), K a multiple of 8, N even. Hand CUDA: a tensor-core loop the JIT language does not express (docs/jit.md).
// nvcc-variants: -DT=half; -DT=__nv_bfloat16; -DT=half -DBM=64; -DT=__nv_bfloat16 -DBM=64
#include "mma.cuh"

#ifndef T
#define T half
#endif
#ifndef BM
#define BM 16                                 // rows per tile: 16 (decode: a few tokens an expert) or 64
#endif
#define BN 64
#define BK 32
#define STAGES 4
#define LDS (BK + 8)                          // smem row stride (elements): 80 bytes, 16-byte aligned, fewer conflicts
#define WARPS_M (BM / 16)
#define WARPS_N (4 / WARPS_M)
#define NT (BN / WARPS_N / 8)                 // n8 tiles per warp
#define A_CHUNKS (BM * BK / 8)                // 16-byte chunks of an A stage (B's: BN * BK / 8 = 2 a thread)
#define A_ITERS ((A_CHUNKS + 127) / 128)

__device__ __forceinline__ void from_f(float f, half& o) { o = __float2half_rn(f); }
__device__ __forceinline__ void from_f(float f, __nv_bfloat16& o) { o = __float2bfloat16_rn(f); }

extern "C" __global__ void __launch_bounds__(128) moe_gemm(const T* __restrict__ a, const T* __restrict__ w,
        T* __restrict__ out, const int* __restrict__ src, const int* __restrict__ tile_expert,
        const int* __restrict__ tile_row, const int* __restrict__ num_tiles, const int* __restrict__ cursor,
        int n_dim, int k_dim, int gather) {
    __shared__ __align__(16) T sa[STAGES][BM * LDS];
    __shared__ __align__(16) T sb[STAGES][BN * LDS];
    const int tile = blockIdx.x;
    if (tile >= num_tiles[0]) return;
    const int e = tile_expert[tile], row0 = tile_row[tile], end = min(row0 + BM, cursor[e]);
    const int n0 = blockIdx.y * BN, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const T* we = w + (long long)e * n_dim * k_dim;
    // each thread's 16-byte chunks of a stage: A has BM*BK/8 chunks, B BN*BK/8 (4 a row)
    const T* a_src[A_ITERS];
    bool a_ok[A_ITERS];
#pragma unroll
    for (int i = 0; i < A_ITERS; ++i) {
        const int c = tid + i * 128, r = c / 4, row = row0 + r;
        a_ok[i] = c < A_CHUNKS && row < end;
        const int ar = a_ok[i] ? (gather ? src[row] : row) : 0;
        a_src[i] = a + (long long)ar * k_dim + (c % 4) * 8;
    }
    auto load = [&](int stage, int k0) {
#pragma unroll
        for (int i = 0; i < A_ITERS; ++i) {
            const int c = tid + i * 128;
            if (c < A_CHUNKS) {
                const bool ok = a_ok[i] && k0 + (c % 4) * 8 < k_dim;
                cp_async16(smem_addr(&sa[stage][(c / 4) * LDS + (c % 4) * 8]), ok ? a_src[i] + k0 : a, ok ? 16 : 0);
            }
        }
#pragma unroll
        for (int i = 0; i < BN * BK / 8 / 128; ++i) {
            const int c = tid + i * 128, r = c / 4, kc = k0 + (c % 4) * 8;
            const bool ok = n0 + r < n_dim && kc < k_dim;
            cp_async16(smem_addr(&sb[stage][r * LDS + (c % 4) * 8]), ok ? we + (long long)(n0 + r) * k_dim + kc : w,
                       ok ? 16 : 0);
        }
    };
    float acc[NT][4] = {};
    const int wm = warp / WARPS_N, wn = warp % WARPS_N, k_tiles = (k_dim + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < k_tiles) load(s, s * BK);
        cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int nxt = kt + STAGES - 1;
        if (nxt < k_tiles) load(nxt % STAGES, nxt * BK);
        cp_async_commit();
        const T* ta = sa[kt % STAGES];
        const T* tb = sb[kt % STAGES];
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            unsigned af[4];
            ldmatrix_x4(af, smem_addr(&ta[(wm * 16 + lane % 16) * LDS + kk + (lane / 16) * 8]));
#pragma unroll
            for (int j = 0; j < NT; j += 2) {  // two n8 tiles a ldmatrix: (n 0-7, k 0-7 | 8-15), (n 8-15, ...)
                unsigned bf[4];
                const int nb = wn * NT * 8 + j * 8;
                ldmatrix_x4(bf, smem_addr(&tb[(nb + (lane / 16) * 8 + lane % 8) * LDS + kk + ((lane / 8) % 2) * 8]));
                Mma<T>::run(acc[j], af, bf[0], bf[1]);
                Mma<T>::run(acc[j + 1], af, bf[2], bf[3]);
            }
        }
    }
    cp_async_wait<0>();
    const int g = lane / 4, q = lane % 4;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const int col = n0 + wn * NT * 8 + j * 8 + q * 2;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = row0 + wm * 16 + g + h * 8;
            if (row < end && col < n_dim) {  // n_dim is even (the launcher checks): both columns or neither
                T lo, hi;
                from_f(acc[j][h * 2], lo), from_f(acc[j][h * 2 + 1], hi);
                out[(long long)row * n_dim + col] = lo, out[(long long)row * n_dim + col + 1] = hi;
            }
        }
    }
}

