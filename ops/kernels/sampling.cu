// Token sampling, one CTA of NT threads per row of logits [B, V], with no host synchronisation anywhere:
// logit bias, repetition/frequency/presence penalties, greedy argmax (lowest id on ties), temperature,
// top-k, top-p, min-p, the seeded exponential race, and the sampled token's logprob plus the top-N of the
// raw (unprocessed) distribution. Held to ops/sampling.py (the numpy oracle), whose float32 steps it repeats
// with explicitly rounded intrinsics (no FMA contraction), and to its Philox4x64-10 stream (ops/philox.py).
//
// Parameters (ops/cuda/sampling.py writes them): one device byte buffer holding a Header, RowParams[max_batch],
// then int32 tables at header.table_offset: prompt ids [B, Lp], output ids [B, Lo], bias ids [B, Nb],
// bias values (float) [B, Nb]; -1 pads. Rows >= header.batch are graph padding and write zeros.
//
// Bias and penalties change few tokens, so the logits are never copied: a row's changed ("touched") tokens
// are marked in a shared bitmap and their processed values kept in scratch[row, id] (uint32 [B, V]), which is
// all zeros between calls: it first counts output occurrences, then holds float bits, then is zeroed again.
//
// The kept set is {s >= tau} with s = (x - max) / T, so tied tokens are kept or dropped together (as numpy).
// tau comes from a sorted candidate list in shared memory when a lower bound on it (from each thread's two
// largest logits in the first pass; for top-p rows failing that, from fixed mass floors of the second) leaves
// at most CAND_CAP candidates; otherwise from a 3-level radix select over the row. The race then draws
// Philox words only for kept tokens. Instruction-bound on one SM per row: ~11 us greedy, ~70-110 us sampled
// (H200, V = 152064); splitting a row over several CTAs is what would speed up small batches.
// nvcc-variants: -DLOGIT_T=float -DID_BITS=64; -DLOGIT_T=half -DID_BITS=32; -DLOGIT_T=__nv_bfloat16 -DID_BITS=64
#ifndef CUPYLLM_HOST_EMU  // the CPU emulator (tests/host_mma.py) brings its own fp16/bf16 types
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

#ifndef LOGIT_T
#define LOGIT_T float  // float, half or __nv_bfloat16
#endif
#ifndef ID_BITS
#define ID_BITS 64  // the token id output: 32 (int32) or 64 (int64)
#endif
#if ID_BITS == 64
typedef long long token_id_t;
#else
typedef int token_id_t;
#endif

#define NT 1024  // threads per row; each thread's two largest logits bound top-k (k <= 2 NT) and top-p
#define NWARPS (NT / 32)
#define CAND_CAP 4096  // sampling candidates kept in shared memory
#define RAW_CAP 1024  // top-N candidates of the raw distribution
// 8-token blocks each thread of a greedy first pass loads before using them (bytes in flight per SM); 4 would
// spill before Hopper under the 64-register cap of 1024 threads
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define UNROLL 4
#else
#define UNROLL 2
#endif
#define HEADER_BYTES 64
#define FULL 0xffffffffu
#define NOT_FOUND 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)
#define POS_INF __int_as_float(0x7f800000)
#define INT_BIG 0x7fffffff
#define N_FLOORS 8  // top-p floors tried when the thread maxima give no bound: s >= -2 (i + 1), i < N_FLOORS
#define F_EXCEPTIONS 1  // the row has bias entries or penalised history
#define F_COUNTED 2  // frequency or presence penalty: count output occurrences

struct Header { int batch, prompt_len, output_len, bias_len, table_offset, pad[11]; };
struct RowParams {
  float temperature, top_p, log_min_p, repetition, frequency, presence;  // log_min_p = -inf: min-p off
  int top_k, flags;  // top_k 0 = off (already < V)
  unsigned long long seed, step;
};

struct Row {
  const LOGIT_T* logits;  // this row's V raw logits
  int V, nblk;  // nblk = ceil(V / 8) blocks of 8 tokens
  bool vec, exceptions;  // vec: 8-token blocks are aligned vectors; exceptions: TOUCHED marks tokens in proc
  const unsigned* proc;  // scratch row: float bits of the processed values of touched tokens
};

