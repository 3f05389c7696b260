// Embedding gather: out[t, :] = table[ids[t], :], a pure copy of 16-byte vectors (any 2-byte dtype).
// Layout: ids [T] int32, table [V, H] row-major, out [T, H]; H * itemsize a multiple of 16 bytes.
// grid = (T, ceil(n_vec / blockDim.x)): tokens on x, which has no 65535 limit. An id outside
// [0, V) writes a zero row instead of reading out of bounds (the caller validates ids; a stray
// one must not fault the context that the whole engine shares).
#include <cuda_fp16.h>

typedef unsigned long long u64;  // NVRTC has no <cstddef>

extern "C" __global__ void embedding_kernel(const int *__restrict__ ids, const uint4 *__restrict__ table,
                                            uint4 *__restrict__ out, int n_vec, int vocab) {
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= n_vec) return;
    const int token = blockIdx.x;
    const int id = ids[token];
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (id >= 0 && id < vocab) v = table[(u64)id * n_vec + c];
    out[(u64)token * n_vec + c] = v;
}
