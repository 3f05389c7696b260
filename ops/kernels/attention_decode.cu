// Paged decode attention: one query token per sequence, K/V read from the paged cache.
//
// Layouts: qkv [rows, q_stride] with the Hq query heads first (head h at columns h*D..h*D+D-1);
// k_cache, v_cache [num_blocks, Hkv, 16, D]; block_tables [B, max_blocks]; seq_lens [B] (context
// including this step's token, 0 = graph padding row -> zeros); query_start_loc [B+1]; out
// [rows, out_stride]. Sequence b's query row is query_start_loc[b].
//
// GQA packing: the query heads sharing one KV head are the M rows (up to 16) of one m16n8k16
// tensor-core tile, so each K/V page is loaded once for the whole group. One CTA per
// (split, kv head [x 16-head slice], sequence). Each warp streams its own pages (16 tokens) through
// a private cp.async ring in shared memory and keeps an fp32 online softmax; the CTA merges its
// warps at the end.
//
// Split-KV: the grid's x size (max_splits) is fixed by the host from an upper bound on the context
// (max_model_len when a graph is captured). Each sequence divides its *actual* length on the device
// (split_plan below): n = min(max_splits, ceil(len / min_chunk)) splits of a page-aligned chunk;
// CTAs whose split index is past that exit at once. So one captured graph serves every context
// length, and short contexts cost only a few idle CTAs. With more than one split, each CTA writes
// an unnormalised partial (O, max, sum) to the workspace and paged_attention_combine merges them.
//
// KV_FP8: the cache holds E4M3 codes (a byte an element) and a float32 scale per KV head, k_scale and
// v_scale [Hkv]. cp.async lands a page's codes in the ring (half the bytes of an fp16 page); the warp
// decodes them into one fp16/bf16 tile of the usual layout, and the tensor-core loop runs unchanged.
// The K scale is folded into the softmax scale, the V scale into the output (both are linear there).
// nvcc-variants: -DT=half; -DT=__nv_bfloat16; -DT=__nv_bfloat16 -DHEAD_DIM=64; -DT=half -DHEAD_DIM=16; -DT=half -DKV_FP8=1; -DT=__nv_bfloat16 -DKV_FP8=1 -DHEAD_DIM=64; -DT=half -DKV_FP8=1 -DHEAD_DIM=16; -DT=half -DSLIDING=1; -DT=__nv_bfloat16 -DSLIDING=1 -DHEAD_DIM=64; -DT=half -DKV_FP8=1 -DSLIDING=1; -DT=half -DHEAD_DIM=80; -DT=__nv_bfloat16 -DHEAD_DIM=96 -DKV_FP8=1; -DT=half -DHEAD_DIM=96 -DSLIDING=1; -DT=half -DHEAD_DIM=112 -DKV_FP8=1
// nvcc-spills-allowed: sm_80 -DT=half -DSLIDING=1 (28 bytes: the window bound is the 171st register at D=128; none on sm_90a)
// nvcc-spills-allowed: sm_89 -DT=half -DSLIDING=1 (the same)
#include "mma.cuh"

#ifndef T
#define T half
#endif
#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef NUM_WARPS
#define NUM_WARPS 4
#endif
#ifndef STAGES
#define STAGES 2
#endif
#ifndef KV_FP8
#define KV_FP8 0
#endif
#define MIN_CTAS (NUM_WARPS >= 12 ? 1 : 12 / NUM_WARPS)  // 12 warps per SM: <= 170 registers
#ifndef SLIDING
#define SLIDING 0                            // 1: sliding-window attention (the `window` argument)
#endif
#define MAX_SPLITS 256                       // the launcher never asks for more
#define COMBINE_THREADS 128

#define PAGE 16                              // tokens per cache block (fixed by the engine)
#define CHUNKS (HEAD_DIM / 8)                // 16-byte chunks per token row
#define PAGE_BYTES (PAGE * HEAD_DIM * 2)     // one page of K (or V) as T
#if KV_FP8
typedef unsigned char kv_t;
#define RAW_BYTES (PAGE * HEAD_DIM)          // one page as it is cached: a code a byte
#define WARP_SMEM (STAGES * 2 * RAW_BYTES + 2 * PAGE_BYTES)  // ring of codes, then the decoded K and V tile
#else
typedef T kv_t;
#define RAW_BYTES PAGE_BYTES
#define WARP_SMEM (STAGES * 2 * PAGE_BYTES)
#endif
#define KSTEPS (HEAD_DIM / 16)               // mma k-steps over head_dim
#define DTILES (HEAD_DIM / 8)                // mma n-tiles over head_dim
#define O_STRIDE (HEAD_DIM + 8)              // fp32 row stride of the merge buffer (bank spread)

