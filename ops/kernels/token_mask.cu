// Structured outputs: logits[row, id] = -inf wherever bit (id & 31) of word (id >> 5) of the row's token mask is
// clear (llguidance's bitmask layout; a row without a grammar is all ones). The mask stays applied: the sampler
// that runs next (sampling.cu) sees the forbidden tokens as -inf, in its logprobs too, as ops/sampling.py does.
//
// The mask lives in SamplingBuffers' parameter buffer (ops/cuda/sampling.py), after the tables: header int 5
// (Header.pad[0] of sampling.cu, which the sampler does not read) is its byte offset there, int32 [batch,
// ceil(V / 32)] from that offset, and 0 when the step loaded no mask. So a captured graph always holds this
// launch, and a replay after an unmasked load() costs each CTA one read of the header before it returns. Rows
// >= header.batch (graph padding) are left alone.
//
// One thread per mask byte (8 tokens), grid = (CTAs per row, rows), striding over the row's bytes: a byte of
// ones skips its tokens (a warp of them reads 32 bytes and writes nothing); a zero byte stores 8 -inf as
// 16-byte vectors where vec (V % 8 == 0 and 16-byte aligned logits); otherwise each clear bit's token alone
// (past V ignored). The logits are only written, never read.
// nvcc-variants: -DLOGIT_T=float; -DLOGIT_T=half; -DLOGIT_T=__nv_bfloat16
#ifndef CUPYLLM_HOST_EMU  // the CPU emulator (tests/host_mma.py) brings its own fp16/bf16 types
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

#ifndef LOGIT_T
#define LOGIT_T float  // float, half or __nv_bfloat16
#endif
#define MASK_THREADS 256
#define MASK_OFFSET_WORD 5  // header int: byte offset of the mask in the parameter buffer, 0 = no mask

template <class T> struct NegInf;  // the bits of -inf, stored through an unsigned type of T's size
template <> struct NegInf<float> { typedef unsigned bits_t; static constexpr unsigned bits = 0xff800000u; };
template <> struct NegInf<__half> { typedef unsigned short bits_t; static constexpr unsigned bits = 0xfc00u; };
template <> struct NegInf<__nv_bfloat16> { typedef unsigned short bits_t; static constexpr unsigned bits = 0xff80u; };
typedef NegInf<LOGIT_T>::bits_t bits_t;
#define NEG_INF_BITS (NegInf<LOGIT_T>::bits)
#define VEC_STORES ((int)sizeof(LOGIT_T) / 2)  // 16-byte stores for 8 tokens: 2 of float, 1 of half/bf16
#define NEG_INF_WORD (sizeof(LOGIT_T) == 4 ? NEG_INF_BITS : NEG_INF_BITS * 0x10001u)  // one 32-bit lane of them

extern "C" __global__ void __launch_bounds__(MASK_THREADS)
token_mask_kernel(LOGIT_T* __restrict__ logits, int V, int vec, const unsigned char* __restrict__ params) {
  const int* header = reinterpret_cast<const int*>(params);
  const int offset = header[MASK_OFFSET_WORD];
  const int row = blockIdx.y;
  if (offset == 0 || row >= header[0]) return;  // no mask this step, or a padding row
  const int nbytes = (V + 7) >> 3;
  const unsigned char* mask = params + offset + (size_t)row * 4 * ((V + 31) >> 5);
  bits_t* x = reinterpret_cast<bits_t*>(logits) + (size_t)row * V;
  for (int u = blockIdx.x * MASK_THREADS + threadIdx.x; u < nbytes; u += gridDim.x * MASK_THREADS) {
    const unsigned m = __ldg(mask + u);  // little-endian words: byte u holds tokens 8u .. 8u + 7
    if (m == 0xffu) continue;
    bits_t* p = x + (size_t)u * 8;
    if (vec && m == 0u) {
      const unsigned w = NEG_INF_WORD;
      uint4* q = reinterpret_cast<uint4*>(p);
#pragma unroll
      for (int i = 0; i < VEC_STORES; ++i) q[i] = make_uint4(w, w, w, w);
      continue;
    }
#pragma unroll
    for (int e = 0; e < 8; ++e)
      if (!((m >> e) & 1u) && u * 8 + e < V) p[e] = (bits_t)NEG_INF_BITS;
  }
}