// Dynamic shared memory at constant offsets (so no pointer to it lives in a register); the two bitmaps of
// ceil(V / 32) words come last. The radix bins alias the candidates: they are used only when those overflowed.
extern __shared__ __align__(16) unsigned char smem[];
#define SMEM_CAND_S 0  // float [CAND_CAP] sampling candidates: s
#define SMEM_CAND_ID (SMEM_CAND_S + 4 * CAND_CAP)  // int [CAND_CAP] and their ids
#define SMEM_RM (SMEM_CAND_ID + 4 * CAND_CAP)  // float [NT] per-thread maxima of the raw logits
#define SMEM_RM_ID (SMEM_RM + 4 * NT)
#define SMEM_RAW_V (SMEM_RM_ID + 4 * NT)  // float [RAW_CAP] top-N candidates of the raw logits
#define SMEM_RAW_ID (SMEM_RAW_V + 4 * RAW_CAP)
#define SMEM_FLOORS (SMEM_RAW_ID + 4 * RAW_CAP)  // float [N_FLOORS + 1][NT] each thread's mass per floor band
#define SMEM_BITMAPS (SMEM_FLOORS + 4 * (N_FLOORS + 1) * NT)  // uint [words] touched, then uint [words] seen
#define SMEM_AT(type, offset) reinterpret_cast<type*>(smem + (offset))
#define CAND_S SMEM_AT(float, SMEM_CAND_S)
#define CAND_ID SMEM_AT(int, SMEM_CAND_ID)
#define HIST_MASS SMEM_AT(unsigned long long, SMEM_CAND_S)  // [2048]: 16 KB
#define HIST_COUNT SMEM_AT(unsigned, SMEM_CAND_S + 8 * 2048)  // [2048]: 8 KB, inside the candidates' 32 KB
#define FIXED 16777216.f  // radix bins sum token weights (<= 1) in units of 2^-24: 32 of them fit 32 bits
#define RM SMEM_AT(float, SMEM_RM)
#define RM_ID SMEM_AT(int, SMEM_RM_ID)
#define RAW_V SMEM_AT(float, SMEM_RAW_V)
#define RAW_ID SMEM_AT(int, SMEM_RAW_ID)
#define FLOOR_MASS SMEM_AT(float, SMEM_FLOORS)
#define TOUCHED SMEM_AT(unsigned, SMEM_BITMAPS)

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void load_vec8(const float* p, float (&v)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p)), c = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = c.x; v[5] = c.y; v[6] = c.z; v[7] = c.w;
}
__device__ __forceinline__ void load_vec8(const __half* p, float (&v)[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = __half2float(__ushort_as_half((unsigned short)(w[i] & 0xffffu)));
    v[2 * i + 1] = __half2float(__ushort_as_half((unsigned short)(w[i] >> 16)));
  }
}
__device__ __forceinline__ void load_vec8(const __nv_bfloat16* p, float (&v)[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = __uint_as_float(w[i] << 16);
    v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

// raw logits of block b (-inf past V), then the processed values (bias and penalties) where touched
__device__ __forceinline__ void load_block(const Row& r, int b, float (&raw)[8]) {
  const LOGIT_T* p = r.logits + (size_t)b * 8;
  if (b < r.nblk && r.vec) { load_vec8(p, raw); return; }
#pragma unroll
  for (int e = 0; e < 8; ++e) raw[e] = b * 8 + e < r.V ? to_float(p[e]) : NEG_INF;
}
__device__ __forceinline__ void processed(const Row& r, int b, const float (&raw)[8], float (&x)[8]) {
#pragma unroll
  for (int e = 0; e < 8; ++e) x[e] = raw[e];
  if (r.exceptions && b < r.nblk) {
    const unsigned bits = (TOUCHED[b >> 2] >> ((b & 3) * 8)) & 0xffu;
    if (bits) {
#pragma unroll
      for (int e = 0; e < 8; ++e) if ((bits >> e) & 1u) x[e] = __uint_as_float(r.proc[b * 8 + e]);
    }
  }
}

// f(b, raw, x) for this thread's blocks b = tid, tid + NT, ... (increasing ids); the loop bounds are uniform
// over the CTA, so f may use warp votes. Each thread's blocks are its own group of distinct tokens.
template <int U = 1, class F>
__device__ __forceinline__ void for_each_block(const Row& r, F&& f) {
  for (int b0 = 0; b0 < r.nblk; b0 += U * NT) {
    float raw[U][8];
#pragma unroll
    for (int u = 0; u < U; ++u) load_block(r, b0 + u * NT + threadIdx.x, raw[u]);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float x[8];
      processed(r, b0 + u * NT + threadIdx.x, raw[u], x);
      f(b0 + u * NT + threadIdx.x, raw[u], x);
    }
  }
}

// ---- block-wide helpers: every thread gets the same result; each starts with a barrier so that the
// shared scratch of the previous call has been read by everyone
__shared__ double red_d[NWARPS];
__shared__ float red_f[NWARPS];
__shared__ int red_i[NWARPS];

template <bool MIN>
__device__ __forceinline__ bool better(float a, int ia, float b, int ib) {
  return (MIN ? a < b : a > b) || (a == b && ia < ib);
}
template <bool MIN>
__device__ void block_best(float& v, int& id) {  // (value, lowest id) max or min over the CTA
  __syncthreads();
  for (int o = 16; o; o >>= 1) {
    const float ov = __shfl_xor_sync(FULL, v, o);
    const int oi = __shfl_xor_sync(FULL, id, o);
    if (better<MIN>(ov, oi, v, id)) { v = ov; id = oi; }
  }
  if ((threadIdx.x & 31) == 0) { red_f[threadIdx.x >> 5] = v; red_i[threadIdx.x >> 5] = id; }
  __syncthreads();
  v = red_f[0]; id = red_i[0];
  for (int w = 1; w < NWARPS; ++w) if (better<MIN>(red_f[w], red_i[w], v, id)) { v = red_f[w]; id = red_i[w]; }
}
__device__ double block_sum(double v) {  // summed in one fixed order: identical in every thread and run
  __syncthreads();
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
  if ((threadIdx.x & 31) == 0) red_d[threadIdx.x >> 5] = v;
  __syncthreads();
  double t = 0;
  for (int w = 0; w < NWARPS; ++w) t += red_d[w];
  return t;
}
__device__ double block_exclusive_scan(double v) {
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double inc = v;
  for (int o = 1; o < 32; o <<= 1) { const double n = __shfl_up_sync(FULL, inc, o); if (lane >= o) inc += n; }
  double exc = __shfl_up_sync(FULL, inc, 1);
  if (lane == 31) red_d[warp] = inc;
  __syncthreads();
  double before = 0;
  for (int w = 0; w < warp; ++w) before += red_d[w];
  return lane ? before + exc : before;
}

// First i < n whose inclusive running sum of value(i) reaches target (each thread walks a contiguous chunk),
// with the sum before it in `before`; -1 when the total stays below target.
template <class F>
__device__ int find_first(int n, double target, F&& value, double& before) {
  __shared__ int s_idx;
  __shared__ double s_before;
  const int chunk = (n + NT - 1) / NT, lo = min((int)threadIdx.x * chunk, n), hi = min(lo + chunk, n);
  double local = 0;
  for (int i = lo; i < hi; ++i) local += value(i);
  double cum = block_exclusive_scan(local);
  int idx = INT_BIG;
  for (int i = lo; i < hi; ++i) {
    const double v = value(i);
    if (cum + v >= target) { idx = i; break; }
    cum += v;
  }
  if (threadIdx.x == 0) s_idx = INT_BIG;
  __syncthreads();
  if (idx != INT_BIG) atomicMin(&s_idx, idx);
  __syncthreads();
  const int found = s_idx;
  if (idx == found && idx != INT_BIG) s_before = cum;
  __syncthreads();
  before = s_before;
  return found == INT_BIG ? -1 : found;
}

// Bitonic sort of n (a power of two) pairs, best first: larger key, then smaller id.
__device__ void sort_desc(float* key, int* id, int n) {
  for (int k = 2; k <= n; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      __syncthreads();
      for (int i = threadIdx.x; i < n; i += NT) {
        const int l = i ^ j;
        if (l > i) {
          const float ki = key[i], kl = key[l];
          const int ii = id[i], il = id[l];
          if (better<false>(kl, il, ki, ii) == ((i & k) == 0)) { key[i] = kl; key[l] = ki; id[i] = il; id[l] = ii; }
        }
      }
    }
  }
  __syncthreads();
}
__device__ void pad_and_sort(float* key, int* id, int count) {
  int n = 1;
  while (n < count) n <<= 1;
  for (int i = count + threadIdx.x; i < n; i += NT) { key[i] = NEG_INF; id[i] = INT_BIG; }
  sort_desc(key, id, n);
}