static_assert(HEAD_DIM % 16 == 0, "HEAD_DIM must be a multiple of 16");

// Byte offset of 16-byte chunk `chunk` of token row `row` inside a swizzled tile (mma.cuh).
__device__ __forceinline__ unsigned swz(int row, int chunk) { return (unsigned)tile_offset<CHUNKS>(row, chunk); }

// How sequence of length seq_len is split: returns the number of non-empty splits, sets *chunk
// (tokens per split, a multiple of PAGE). The combine kernel calls this too: same answer.
// Sliding window (window > 0): the query at position seq_len - 1 sees positions seq_len - window .. seq_len - 1.
// The span split starts at the page holding the first of them (earlier pages may have been freed: their table
// entries are never read); keys before it in that page are masked.
__device__ __forceinline__ int window_begin(int seq_len, int window) {
    return window > 0 ? max(0, seq_len - window) : 0;
}

__device__ __forceinline__ int split_plan(int seq_len, int max_splits, int min_chunk, int* chunk) {
    if (seq_len <= 0) { *chunk = 0; return 0; }
    int n = min(max_splits, (seq_len + min_chunk - 1) / min_chunk);
    int c = (seq_len + n - 1) / n;
    c = (c + PAGE - 1) / PAGE * PAGE;
    *chunk = c;
    return (seq_len + c - 1) / c;
}

// Issue the cp.async copies of one K page and one V page (16 tokens x D) into a warp's stage: swizzled
// T tiles, or (KV_FP8) the codes as they lie, rows of HEAD_DIM bytes. Tokens >= valid are zeros.
__device__ __forceinline__ void load_page(unsigned s_k, const kv_t* k_page, const kv_t* v_page, int valid, int lane) {
#if KV_FP8
#pragma unroll
    for (int i = lane; i < PAGE * HEAD_DIM / 16; i += 32) {
        const int bytes = i / (HEAD_DIM / 16) < valid ? 16 : 0;
        cp_async16(s_k + i * 16, k_page + i * 16, bytes);
        cp_async16(s_k + RAW_BYTES + i * 16, v_page + i * 16, bytes);
    }
#else
#pragma unroll
    for (int i = lane; i < PAGE * CHUNKS; i += 32) {
        const int row = i / CHUNKS, off = swz(row, i % CHUNKS);
        const int bytes = row < valid ? 16 : 0;
        cp_async16(s_k + off, k_page + i * 8, bytes);
        cp_async16(s_k + PAGE_BYTES + off, v_page + i * 8, bytes);
    }
#endif
}

