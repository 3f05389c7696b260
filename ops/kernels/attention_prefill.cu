// Paged prefill attention: causal, variable-length query spans, K/V read from the paged cache.
//
// Layouts as in attention_decode.cu: qkv [rows, q_stride] (query heads first), k_cache/v_cache
// [num_blocks, Hkv, 16, D], block_tables [B, max_blocks], seq_lens [B] (context including this
// step), query_start_loc [B+1], out [rows, out_stride]. Query i of sequence b sits at absolute
// position seq_len - q_len + i and sees keys 0..that position, so chunked prefill and prefix-cache
// hits (earlier context already in the cache) need nothing special. seq_len 0 -> zero rows.
// window > 0 (sliding-window attention): query position p sees keys p - window + 1 .. p only.
//
// Flash-attention style on tensor cores (mma.sync m16n8k16, fp32 accumulate, ldmatrix from
// XOR-swizzled shared memory), with GQA packing: the M rows of a CTA are (token, head) pairs of one
// KV head's group, flattened token-major, so each K/V tile is loaded once for all the group's
// heads. CTA = 4 warps x 16*MT rows; key tiles of 64 tokens (4 pages) in a cp.async ring of STAGES.
// grid (row tiles sized from max_query_len * group, Hkv, B): tiles past a sequence's rows exit.
// KV_FP8: an E4M3 cache with float32 k_scale / v_scale [Hkv], as in attention_decode.cu: the ring holds
// the tiles' codes, the CTA decodes each into one T tile of the usual layout; scales fold into the softmax
// scale and the output.
// nvcc-variants: -DT=half; -DT=__nv_bfloat16; -DT=half -DHEAD_DIM=64; -DT=half -DHEAD_DIM=16 -DSTAGES=3; -DT=half -DMT=2 -DBN=32 -DSTAGES=3; -DT=half -DKV_FP8=1; -DT=__nv_bfloat16 -DKV_FP8=1 -DHEAD_DIM=64; -DT=half -DKV_FP8=1 -DHEAD_DIM=16; -DT=half -DHEAD_DIM=80; -DT=__nv_bfloat16 -DHEAD_DIM=96 -DKV_FP8=1; -DT=half -DHEAD_DIM=112
#include "mma.cuh"

#ifndef T
#define T half
#endif
#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif

#ifndef STAGES
#define STAGES 2                             // K/V tiles in the ring (3 measured no faster)
#endif
#ifndef MT
#define MT 1                                 // 16-row m-tiles per warp; 2 reuses each K/V fragment twice
#endif
#define NUM_WARPS 4
#define BM (NUM_WARPS * 16 * MT)             // packed (token, head) rows per CTA
#ifndef BN
#define BN 64                                // keys per tile (a multiple of 16)
#endif
#define PAGE 16                              // tokens per cache block
#define CHUNKS (HEAD_DIM / 8)                // 16-byte chunks per row
#define KSTEPS (HEAD_DIM / 16)
#define DTILES (HEAD_DIM / 8)
#define Q_BYTES (BM * HEAD_DIM * 2)
#define TILE_BYTES (BN * HEAD_DIM * 2)       // one key tile of K (or V) as T
#ifndef KV_FP8
#define KV_FP8 0
#endif
#if KV_FP8
typedef unsigned char kv_t;
#define RAW_BYTES (BN * HEAD_DIM)            // a key tile as cached: a code a byte
#else
typedef T kv_t;
#define RAW_BYTES TILE_BYTES
#endif

static_assert(HEAD_DIM % 16 == 0, "HEAD_DIM must be a multiple of 16");

// Byte offset of 16-byte chunk `chunk` of token row `row` inside a swizzled tile (mma.cuh).
__device__ __forceinline__ unsigned swz(int row, int chunk) { return (unsigned)tile_offset<CHUNKS>(row, chunk); }