// Warp-aggregated append of (key, id) where pred: one shared atomic per warp; *count may pass cap (overflow).
__device__ __forceinline__ void append(bool pred, int* count, int cap, float* keys, int* ids, float key, int id) {
  const unsigned ballot = __ballot_sync(FULL, pred);
  if (!ballot) return;
  const int lane = threadIdx.x & 31, leader = __ffs(ballot) - 1;
  int base = 0;
  if (lane == leader) base = atomicAdd(count, __popc(ballot));
  base = __shfl_sync(FULL, base, leader);
  const int pos = base + __popc(ballot & ((1u << lane) - 1u));
  if (pred && pos < cap) { keys[pos] = key; ids[pos] = id; }
}

// ---- Philox4x64-10, counter (j / 8 + 1, step, 0, 0), key (seed, 0): the stream of ops/philox.py
__device__ __forceinline__ void philox(unsigned long long seed, unsigned long long step, unsigned long long block,
                                       unsigned long long (&o)[4]) {
  unsigned long long c0 = block + 1, c1 = step, c2 = 0, c3 = 0, k0 = seed, k1 = 0;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const unsigned long long hi0 = __umul64hi(0xD2E7470EE14C6C93ull, c0), lo0 = 0xD2E7470EE14C6C93ull * c0;
    const unsigned long long hi1 = __umul64hi(0xCA5A826395121157ull, c2), lo1 = 0xCA5A826395121157ull * c2;
    c0 = hi1 ^ c1 ^ k0; c1 = lo1; c2 = hi0 ^ c3 ^ k1; c3 = lo0;
    k0 += 0x9E3779B97F4A7C15ull; k1 += 0xBB67AE8584CAA73Bull;
  }
  o[0] = c0; o[1] = c1; o[2] = c2; o[3] = c3;
}
__device__ __forceinline__ unsigned philox_word(const unsigned long long (&o)[4], int e) {  // e = j % 8
  const int q = e >> 1;
  const unsigned long long v = q == 0 ? o[0] : q == 1 ? o[1] : q == 2 ? o[2] : o[3];
  return (unsigned)(v >> (32 * (e & 1)));
}
// -E for word w, as ops.philox.neg_exponentials: R = min(w 2^-32 + 2^-33, 1 - 2^-24), -E = log1p(-R)
__device__ __forceinline__ float neg_exponential(unsigned w) {
  float r = __fmul_rn(__uint2float_rn(w), -2.3283064365386963e-10f);
  r = __fsub_rn(r, 1.1641532182693481e-10f);
  return log1pf(fmaxf(r, -0.99999994039535522f));
}
__device__ __forceinline__ float race_score(float s, unsigned w) {  // the race takes the smallest (<= 0)
  return __fdiv_rn(expf(s), neg_exponential(w));
}