extern "C" __global__ void __launch_bounds__(NUM_WARPS * 32, MIN_CTAS)
paged_attention_decode(const T* __restrict__ qkv, int q_stride,
                       const kv_t* __restrict__ k_cache, const kv_t* __restrict__ v_cache,
                       const float* __restrict__ k_scale, const float* __restrict__ v_scale,  // KV_FP8 only
                       const int* __restrict__ block_tables, int max_blocks,
                       const int* __restrict__ seq_lens, const int* __restrict__ query_start_loc,
                       T* __restrict__ out, int out_stride,
                       float* __restrict__ partial_o,   // [B, Hq, max_splits, D]
                       float* __restrict__ partial_ml,  // [B, Hq, max_splits, 2] (max, sum), log2 units
                       int num_kv_heads, int group, int max_splits, int min_chunk, float scale_log2, int window) {
    extern __shared__ __align__(128) unsigned char smem[];
    const int split = blockIdx.x, b = blockIdx.z;
    const int slices = (group + 15) >> 4;
    const int kvh = blockIdx.y / slices, g0 = (blockIdx.y % slices) * 16;
    const int nrows = min(16, group - g0);      // query heads handled by this CTA
    const int head0 = kvh * group + g0;
    const int num_heads = num_kv_heads * group;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;      // mma fragment coordinates

    const int q_row = query_start_loc[b];
    if (query_start_loc[b + 1] == q_row) return;
    T* out_row = out + (size_t)q_row * out_stride + (size_t)head0 * HEAD_DIM;
    const int seq_len = seq_lens[b];
#if SLIDING
    const int win_begin = window_begin(seq_len, window);
#else
    const int win_begin = 0;  // only the SLIDING variant reads `window` (the others keep their registers: 168 of 170)
#endif
    const int span_begin = win_begin / PAGE * PAGE;
    int chunk;
    const int nsplit = split_plan(seq_len - span_begin, max_splits, min_chunk, &chunk);
    if (nsplit == 0) {  // padding row: defined zeros
        if (split == 0)
            for (int i = tid; i < nrows * HEAD_DIM; i += NUM_WARPS * 32) out_row[i] = T(0.0f);
        return;
    }
    if (split >= nsplit) return;  // grid sized for a longer context than this sequence has
    const int tok_begin = span_begin + split * chunk, tok_end = min(seq_len, tok_begin + chunk);
    const int first_page = tok_begin / PAGE, num_pages = (tok_end - tok_begin + PAGE - 1) / PAGE;
#if SLIDING
    // Keys tok_begin .. tok_begin + head - 1 are before the window (split 0's first page only). One register
    // carries both bounds through the page loop: tok_end << 4 | head.
    const int bounds = tok_end << 4 | (split == 0 ? win_begin - span_begin : 0);
#define TOK_END (bounds >> 4)
#define KEY_LIVE(tok) ((tok) < TOK_END && (tok) - first_page * PAGE >= (bounds & 15))
#else
#define TOK_END tok_end
#define KEY_LIVE(tok) ((tok) < tok_end)
#endif
#if KV_FP8
    const float qk_scale = scale_log2 * k_scale[kvh], out_scale = v_scale[kvh];
#else
    const float qk_scale = scale_log2, out_scale = 1.0f;
#endif

    // Q as mma A fragments: rows g and g+8 are query heads head0+g, head0+g+8 (zero if absent).
    unsigned qa[KSTEPS][4];
    const T* q = qkv + (size_t)q_row * q_stride + (size_t)head0 * HEAD_DIM;
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
        const int d = kk * 16 + 2 * t;
        qa[kk][0] = g < nrows ? *reinterpret_cast<const unsigned*>(q + g * HEAD_DIM + d) : 0u;
        qa[kk][1] = g + 8 < nrows ? *reinterpret_cast<const unsigned*>(q + (g + 8) * HEAD_DIM + d) : 0u;
        qa[kk][2] = g < nrows ? *reinterpret_cast<const unsigned*>(q + g * HEAD_DIM + d + 8) : 0u;
        qa[kk][3] = g + 8 < nrows ? *reinterpret_cast<const unsigned*>(q + (g + 8) * HEAD_DIM + d + 8) : 0u;
    }

    float o[DTILES][4];