// Copy key tile `tile` (BN tokens of K and V for one KV head, from key key_base + tile * BN) into a stage; keys
// >= num_keys are zeros.
__device__ __forceinline__ void load_kv_tile(unsigned s_k, const kv_t* k_cache, const kv_t* v_cache,
                                             const int* table, int num_kv_heads, int kvh,
                                             int key_base, int tile, int num_keys, int tid) {
#if KV_FP8  // the codes as they lie: rows of HEAD_DIM bytes
#pragma unroll
    for (int i = tid; i < BN * HEAD_DIM / 16; i += NUM_WARPS * 32) {
        const int row = i / (HEAD_DIM / 16), c = i % (HEAD_DIM / 16);
        const int tok = key_base + tile * BN + row;
        const int live = tok < num_keys;
        const int safe = live ? tok : num_keys - 1;
        const size_t src = (((size_t)table[safe / PAGE] * num_kv_heads + kvh) * PAGE + safe % PAGE) * HEAD_DIM + c * 16;
        cp_async16(s_k + i * 16, k_cache + src, live ? 16 : 0);
        cp_async16(s_k + RAW_BYTES + i * 16, v_cache + src, live ? 16 : 0);
    }
#else
#pragma unroll
    for (int i = tid; i < BN * CHUNKS; i += NUM_WARPS * 32) {
        const int row = i / CHUNKS, c = i % CHUNKS;
        const int tok = key_base + tile * BN + row;
        const int live = tok < num_keys;
        const int safe = live ? tok : num_keys - 1;  // never index the table past the context
        const size_t src = (((size_t)table[safe / PAGE] * num_kv_heads + kvh) * PAGE + safe % PAGE) * HEAD_DIM + c * 8;
        const unsigned off = swz(row, c);
        cp_async16(s_k + off, k_cache + src, live ? 16 : 0);
        cp_async16(s_k + TILE_BYTES + off, v_cache + src, live ? 16 : 0);
    }
#endif
}

