// The first node of every decode graph: turns one packed host->device copy into the step's inputs.
//
// packed (int32): [header 4][ids B][positions B][slots B][seq_lens B][src B][tables: rows x width, flat]
// header[0] = width, the columns of the flat block tables this step. The ids, positions, slots and seq_lens
// are read in place by the model; this kernel only
//   - puts the previous step's sampled token into each row whose id is still on the device (src >= 0:
//     the host scheduled the row one step ahead, before it knew that token), and
//   - spreads the flat block tables over the static [B, max_blocks] table (columns past width are left
//     as they are: seq_lens bound every read).
// One thread per (row, column); a row's column 0 thread does the id.

extern "C" __global__ void unpack_step_inputs(int* __restrict__ packed, int rows, int stride,
                                              const int* __restrict__ prev_sampled,
                                              int* __restrict__ block_tables, int max_blocks) {
    const int width = packed[0];
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    const int row = blockIdx.y;
    if (row >= rows) return;
    int* ids = packed + 4;
    const int* src = packed + 4 + 4 * stride;
    const int* tables = packed + 4 + 5 * stride;
    if (col == 0 && src[row] >= 0) ids[row] = prev_sampled[src[row]];
    if (col < width && col < max_blocks) block_tables[row * max_blocks + col] = tables[row * width + col];
}