__device__ __forceinline__ float scaled(float x, float peak, float temperature) {  // numpy's two roundings
  return __fdiv_rn(__fsub_rn(x, peak), temperature);
}
// The smallest x with scaled(x) >= bound (bound <= 0 = scaled(peak)), by bisection over the ordered bits of
// x: scaled is monotone, so x >= it selects exactly {s >= bound} without a division per token.
__device__ float x_threshold(float bound, float peak, float temperature) {
  if (!(bound > NEG_INF)) return NEG_INF;
  const auto order = [](float x) { const unsigned u = __float_as_uint(x); return u >> 31 ? ~u : u | 0x80000000u; };
  const auto value = [](unsigned k) { return __uint_as_float(k >> 31 ? k & 0x7fffffffu : ~k); };
  unsigned lo = order(NEG_INF), hi = order(peak);
  while (lo < hi) {
    const unsigned mid = lo + (hi - lo) / 2;
    if (scaled(value(mid), peak, temperature) >= bound) hi = mid; else lo = mid + 1;
  }
  return value(lo);
}
__device__ __forceinline__ unsigned key_of(float s) { return __float_as_uint(s) & 0x7fffffffu; }  // s <= 0
__device__ __forceinline__ float s_of(unsigned key) { return -__uint_as_float(key); }

// ---- bias and penalties: processed values of the touched tokens into the scratch row
struct History {
  const int *prompt, *output, *bias_ids;
  const float* bias_values;
  int prompt_len, output_len, bias_len;
};
__device__ History history(const unsigned char* params, int row) {
  const Header& h = *reinterpret_cast<const Header*>(params);
  const int* t = reinterpret_cast<const int*>(params + h.table_offset);
  const int B = h.batch, Lp = h.prompt_len, Lo = h.output_len, Nb = h.bias_len;
  return {t + row * Lp, t + B * Lp + row * Lo, t + B * (Lp + Lo) + row * Nb,
          reinterpret_cast<const float*>(t + B * (Lp + Lo + Nb)) + row * Nb, Lp, Lo, Nb};
}
__device__ __forceinline__ bool bit(const unsigned* bitmap, int id) { return (bitmap[id >> 5] >> (id & 31)) & 1u; }

// vLLM's order, in numpy's float32 steps: bias, repetition (prompt + output, once), then frequency, presence
__device__ float penalized(float v, int id, const RowParams& p, const unsigned* seen, const unsigned* proc) {
  if (bit(seen, id)) v = v > 0.f ? __fdiv_rn(v, p.repetition) : __fmul_rn(v, p.repetition);
  const unsigned count = proc[id];  // output occurrences, counted before any value is stored
  if (count) v = __fsub_rn(__fsub_rn(v, __fmul_rn(p.frequency, (float)count)), p.presence);
  return v;
}

__device__ void setup_exceptions(const Row& r, const RowParams& p, const History& h, unsigned* proc) {
  const int words = (r.V + 31) >> 5;
  unsigned* seen = TOUCHED + words;
  for (int i = threadIdx.x; i < 2 * words; i += NT) TOUCHED[i] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < h.prompt_len; i += NT) {
    const int id = h.prompt[i];
    if (id >= 0) atomicOr(&seen[id >> 5], 1u << (id & 31));
  }
  for (int i = threadIdx.x; i < h.output_len; i += NT) {
    const int id = h.output[i];
    if (id < 0) continue;
    atomicOr(&seen[id >> 5], 1u << (id & 31));
    if (p.flags & F_COUNTED) atomicAdd(&proc[id], 1u);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < h.bias_len; i += NT) {  // bias ids are unique: each entry owns its token
    const int id = h.bias_ids[i];
    if (id < 0) continue;
    atomicOr(&TOUCHED[id >> 5], 1u << (id & 31));
    proc[id] = __float_as_uint(penalized(__fadd_rn(to_float(r.logits[id]), h.bias_values[i]), id, p, seen, proc));
  }
  __syncthreads();
  for (int i = threadIdx.x; i < h.prompt_len + h.output_len; i += NT) {  // first to mark a token owns it
    const int id = i < h.prompt_len ? h.prompt[i] : h.output[i - h.prompt_len];
    if (id < 0) continue;
    if (atomicOr(&TOUCHED[id >> 5], 1u << (id & 31)) & (1u << (id & 31))) continue;
    proc[id] = __float_as_uint(penalized(to_float(r.logits[id]), id, p, seen, proc));
  }
  __syncthreads();
}