extern "C" __global__ void __launch_bounds__(NUM_WARPS * 32)
paged_attention_prefill(const T* __restrict__ qkv, int q_stride,
                        const kv_t* __restrict__ k_cache, const kv_t* __restrict__ v_cache,
                        const float* __restrict__ k_scale, const float* __restrict__ v_scale,  // KV_FP8 only
                        const int* __restrict__ block_tables, int max_blocks,
                        const int* __restrict__ seq_lens, const int* __restrict__ query_start_loc,
                        T* __restrict__ out, int out_stride,
                        int num_kv_heads, int group, float scale_log2_in, int window) {
    extern __shared__ __align__(128) unsigned char smem[];
    const int b = blockIdx.z, kvh = blockIdx.y;
    const int tile_m = gridDim.x - 1 - blockIdx.x;  // longest (most keys) row tiles start first
    const int q_start = query_start_loc[b], q_len = query_start_loc[b + 1] - q_start;
    const int total_rows = q_len * group, row0 = tile_m * BM;
    if (row0 >= total_rows) return;
    const int rows = min(BM, total_rows - row0);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int seq_len = seq_lens[b];
    if (seq_len <= 0) {  // padding sequence: defined zeros
        for (int i = tid; i < rows * HEAD_DIM; i += NUM_WARPS * 32) {
            const int flat = row0 + i / HEAD_DIM;
            out[(size_t)(q_start + flat / group) * out_stride + (size_t)(kvh * group + flat % group) * HEAD_DIM + i % HEAD_DIM] = T(0.0f);
        }
        return;
    }
    const int first_pos = seq_len - q_len;  // absolute position of query 0
    const int last_token = (row0 + rows - 1) / group;
    const int num_keys = first_pos + last_token + 1;          // keys this CTA's last row sees
    const int unmasked_keys = first_pos + row0 / group + 1;   // keys every row of the CTA sees
    // Sliding window: key tiles start at the page of the first key the CTA's first row sees (earlier pages may have
    // been freed: never read), and every tile is masked per row on both sides.
    const int key_base = window > 0 ? max(0, unmasked_keys - window) / PAGE * PAGE : 0;
    const int num_tiles = (num_keys - key_base + BN - 1) / BN;
    const int* table = block_tables + (size_t)b * max_blocks;
#if KV_FP8
    const float scale_log2 = scale_log2_in * k_scale[kvh], out_scale = v_scale[kvh];
#else
    const float scale_log2 = scale_log2_in, out_scale = 1.0f;
#endif

    const unsigned s_q = smem_addr(smem), s_kv0 = s_q + Q_BYTES;
    // Q tile: row r -> (token, head) = divmod(row0 + r, group); rows past the span are zeros.
    for (int i = tid; i < BM * CHUNKS; i += NUM_WARPS * 32) {
        const int r = i / CHUNKS, c = i % CHUNKS, flat = row0 + r;
        const int live = r < rows;
        const T* src = qkv + (live ? (size_t)(q_start + flat / group) * q_stride + (size_t)(kvh * group + flat % group) * HEAD_DIM + c * 8 : 0);
        cp_async16(s_q + swz(r, c), src, live ? 16 : 0);
    }
    load_kv_tile(s_kv0, k_cache, v_cache, table, num_kv_heads, kvh, key_base, 0, num_keys, tid);
    cp_async_commit();
#pragma unroll
    for (int st = 1; st < STAGES - 1; ++st) {
        if (st < num_tiles)
            load_kv_tile(s_kv0 + st * 2 * RAW_BYTES, k_cache, v_cache, table, num_kv_heads, kvh, key_base, st, num_keys,
                         tid);
        cp_async_commit();  // empty groups keep the wait_group count uniform
    }

    // Causal limits of this thread's rows (m-tile mt, half h: row g + 8h of the tile); rows past the
    // span borrow the last live row's limit so that no row is fully masked (never stored).
    int lim[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
            lim[mt][h] = first_pos + (row0 + min(warp * 16 * MT + mt * 16 + g + 8 * h, rows - 1)) / group;

    float o[MT][DTILES][4];
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int n = 0; n < DTILES; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f;
        m[mt][0] = m[mt][1] = NEG_INF;
        l[mt][0] = l[mt][1] = 0.0f;
    }
    const int mi = lane >> 3, ri = lane & 7;
    // ldmatrix address of this lane's Q row for m-tile mt, k-step kk
#define Q_ADDR(mt, kk) (s_q + swz(warp * 16 * MT + (mt) * 16 + (mi & 1) * 8 + ri, 2 * (kk) + (mi >> 1)))
#if MT == 1
    unsigned qa[KSTEPS][4];  // one m-tile: Q stays in registers for the whole key loop
#endif

    for (int j = 0; j < num_tiles; ++j) {
        // Refill the stage read in iteration j-1 (the barrier closing that iteration freed it).
        const int next = j + STAGES - 1;
        if (next < num_tiles)
            load_kv_tile(s_kv0 + (next % STAGES) * 2 * RAW_BYTES, k_cache, v_cache, table, num_kv_heads, kvh,
                         key_base, next, num_keys, tid);
        cp_async_commit();
        cp_async_wait<STAGES - 1>();  // tile j (and Q) landed
        __syncthreads();
#if MT == 1
        if (j == 0) {
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk) ldmatrix_x4(qa[kk], Q_ADDR(0, kk));
        }
#endif
#if KV_FP8  // decode tile j's codes into the T tile behind the ring (the barrier closing j-1 freed it)
        unsigned char* tile = smem + Q_BYTES + STAGES * 2 * RAW_BYTES;
        const unsigned char* raw = smem + Q_BYTES + (j % STAGES) * 2 * RAW_BYTES;
        e4m3_tile<T, HEAD_DIM>(tile, raw, BN * HEAD_DIM / 16, tid, NUM_WARPS * 32);
        e4m3_tile<T, HEAD_DIM>(tile + TILE_BYTES, raw + RAW_BYTES, BN * HEAD_DIM / 16, tid, NUM_WARPS * 32);
        __syncthreads();
        const unsigned s_k = s_kv0 + STAGES * 2 * RAW_BYTES, s_v = s_k + TILE_BYTES;
#else
        const unsigned s_k = s_kv0 + (j % STAGES) * 2 * TILE_BYTES, s_v = s_k + TILE_BYTES;
#endif

        // S = Q K^T; each K fragment feeds all MT m-tiles.
        float s[MT][BN / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < BN / 8; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
#if MT == 1
            const unsigned* qf[1] = {qa[kk]};
#else
            unsigned qbuf[MT][4];
            const unsigned* qf[MT];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) { ldmatrix_x4(qbuf[mt], Q_ADDR(mt, kk)); qf[mt] = qbuf[mt]; }
#endif
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                unsigned kb[4];
                ldmatrix_x4(kb, s_k + swz(np * 16 + (mi >> 1) * 8 + ri, 2 * kk + (mi & 1)));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Mma<T>::run(s[mt][2 * np], qf[mt], kb[0], kb[1]);
                    Mma<T>::run(s[mt][2 * np + 1], qf[mt], kb[2], kb[3]);
                }
            }
        }
        const int key0 = key_base + j * BN;
        const bool edge = window > 0 || key0 + BN > unmasked_keys;  // the tile crosses some row's causal edge
        unsigned pa[MT][BN / 16][4];                  // P as A fragments, 16 keys per k-step
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = key0 + n * 8 + 2 * t + (e & 1);
                    const int lim_e = lim[mt][e >> 1];
                    s[mt][n][e] = (!edge || (key <= lim_e && (window <= 0 || key > lim_e - window)))
                                      ? s[mt][n][e] * scale_log2 : NEG_INF;
                }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float mx = NEG_INF;
