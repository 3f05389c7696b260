// Rotary embedding of q and k, in place in the fused qkv activation, plus the write of the rotated
// k and of v into the paged KV cache; optional per-head RMSNorm of q and k first (Qwen3). One launch.
//   qkv [T, (Hq + 2*Hkv) * D]: per token Hq q heads, Hkv k heads, Hkv v heads, each D contiguous.
//   positions, slot_mapping [T] int32; slot = block * BLOCK_SIZE + offset, -1 = padding (not cached).
//   k_cache, v_cache [num_blocks, Hkv, BLOCK_SIZE, D]; cos_sin [max_pos, D] float32 (cos | sin).
//   q_norm, k_norm [D] in DTYPE (read only when QK_NORM).
// neox layout: element j < D/2 pairs with j + D/2; with c, s = cos_sin[pos, j], cos_sin[pos, D/2 + j]:
//   out[j] = x[j] * c - x[j + D/2] * s,   out[j + D/2] = x[j + D/2] * c + x[j] * s.
// Work split: a group of TPH = D/8 lanes per (token, head), each lane owning 4 pairs (8-byte loads of
// both halves, one float4 each of cos and sin). Groups never straddle a warp, so the norm's sum is a
// shuffle inside the group; a block holds whole groups, so a group is all in range or all out.
// Defines: DTYPE (half | __nv_bfloat16), HEAD_DIM (32, 64, 128, 256), BLOCK_SIZE, QK_NORM (0 | 1).
// nvcc-variants: -DDTYPE=half -DHEAD_DIM=128; -DDTYPE=__nv_bfloat16 -DHEAD_DIM=128 -DQK_NORM=1; -DDTYPE=half -DHEAD_DIM=64 -DQK_NORM=1; -DDTYPE=__nv_bfloat16 -DHEAD_DIM=32 -DQK_NORM=1; -DDTYPE=half -DHEAD_DIM=256 -DQK_NORM=1
#include "vec.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef BLOCK_SIZE
#define BLOCK_SIZE 16
#endif
#ifndef QK_NORM
#define QK_NORM 0
#endif

constexpr int HALF = HEAD_DIM / 2;
constexpr int PAIRS = 4;              // rotation pairs per lane
constexpr int TPH = HALF / PAIRS;     // lanes per head
static_assert(TPH >= 1 && TPH <= 32 && (TPH & (TPH - 1)) == 0, "HEAD_DIM must be 8 * a power of two, at most 256");

// 4 consecutive DTYPE elements (8 bytes) <-> 4 floats
__device__ __forceinline__ void unpack4(const uint2 &v, float (&f)[4]) {
    const pair_t *p = reinterpret_cast<const pair_t *>(&v);
    const float2 a = to_float2(p[0]), b = to_float2(p[1]);
    f[0] = a.x; f[1] = a.y; f[2] = b.x; f[3] = b.y;
}
__device__ __forceinline__ uint2 pack4(const float (&f)[4]) {
    uint2 v;
    pair_t *p = reinterpret_cast<pair_t *>(&v);
    from_float2(make_float2(f[0], f[1]), p[0]);
    from_float2(make_float2(f[2], f[3]), p[1]);
    return v;
}

// Sum over the TPH lanes of this group; `mask` names exactly those lanes (other groups of the warp
// may be on another branch or gone).
__device__ __forceinline__ float group_sum(float v, unsigned mask) {
#pragma unroll
    for (int offset = TPH / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(mask, v, offset, TPH);
    return v;
}

extern "C" __global__ void rope_and_cache_kernel(
        scalar_t *__restrict__ qkv, const int *__restrict__ positions, const int *__restrict__ slot_mapping,
        scalar_t *__restrict__ k_cache, scalar_t *__restrict__ v_cache, const float *__restrict__ cos_sin,
        const scalar_t *__restrict__ q_norm, const scalar_t *__restrict__ k_norm, float eps,
        int num_tokens, int num_q_heads, int num_kv_heads) {
    const int heads = num_q_heads + 2 * num_kv_heads;
    const unsigned gid = blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned item = gid / TPH;  // (token, head) pair, the row of qkv viewed as [T * heads, D]
    if (item >= (unsigned)num_tokens * (unsigned)heads) return;
    const int token = item / heads;
    const int head = item - token * heads;
    const int j = (gid % TPH) * PAIRS;  // this lane's elements: j..j+3 and HALF+j..HALF+j+3

    scalar_t *row = qkv + (u64)item * HEAD_DIM;
    uint2 lo = *reinterpret_cast<const uint2 *>(row + j);
    uint2 hi = *reinterpret_cast<const uint2 *>(row + HALF + j);
    const int slot = slot_mapping[token];
    const bool is_q = head < num_q_heads;
    const int kv_head = head - num_q_heads - (head >= num_q_heads + num_kv_heads ? num_kv_heads : 0);
    const u64 cache_row = slot < 0 ? 0 :
        (((u64)(slot / BLOCK_SIZE) * num_kv_heads + kv_head) * BLOCK_SIZE + slot % BLOCK_SIZE) * HEAD_DIM;

    if (head >= num_q_heads + num_kv_heads) {  // v: copied to the cache unchanged
        if (slot >= 0) {
            *reinterpret_cast<uint2 *>(v_cache + cache_row + j) = lo;
            *reinterpret_cast<uint2 *>(v_cache + cache_row + HALF + j) = hi;
        }
        return;
    }

    const int pos = positions[token];
    const float4 c = *reinterpret_cast<const float4 *>(cos_sin + (u64)pos * HEAD_DIM + j);
    const float4 s = *reinterpret_cast<const float4 *>(cos_sin + (u64)pos * HEAD_DIM + HALF + j);
    float x1[4], x2[4];
    unpack4(lo, x1);
    unpack4(hi, x2);

#if QK_NORM
    {
        const scalar_t *w = is_q ? q_norm : k_norm;
        float w1[4], w2[4];
        unpack4(*reinterpret_cast<const uint2 *>(w + j), w1);
        unpack4(*reinterpret_cast<const uint2 *>(w + HALF + j), w2);
        float ss = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) ss += x1[i] * x1[i] + x2[i] * x2[i];
        const unsigned lane = threadIdx.x & 31;
        const unsigned mask = TPH == 32 ? 0xffffffffu : ((1u << TPH) - 1u) << (lane & ~(unsigned)(TPH - 1));
        const float inv_rms = rsqrtf(group_sum(ss, mask) / (float)HEAD_DIM + eps);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            x1[i] = x1[i] * inv_rms * w1[i];
            x2[i] = x2[i] * inv_rms * w2[i];
        }
    }
#endif

    const float cv[4] = {c.x, c.y, c.z, c.w}, sv[4] = {s.x, s.y, s.z, s.w};
    float o1[4], o2[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        o1[i] = x1[i] * cv[i] - x2[i] * sv[i];
        o2[i] = x2[i] * cv[i] + x1[i] * sv[i];
    }
    lo = pack4(o1);
    hi = pack4(o2);
    *reinterpret_cast<uint2 *>(row + j) = lo;
    *reinterpret_cast<uint2 *>(row + HALF + j) = hi;
    if (!is_q && slot >= 0) {
        *reinterpret_cast<uint2 *>(k_cache + cache_row + j) = lo;
        *reinterpret_cast<uint2 *>(k_cache + cache_row + HALF + j) = hi;
    }
}