__device__ void clear_exceptions(const History& h, unsigned* proc) {  // back to all zeros
  __syncthreads();
  for (int i = threadIdx.x; i < h.prompt_len + h.output_len + h.bias_len; i += NT) {
    const int n = h.prompt_len + h.output_len;
    const int id = i < h.prompt_len ? h.prompt[i] : i < n ? h.output[i - h.prompt_len] : h.bias_ids[i - n];
    if (id >= 0) proc[id] = 0;
  }
}

__device__ __forceinline__ float max8(const float (&v)[8]) {
  return fmaxf(fmaxf(fmaxf(v[0], v[1]), fmaxf(v[2], v[3])), fmaxf(fmaxf(v[4], v[5]), fmaxf(v[6], v[7])));
}
// one thread's running max m and sum of exp((v - m) * scale), a block of 8 at a time (-inf past V adds 0)
__device__ __forceinline__ void online(float& m, float& sum, const float (&v)[8], float scale) {
  const float top = max8(v);
  if (top > m) { sum *= expf((m - top) * scale); m = top; }
  if (m > NEG_INF) {
#pragma unroll
    for (int e = 0; e < 8; ++e) sum += expf((v[e] - m) * scale);
  }
}

// ---- thresholds
struct Sampling {
  float peak, temperature, lmp;  // lmp: log(min_p) or -inf
  int top_k;  // 0 = off
  float top_p;  // 1 = off
  bool top_k_on, top_p_on;
};

// tau from the sorted candidates (every token with s >= the bound); false if they cannot decide it.
__device__ bool tau_from_candidates(int count, const Sampling& c, double mass, float& tau) {
  pad_and_sort(CAND_S, CAND_ID, count);
  float tau_k = NEG_INF, tau_p = NEG_INF;
  if (c.top_k_on) {
    if (c.top_k <= count) tau_k = CAND_S[c.top_k - 1];
    else if (c.top_p_on) return false;  // cannot happen: the bound was the k-th thread max
  }  // else fewer than k tokens reach min-p's bound, which then decides tau
  if (c.top_p_on) {
    int limit = count;
    if (c.top_k_on) {  // top-p renormalises over the top-k set, ties with the k-th included
      double part = 0;
      for (int i = threadIdx.x; i < count; i += NT) if (CAND_S[i] >= tau_k) part += (double)expf(CAND_S[i]);
      mass = block_sum(part);
      limit = c.top_k;
    }
    double before;
    const int i = find_first(limit, (double)c.top_p * mass, [&](int i) { return (double)expf(CAND_S[i]); }, before);
    if (i >= 0) tau_p = CAND_S[i];
    else if (c.top_k_on) tau_p = tau_k;
    else return false;  // the bound from the approximate mass was too high: let the radix select decide
  }
  tau = fmaxf(fmaxf(tau_k, tau_p), c.lmp);
  return true;
}

// Smallest key (largest s >= floor) whose running count (or mass in units of 1 / FIXED) reaches target,
// by 11 + 10 + 10-bit digits, one pass over the row each; mass_le gets the mass of keys <= it.
__device__ unsigned radix_select(const Row& r, const Sampling& c, float floor, bool by_mass,
                                 double target, double& mass_le) {
  unsigned prefix = 0;
  double mass_before = 0;
  for (int level = 0; level < 3; ++level) {
    const int shift = 20 - 10 * level, bins = level ? 1024 : 2048;
    __syncthreads();
    for (int i = threadIdx.x; i < bins; i += NT) { HIST_COUNT[i] = 0; HIST_MASS[i] = 0; }
    __syncthreads();
    for_each_block(r, [&](int b, const float (&raw)[8], const float (&x)[8]) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {  // lanes of one bin add up first: one atomic per bin per warp
        const float s = scaled(x[e], c.peak, c.temperature);
        const unsigned key = key_of(s);
        const bool in = b * 8 + e < r.V && s >= floor && (!level || (key >> (shift + 10)) == prefix);
        if (!__any_sync(FULL, in)) continue;
        const unsigned bin = in ? (key >> shift) & (bins - 1) : 0xffffffffu;
        const unsigned peers = __match_any_sync(FULL, bin);
        const unsigned mass = __reduce_add_sync(peers, in ? __float2uint_rn(expf(s) * FIXED) : 0u);
        if (in && (threadIdx.x & 31) == __ffs(peers) - 1) {
          atomicAdd(&HIST_COUNT[bin], (unsigned)__popc(peers));
          atomicAdd(&HIST_MASS[bin], (unsigned long long)mass);
        }
      }
    });
    __syncthreads();
    double before;
    const int bin = by_mass ? find_first(bins, target, [&](int i) { return (double)HIST_MASS[i]; }, before)
                            : find_first(bins, target, [&](int i) { return (double)HIST_COUNT[i]; }, before);
    if (bin < 0) return NOT_FOUND;
    target -= before;
    if (!by_mass) {
      double part = 0;
      for (int i = threadIdx.x; i < bin; i += NT) part += (double)HIST_MASS[i];
      before = block_sum(part);
    }
    mass_before += before;
    prefix = (prefix << (level ? 10 : 0)) | bin;
    if (level == 2) mass_le = mass_before + (double)HIST_MASS[bin];
  }
  return prefix;
}