#pragma unroll
                for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[mt][n][2 * h], s[mt][n][2 * h + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                // Without a window key 0 is visible to every row and sits in tile 0: the maxima are finite from
                // then on. With one, a row may see nothing of the first tiles: it stays -inf, and exponentials
                // against 0 keep its P, O and sum at zero instead of NaN.
                const float mn = fmaxf(m[mt][h], mx);
                const float mn_safe = mn == NEG_INF ? 0.0f : mn;
                const float alpha = fast_exp2(m[mt][h] - mn_safe);
                m[mt][h] = mn;
                float ps = 0.0f;
#pragma unroll
                for (int n = 0; n < BN / 8; ++n) {
                    s[mt][n][2 * h] = fast_exp2(s[mt][n][2 * h] - mn_safe);
                    s[mt][n][2 * h + 1] = fast_exp2(s[mt][n][2 * h + 1] - mn_safe);
                    ps += s[mt][n][2 * h] + s[mt][n][2 * h + 1];
                }
                l[mt][h] = l[mt][h] * alpha + ps;
#pragma unroll
                for (int n = 0; n < DTILES; ++n) { o[mt][n][2 * h] *= alpha; o[mt][n][2 * h + 1] *= alpha; }
            }
#pragma unroll
            for (int ks = 0; ks < BN / 16; ++ks) {
                pa[mt][ks][0] = Mma<T>::pack(s[mt][2 * ks][0], s[mt][2 * ks][1]);
                pa[mt][ks][1] = Mma<T>::pack(s[mt][2 * ks][2], s[mt][2 * ks][3]);
                pa[mt][ks][2] = Mma<T>::pack(s[mt][2 * ks + 1][0], s[mt][2 * ks + 1][1]);
                pa[mt][ks][3] = Mma<T>::pack(s[mt][2 * ks + 1][2], s[mt][2 * ks + 1][3]);
            }
        }
        // O += P V; each V fragment feeds all MT m-tiles.
#pragma unroll
        for (int ks = 0; ks < BN / 16; ++ks)
#pragma unroll
            for (int nn = 0; nn < DTILES / 2; ++nn) {
                unsigned vb[4];
                ldmatrix_x4_trans(vb, s_v + swz(ks * 16 + (mi & 1) * 8 + ri, 2 * nn + (mi >> 1)));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Mma<T>::run(o[mt][2 * nn], pa[mt][ks], vb[0], vb[1]);
                    Mma<T>::run(o[mt][2 * nn + 1], pa[mt][ks], vb[2], vb[3]);
                }
            }
        __syncthreads();  // this stage is refilled at the top of the next iteration
    }
#undef Q_ADDR
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float sum = l[mt][h];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const float inv = out_scale / sum;
            const int r = warp * 16 * MT + mt * 16 + g + 8 * h;
            if (r < rows) {
                const int flat = row0 + r;
                T* dst = out + (size_t)(q_start + flat / group) * out_stride + (size_t)(kvh * group + flat % group) * HEAD_DIM + 2 * t;
#pragma unroll
                for (int n = 0; n < DTILES; ++n)
                    *reinterpret_cast<unsigned*>(dst + n * 8) = Mma<T>::pack(o[mt][n][2 * h] * inv, o[mt][n][2 * h + 1] * inv);
            }
        }
}