#pragma unroll
    for (int n = 0; n < DTILES; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;  // rows g, g+8 (l: this lane's part)

    // This warp takes pages warp, warp + NUM_WARPS, ... of the split, through its own ring.
    const unsigned ring = smem_addr(smem) + warp * WARP_SMEM;
    const int my_pages = num_pages > warp ? (num_pages - warp + NUM_WARPS - 1) / NUM_WARPS : 0;
    const int* table = block_tables + (size_t)b * max_blocks;
    auto issue = [&](int i) {
        if (i < my_pages) {
            const int page = first_page + warp + i * NUM_WARPS;
            const size_t base = ((size_t)table[page] * num_kv_heads + kvh) * PAGE * HEAD_DIM;
            load_page(ring + (i % STAGES) * 2 * RAW_BYTES, k_cache + base, v_cache + base,
                      TOK_END - page * PAGE, lane);
        }
        cp_async_commit();  // empty groups keep the wait_group count uniform
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) issue(s);

    // ldmatrix lane roles: which 8x8 matrix (mi) and which row of it (ri) this lane addresses.
    const int mi = lane >> 3, ri = lane & 7;
    for (int i = 0; i < my_pages; ++i) {
        issue(i + STAGES - 1);
        cp_async_wait<STAGES - 1>();
        __syncwarp();
#if KV_FP8
        {  // decode the stage's codes into the warp's T tile (the __syncwarp closing the last page freed it)
            unsigned char* raw = smem + warp * WARP_SMEM + (i % STAGES) * 2 * RAW_BYTES;
            unsigned char* tile = smem + warp * WARP_SMEM + STAGES * 2 * RAW_BYTES;
            e4m3_tile<T, HEAD_DIM>(tile, raw, PAGE * HEAD_DIM / 16, lane, 32);
            e4m3_tile<T, HEAD_DIM>(tile + PAGE_BYTES, raw + RAW_BYTES, PAGE * HEAD_DIM / 16, lane, 32);
            __syncwarp();
        }
        const unsigned s_k = ring + STAGES * 2 * RAW_BYTES, s_v = s_k + PAGE_BYTES;
#else
        const unsigned s_k = ring + (i % STAGES) * 2 * PAGE_BYTES, s_v = s_k + PAGE_BYTES;
#endif
        const int page_tok = (first_page + warp + i * NUM_WARPS) * PAGE;

        // S = Q K^T for the page's 16 tokens: n-tiles of tokens 0-7 and 8-15.
        float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            unsigned kb[4];
            ldmatrix_x4(kb, s_k + swz((mi >> 1) * 8 + ri, 2 * kk + (mi & 1)));
            Mma<T>::run(s[0], qa[kk], kb[0], kb[1]);
            Mma<T>::run(s[1], qa[kk], kb[2], kb[3]);
        }
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int tok = page_tok + j * 8 + 2 * t + (e & 1);
                s[j][e] = KEY_LIVE(tok) ? s[j][e] * qk_scale : NEG_INF;
            }
        float mx0 = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
        float mx1 = fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        // Every page holds at least one live token, so the new maxima are finite.
        const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        const float a0 = fast_exp2(m0 - n0), a1 = fast_exp2(m1 - n1);
        m0 = n0; m1 = n1;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            s[j][0] = fast_exp2(s[j][0] - n0); s[j][1] = fast_exp2(s[j][1] - n0);
            s[j][2] = fast_exp2(s[j][2] - n1); s[j][3] = fast_exp2(s[j][3] - n1);
        }
        l0 = l0 * a0 + s[0][0] + s[0][1] + s[1][0] + s[1][1];
        l1 = l1 * a1 + s[0][2] + s[0][3] + s[1][2] + s[1][3];
        // P (16 heads x 16 tokens) as an A fragment straight from the S accumulators.
        unsigned pa[4] = {Mma<T>::pack(s[0][0], s[0][1]), Mma<T>::pack(s[0][2], s[0][3]),
                          Mma<T>::pack(s[1][0], s[1][1]), Mma<T>::pack(s[1][2], s[1][3])};
#pragma unroll
        for (int nn = 0; nn < DTILES / 2; ++nn) {
            unsigned vb[4];
            ldmatrix_x4_trans(vb, s_v + swz((mi & 1) * 8 + ri, 2 * nn + (mi >> 1)));
            o[2 * nn][0] *= a0; o[2 * nn][1] *= a0; o[2 * nn][2] *= a1; o[2 * nn][3] *= a1;
            o[2 * nn + 1][0] *= a0; o[2 * nn + 1][1] *= a0; o[2 * nn + 1][2] *= a1; o[2 * nn + 1][3] *= a1;
            Mma<T>::run(o[2 * nn], pa, vb[0], vb[1]);
            Mma<T>::run(o[2 * nn + 1], pa, vb[2], vb[3]);
        }
        __syncwarp();  // all lanes done reading this stage before it is refilled
    }
#undef TOK_END
#undef KEY_LIVE
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);

    // Merge the warps' (max, sum, O) through shared memory, reusing the rings.
    cp_async_wait<0>();
    __syncthreads();
    float* sm_ml = reinterpret_cast<float*>(smem);       // [NUM_WARPS][16][2]
    float* sm_stat = sm_ml + NUM_WARPS * 32;              // [16][2]: merged (max, sum)
    float* sm_o = sm_stat + 32;                           // [NUM_WARPS][16][O_STRIDE]
    if (t == 0) {
        sm_ml[(warp * 16 + g) * 2] = m0;     sm_ml[(warp * 16 + g) * 2 + 1] = l0;
        sm_ml[(warp * 16 + g + 8) * 2] = m1; sm_ml[(warp * 16 + g + 8) * 2 + 1] = l1;
    }
    __syncthreads();
    float M0 = NEG_INF, M1 = NEG_INF;  // warp 0 always had a page: finite
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) {
        M0 = fmaxf(M0, sm_ml[(w * 16 + g) * 2]);
        M1 = fmaxf(M1, sm_ml[(w * 16 + g + 8) * 2]);
    }
    const float f0 = fast_exp2(m0 - M0), f1 = fast_exp2(m1 - M1);
    float* my_o = sm_o + warp * 16 * O_STRIDE;