__device__ float tau_by_radix(const Row& r, const Sampling& c, float floor, double mass) {
  float tau_k = NEG_INF, tau_p = NEG_INF;
  unsigned key_k = 0x7fffffffu;
  double fixed_mass = mass * FIXED, mass_k;
  if (c.top_k_on) {
    const unsigned key = radix_select(r, c, floor, false, (double)c.top_k, mass_k);
    if (key != NOT_FOUND) { key_k = key; tau_k = s_of(key); fixed_mass = mass_k; }
  }
  if (c.top_p_on) {
    double unused;
    const unsigned key = radix_select(r, c, floor, true, (double)c.top_p * fixed_mass, unused);
    tau_p = key != NOT_FOUND ? s_of(min(key, key_k)) : tau_k;
  }
  return fmaxf(fmaxf(tau_k, tau_p), c.lmp);
}

// ---- the race: the kept token with the smallest exp(s) / -E, lowest id on ties
__device__ int race_dense(const Row& r, const Sampling& c, const RowParams& p, float tau) {
  float best = POS_INF;
  int best_j = INT_BIG;
  const float x_tau = x_threshold(tau, c.peak, c.temperature);
  for_each_block(r, [&](int b, const float (&raw)[8], const float (&x)[8]) {
    unsigned keep = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) if (b * 8 + e < r.V && x[e] >= x_tau) keep |= 1u << e;
    if (!keep) return;  // no Philox block for a block with nothing kept
    unsigned long long o[4];
    philox(p.seed, p.step, (unsigned long long)b, o);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      if (!((keep >> e) & 1u)) continue;
      const float score = race_score(scaled(x[e], c.peak, c.temperature), philox_word(o, e));
      if (score < best) { best = score; best_j = b * 8 + e; }
    }
  });
  block_best<true>(best, best_j);
  return best_j;
}

__device__ int race_candidates(int count, const RowParams& p, float tau) {
  float best = POS_INF;
  int best_j = INT_BIG;
  for (int i = threadIdx.x; i < count; i += NT) {
    if (!(CAND_S[i] >= tau)) continue;
    const int j = CAND_ID[i];
    unsigned long long o[4];
    philox(p.seed, p.step, (unsigned long long)(j >> 3), o);
    const float score = race_score(CAND_S[i], philox_word(o, j & 7));
    if (better<true>(score, j, best, best_j)) { best = score; best_j = j; }
  }
  block_best<true>(best, best_j);
  return best_j;
}

// ---- top-N of the raw distribution, best first: sorted candidates, or N argmax passes if they overflowed
__device__ void write_top(const Row& r, int count, int num_top, double log_z, int* top_ids,
                          float* top_logprobs) {
  if (count <= RAW_CAP) {
    pad_and_sort(RAW_V, RAW_ID, count);
    if (threadIdx.x < num_top) {
      top_ids[threadIdx.x] = RAW_ID[threadIdx.x];
      top_logprobs[threadIdx.x] = (float)((double)RAW_V[threadIdx.x] - log_z);
    }
    return;
  }
  float prev = POS_INF;
  int prev_j = -1;
  for (int n = 0; n < num_top; ++n) {
    float best = NEG_INF;
    int best_j = INT_BIG;
    for_each_block(r, [&](int b, const float (&raw)[8], const float (&x)[8]) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int j = b * 8 + e;
        const bool after = raw[e] < prev || (raw[e] == prev && j > prev_j);
        if (j < r.V && after && better<false>(raw[e], j, best, best_j)) { best = raw[e]; best_j = j; }
      }
    });
    block_best<false>(best, best_j);
    if (threadIdx.x == 0) { top_ids[n] = best_j; top_logprobs[n] = (float)((double)best - log_z); }
    prev = best; prev_j = best_j;
  }
}

// The largest floor -2 (i + 1) whose tokens hold top_p of the total mass (with the bound's margin): a lower
// bound on tau, from the per-thread band masses of pass 2, for top-p rows the thread maxima could not bound.
__device__ float mass_floor(const Sampling& c, double mass) {
  double above = 0;
  for (int i = 0; i < N_FLOORS; ++i) {
    above += FLOOR_MASS[i * NT + threadIdx.x];
    if (block_sum(above) >= (double)c.top_p * mass * (1.0 + 1e-4)) return -2.f * (i + 1);
  }
  return NEG_INF;
}

// Candidates {s >= bound} of the row into CAND_S / CAND_ID; returns their number (past CAND_CAP: overflow).
__device__ int collect(const Row& r, const Sampling& c, float bound, int& n_cand) {
  const float x_bound = x_threshold(bound, c.peak, c.temperature);
  __syncthreads();  // everyone is done with the previous candidates
  if (threadIdx.x == 0) n_cand = 0;
  __syncthreads();
  for_each_block(r, [&](int b, const float (&raw)[8], const float (&x)[8]) {
    unsigned want = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) if (b * 8 + e < r.V && x[e] >= x_bound) want |= 1u << e;
    if (!__any_sync(FULL, want)) return;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const bool take = (want >> e) & 1u;
      append(take, &n_cand, CAND_CAP, CAND_S, CAND_ID, take ? scaled(x[e], c.peak, c.temperature) : 0.f, b * 8 + e);
    }
  });
  __syncthreads();
  return n_cand;
}

extern "C" __global__ void __launch_bounds__(NT, 1)
sample_kernel(const LOGIT_T* __restrict__ logits, int V, int vec, const unsigned char* __restrict__ params,
              unsigned* scratch, token_id_t* __restrict__ out_ids, float* __restrict__ out_logprobs,
              int* __restrict__ out_top_ids, float* __restrict__ out_top_logprobs, int num_top,
              float* __restrict__ out_stats) {
  const int row = blockIdx.x, tid = threadIdx.x;
  if (row >= reinterpret_cast<const Header*>(params)->batch) {  // CUDA-graph padding row
    if (tid == 0) { out_ids[row] = 0; if (out_logprobs) out_logprobs[row] = 0.f; }
    if (tid < num_top) { out_top_ids[row * num_top + tid] = 0; out_top_logprobs[row * num_top + tid] = 0.f; }
    if (out_stats && tid < 4) out_stats[row * 4 + tid] = 0.f;
    return;
  }
  const RowParams& p = reinterpret_cast<const RowParams*>(params + HEADER_BYTES)[row];
  __shared__ int n_cand, n_raw;
  unsigned* proc = scratch + (size_t)row * V;
  const Row r = {logits + (size_t)row * V, V, (V + 7) / 8, vec != 0, (p.flags & F_EXCEPTIONS) != 0, proc};
  if (r.exceptions) setup_exceptions(r, p, history(params, row), proc);

  const bool greedy = p.temperature == 0.f, want_lp = out_logprobs || num_top > 0;
  Sampling c = {0.f, greedy ? 1.f : p.temperature, greedy ? NEG_INF : p.log_min_p, greedy ? 0 : p.top_k, p.top_p,
                !greedy && p.top_k > 0, !greedy && p.top_p < 1.f};
  const bool truncated = c.top_k_on || c.top_p_on || c.lmp > NEG_INF;
  const bool total_mass = c.top_p_on && !c.top_k_on;  // top-p over the whole vocab needs its mass

  // pass 1: argmax of the processed logits; each thread's two largest; log Z of the raw logits; approximate mass
  float best = NEG_INF, second = NEG_INF, rmax = NEG_INF, rsum = 0.f, om = NEG_INF, osum = 0.f;
  int best_j = INT_BIG;
  // Blocks whose max cannot change best (or second) skip the per-token work: few do once a thread has seen some.
  if (greedy && !want_lp) {  // the common greedy step: a bare argmax, more loads in flight
    for_each_block<UNROLL>(r, [&](int b, const float (&raw)[8], const float (&x)[8]) {
      const float top = max8(x);
      if (top > best || best_j == INT_BIG) {  // the first of the block's maxima: ids only grow
        int first = 7;
#pragma unroll
        for (int e = 6; e >= 0; --e) if (x[e] == top) first = e;
        best = top; best_j = b * 8 + first;  // past V only if the thread has no token; then it never wins
      }
    });
  } else {
    const float inv_t = 1.f / c.temperature;
    for_each_block(r, [&](int b, const float (&raw)[8], const float (&x)[8]) {
      if (max8(x) > second || best_j == INT_BIG) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          if (b * 8 + e >= V) break;
          if (x[e] > best || best_j == INT_BIG) { second = best; best = x[e]; best_j = b * 8 + e; }
          else if (x[e] > second) second = x[e];
        }
      }
      if (want_lp) online(rmax, rsum, raw, 1.f);
      if (total_mass) online(om, osum, x, inv_t);
    });
  }
  CAND_S[tid] = best; CAND_S[NT + tid] = second;  // 2 NT distinct tokens: sorted, they bound top-k and top-p
  CAND_ID[tid] = tid; CAND_ID[NT + tid] = NT + tid;
  RM[tid] = rmax; RM_ID[tid] = tid;
  c.peak = best;
  int token = best_j;
  block_best<false>(c.peak, token);
  double log_z = 0, mass = 0;
  if (want_lp) {
    float raw_peak = rmax;
    int unused = tid;
    block_best<false>(raw_peak, unused);
    log_z = (double)raw_peak + log(block_sum(rmax == NEG_INF ? 0.0 : (double)rsum * exp((double)rmax - raw_peak)));
  }
  if (total_mass) mass = block_sum(om == NEG_INF ? 0.0 : (double)osum * exp(((double)om - c.peak) / c.temperature));

  float l_raw = NEG_INF;  // every top-N token is >= the N-th largest thread max
  if (num_top > 0) { sort_desc(RM, RM_ID, NT); l_raw = RM[num_top - 1]; }
  // floor: a lower bound on tau that keeps every token the exact threshold needs; bound adds top-p's
  // estimate from the approximate mass (checked later) for rows without top-k
  float floor = c.lmp, bound;
  const int n_bound = total_mass || c.top_k > NT ? 2 * NT : NT;  // the thread maxima alone bound k <= NT
  if (c.top_k_on || total_mass) sort_desc(CAND_S, CAND_ID, n_bound);
  if (c.top_k_on) {
    const float l_k = c.top_k <= n_bound ? scaled(CAND_S[c.top_k - 1], c.peak, c.temperature) : NEG_INF;
    floor = c.top_p_on ? l_k : fmaxf(l_k, c.lmp);  // top-p needs the whole top-k set's mass
  }
  bound = floor;
  if (total_mass) {
    double before;
    const int i = find_first(2 * NT, (double)c.top_p * mass * (1.0 + 1e-4),
                             [&](int i) { return (double)expf(scaled(CAND_S[i], c.peak, c.temperature)); }, before);
    if (i >= 0) bound = fmaxf(bound, scaled(CAND_S[i], c.peak, c.temperature));
  }
  const float x_bound = x_threshold(bound, c.peak, c.temperature);  // x >= x_bound <=> s >= bound

  // pass 2: candidates >= bound, the exact total mass, and top-N candidates of the raw logits
  int count = 0, raw_count = 0;
  if (truncated || num_top > 0) {
    __syncthreads();  // the bound's sorted values are read; pass 2 overwrites them
    if (tid == 0) { n_cand = 0; n_raw = 0; }
    __syncthreads();
    double part = 0;
#pragma unroll
    for (int k = 0; k <= N_FLOORS; ++k) FLOOR_MASS[k * NT + tid] = 0.f;  // this thread's column only
    for_each_block(r, [&](int b, const float (&raw)[8], const float (&x)[8]) {
      unsigned want = 0, want_raw = 0;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const bool valid = b * 8 + e < V;
        if (truncated && valid && x[e] >= x_bound) want |= 1u << e;
        if (num_top > 0 && valid && raw[e] >= l_raw) want_raw |= 1u << e;
        if (total_mass && valid) {
          const float s = scaled(x[e], c.peak, c.temperature), w = expf(s);
          part += (double)w;
          // band k holds s in [-2 (k + 1), -2 k), so s >= -2 (i + 1) <=> k <= i; lower tokens count for no floor
          const int k = min(max((int)ceilf(-0.5f * s) - 1, 0), N_FLOORS);
          if (k < N_FLOORS) FLOOR_MASS[k * NT + tid] += w;
        }
      }
      if (__any_sync(FULL, want)) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const bool take = (want >> e) & 1u;
          append(take, &n_cand, CAND_CAP, CAND_S, CAND_ID, take ? scaled(x[e], c.peak, c.temperature) : 0.f, b * 8 + e);
        }
      }
      if (__any_sync(FULL, want_raw)) {
#pragma unroll
        for (int e = 0; e < 8; ++e) append((want_raw >> e) & 1u, &n_raw, RAW_CAP, RAW_V, RAW_ID, raw[e], b * 8 + e);
      }
    });
    if (total_mass) mass = block_sum(part);
    __syncthreads();
    count = n_cand; raw_count = n_raw;
  }

  float tau = NEG_INF;
  int path = 0;  // 0 greedy, 1 whole-vocab race, 2 candidates, 3 radix select
  if (!greedy) {
    path = !truncated ? 1 : count <= CAND_CAP && tau_from_candidates(count, c, mass, tau) ? 2 : 3;
    const float floor_p = path == 3 && total_mass ? mass_floor(c, mass) : NEG_INF;
    if (floor_p > bound) {  // tighter than the bound pass 2 used: collect the candidates again
      floor = fmaxf(floor, floor_p);
      count = collect(r, c, floor, n_cand);
      if (count <= CAND_CAP && tau_from_candidates(count, c, mass, tau)) path = 2;
    }
    if (path == 3) tau = tau_by_radix(r, c, floor, mass);
    token = path == 2 ? race_candidates(count, p, tau) : race_dense(r, c, p, tau);
  }

  if (tid == 0) {
    out_ids[row] = (token_id_t)token;
    if (out_logprobs) out_logprobs[row] = (float)((double)to_float(r.logits[token]) - log_z);
    if (out_stats) {
      out_stats[row * 4] = tau; out_stats[row * 4 + 1] = (float)mass;
      out_stats[row * 4 + 2] = (float)count; out_stats[row * 4 + 3] = (float)path;
    }
  }
  if (num_top > 0)
    write_top(r, raw_count, num_top, log_z, out_top_ids + row * num_top, out_top_logprobs + row * num_top);
  if (r.exceptions) clear_exceptions(history(params, row), proc);
}