#pragma unroll
    for (int n = 0; n < DTILES; ++n) {
        *reinterpret_cast<float2*>(my_o + g * O_STRIDE + n * 8 + 2 * t) = make_float2(o[n][0] * f0, o[n][1] * f0);
        *reinterpret_cast<float2*>(my_o + (g + 8) * O_STRIDE + n * 8 + 2 * t) = make_float2(o[n][2] * f1, o[n][3] * f1);
    }
    if (tid < 16) {
        float M = NEG_INF, L = 0.0f;
        for (int w = 0; w < NUM_WARPS; ++w) M = fmaxf(M, sm_ml[(w * 16 + tid) * 2]);
        for (int w = 0; w < NUM_WARPS; ++w) L += sm_ml[(w * 16 + tid) * 2 + 1] * fast_exp2(sm_ml[(w * 16 + tid) * 2] - M);
        sm_stat[tid * 2] = M;
        sm_stat[tid * 2 + 1] = L;
    }
    __syncthreads();
    const size_t part = ((size_t)b * num_heads + head0) * max_splits + split;  // + row * max_splits
    for (int i = tid; i < nrows * HEAD_DIM; i += NUM_WARPS * 32) {
        const int row = i / HEAD_DIM, d = i % HEAD_DIM;
        float acc = 0.0f;
#pragma unroll
        for (int w = 0; w < NUM_WARPS; ++w) acc += sm_o[(w * 16 + row) * O_STRIDE + d];
        acc *= out_scale;
        if (nsplit == 1) {
            out_row[i] = T(acc / sm_stat[row * 2 + 1]);
        } else {
            const size_t p = part + (size_t)row * max_splits;
            partial_o[p * HEAD_DIM + d] = acc;
            if (d == 0) { partial_ml[p * 2] = sm_stat[row * 2]; partial_ml[p * 2 + 1] = sm_stat[row * 2 + 1]; }
        }
    }
}

// Merge the splits of each (sequence, query head): out = sum_s 2^(m_s - M) O_s / sum_s 2^(m_s - M) l_s.
// grid (Hq, B), block COMBINE_THREADS. Sequences with one split were finished by the decode kernel.
// The split weights are computed once into shared memory so that the O reads are all independent.
extern "C" __global__ void __launch_bounds__(COMBINE_THREADS)
paged_attention_combine(const float* __restrict__ partial_o, const float* __restrict__ partial_ml,
                        const int* __restrict__ seq_lens, const int* __restrict__ query_start_loc,
                        T* __restrict__ out, int out_stride, int max_splits, int min_chunk, int window) {
    __shared__ float weight[MAX_SPLITS];
    const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x, num_heads = gridDim.x;
    const int q_row = query_start_loc[b];
    if (query_start_loc[b + 1] == q_row) return;
    int chunk;
    const int seq_len = seq_lens[b];
    const int nsplit = split_plan(seq_len - window_begin(seq_len, window) / PAGE * PAGE, max_splits, min_chunk, &chunk);
    if (nsplit <= 1) return;
    const size_t base = ((size_t)b * num_heads + h) * max_splits;
    const float* ml = partial_ml + base * 2;
    if (tid < 32) {
        float M = NEG_INF, L = 0.0f;
        for (int s = tid; s < nsplit; s += 32) M = fmaxf(M, ml[2 * s]);
#pragma unroll
        for (int k = 16; k > 0; k >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, k));
        for (int s = tid; s < nsplit; s += 32) {
            const float w = fast_exp2(ml[2 * s] - M);
            weight[s] = w;
            L += w * ml[2 * s + 1];
        }
#pragma unroll
        for (int k = 16; k > 0; k >>= 1) L += __shfl_xor_sync(0xffffffffu, L, k);
        const float inv = 1.0f / L;
        for (int s = tid; s < nsplit; s += 32) weight[s] *= inv;
    }
    __syncthreads();
    const float* o = partial_o + base * HEAD_DIM;
    for (int d = tid; d < HEAD_DIM; d += COMBINE_THREADS) {
        float acc = 0.0f;
#pragma unroll 4
        for (int s = 0; s < nsplit; ++s) acc += weight[s] * o[(size_t)s * HEAD_DIM + d];
        out[(size_t)q_row * out_stride + (size_t)h * HEAD_DIM + d] = T(acc);
    }
}
