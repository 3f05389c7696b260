"""The generated CUDA C on the CPU: every model op of ops/jit_ops.py (and the language's masks, reductions, casts)
runs as the source ops/jit/lower.py generates, compiled by g++ and run by the emulator of tests/host_cuda.py, and
is held to the interpreter on the same stored inputs, with tests/gpu/test_jit_gpu.py's rule (units in the last
place of the storage dtype; bit-exact for copies). A lowering bug shows here before it reaches a GPU.
"""
from __future__ import annotations

import functools
import re

import numpy as np
import pytest

from ops import jit, jit_ops, reference
from ops.jit import BlockSpec, core, dtypes, lower
from tests import host_cuda
from tests.test_jit import int_casts_prefetch, masked_stats

if not host_cuda.available():
    pytest.skip("no g++ on PATH (or not Linux): the generated CUDA C cannot run on the host", allow_module_level=True)

SEED = 20261207
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
ULP = {"float32": 2.0 ** -23, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}
# float32 results of a row reduction differ by the summation order (numpy's pairwise sum against per-thread
# sums and a shuffle tree), a few units; a 16-bit store rounds that away but for a rare tie (the GPU test's 1 ulp)
SUM_ULPS = {"float32": 8, "float16": 1, "bfloat16": 1}


class Emulated:
    """core._interpret replaced: numpy arrays run the generated C++ (mode "emulate") or the interpreter."""

    def __init__(self, interpret):
        self.interpret, self.mode, self.launches = interpret, "emulate", []

    def __call__(self, ir, nt, arrays, grid, scalars):
        if self.mode == "interpret":
            return self.interpret(ir, nt, arrays, grid, scalars)
        host_cuda.emulate(ir, nt, arrays, grid, scalars)
        self.launches.append((ir.name, nt, tuple(grid)))

    def both(self, host_arrays, fn):
        """fn on copies by the interpreter and on copies by the emulator; returns (interpreted, emulated)."""
        cpu, emu = [a.copy() for a in host_arrays], [a.copy() for a in host_arrays]
        self.mode = "interpret"
        try:
            fn(*cpu)
        finally:
            self.mode = "emulate"
        before = len(self.launches)
        fn(*emu)
        assert len(self.launches) > before, "nothing was emulated"
        return cpu, emu


@pytest.fixture
def emulated(monkeypatch):
    runner = Emulated(core._interpret)
    monkeypatch.setattr(core, "_interpret", runner)
    return runner


def stored(rng, shape, dtype):
    return dtypes.from_float32(rng.standard_normal(shape).astype(np.float32), dtypes.get(dtype))


def assert_match(cpu, emu, dtype, what, ulps=1, floor=2.0 ** -14):
    """Equal but for `ulps` units in the last place of the storage dtype (tests/gpu/test_jit_gpu.py's rule), of
    magnitudes `floor` and up."""
    a = dtypes.to_float32(cpu, dtypes.get(dtype))
    b = dtypes.to_float32(emu, dtypes.get(dtype))
    nan = np.isnan(a) != np.isnan(b)
    assert not nan.any(), f"{what}: NaNs differ at {np.argwhere(nan)[:5].tolist()}"
    ulp = np.float32(ULP[dtype]) * np.maximum(np.abs(a), np.float32(floor))
    bad = ~(np.abs(a - b) <= ulps * ulp) & ~np.isnan(a)
    if bad.any():
        at = np.argwhere(bad)[:5]
        raise AssertionError(f"{what}: {bad.sum()} of {bad.size} elements differ by more than {ulps} ulp, max "
                             f"{np.abs(a - b)[bad].max()}; first at {at.tolist()}: interpreter "
                             f"{a[tuple(at.T)].tolist()}, generated {b[tuple(at.T)].tolist()}")


def assert_bits(cpu, emu, what):
    a, b = np.ascontiguousarray(cpu), np.ascontiguousarray(emu)
    assert a.shape == b.shape and a.dtype == b.dtype
    bad = a.view(np.uint8).reshape(a.shape + (-1,)) != b.view(np.uint8).reshape(b.shape + (-1,))
    bad = bad.any(axis=-1)
    if bad.any():
        at = np.argwhere(bad)[:5]
        raise AssertionError(f"{what}: {bad.sum()} of {bad.size} elements differ bitwise; first at {at.tolist()}: "
                             f"interpreter {a[tuple(at.T)].tolist()}, generated {b[tuple(at.T)].tolist()}")


# --- the model ops -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(STORAGE))
# h: 2-element chunks, 25 of 32 lanes, 14 warps, 2 chunks a thread
@pytest.mark.parametrize("h", [90, 200, 896, 3584, 5120])
def test_norms(emulated, dtype, h):
    rng = np.random.default_rng(SEED + h)
    for t in (1, 5):
        x, res, w = stored(rng, (t, h), dtype), stored(rng, (t, h), dtype), stored(rng, (h,), dtype)
        out = np.full((t, h), 7, STORAGE[dtype])
        cpu, emu = emulated.both([x, w, out], lambda x, w, o: jit_ops.rms_norm(x, w, 1e-6, o))
        assert_match(cpu[2], emu[2], dtype, f"rms_norm T={t}", ulps=SUM_ULPS[dtype])
        cpu, emu = emulated.both([x, res, w, out], lambda x, r, w, o: jit_ops.add_rms_norm(x, r, w, 1e-6, o))
        assert_bits(cpu[1], emu[1], f"add_rms_norm residual T={t}")
        assert_match(cpu[3], emu[3], dtype, f"add_rms_norm out T={t}", ulps=SUM_ULPS[dtype])
        for i, a in ((0, x), (2, w)):
            assert_bits(a, emu[i], f"add_rms_norm input {i}")


@pytest.mark.parametrize("dtype", list(STORAGE))
@pytest.mark.parametrize("inter", [300, 1000, 4864])  # 300: not a multiple of 8 (no vectors), ragged last block
def test_silu_and_mul_every_config(emulated, dtype, inter):
    rng = np.random.default_rng(SEED + inter)
    for t in (1, 3):
        gu = stored(rng, (t, 2 * inter), dtype)
        for config in jit_ops.SILU_CONFIGS:
            out = np.full((t, inter), 7, STORAGE[dtype])
            cpu, emu = emulated.both([gu, out], lambda x, o: jit_ops._silu_launch.__wrapped__(x, o, **config))
            # expf is glibc's here, numpy's SIMD exp in the interpreter: both within an ulp of float32
            assert_match(cpu[1], emu[1], dtype, f"silu_and_mul T={t} {config}", ulps=4 if dtype == "float32" else 1)
            assert_bits(gu, emu[0], "silu_and_mul input")


@pytest.mark.parametrize("dtype", list(STORAGE))
@pytest.mark.parametrize("h", [45, 200, 896])  # 45: a 16-bit row of odd width moves as elements, not int32 words
def test_embedding_bit_exact(emulated, dtype, h):
    rng = np.random.default_rng(SEED + h)
    table = stored(rng, (50, h), dtype)
    ids = np.array([3, 0, 49, -1, 50, 7, 1 << 30, -(1 << 31), 12], np.int32)
    out = np.full((len(ids), h), 7, STORAGE[dtype])
    cpu, emu = emulated.both([ids, table, out], jit_ops.embedding)
    assert_bits(cpu[2], emu[2], "embedding")
    ok = (ids >= 0) & (ids < 50)
    assert_bits(table[ids[ok]], emu[2][ok], "embedding rows")
    assert (emu[2][~ok] == 0).all()


ROPE = [(64, 14, 2), (80, 8, 1), (96, 4, 4), (128, 14, 2), (128, 4, 4), (256, 8, 1)]  # head_dim, Hq, Hkv


def rope_case(rng, dtype, d, hq, hkv, norm, t=11):
    nb = -(-t // 16) + 2
    slots = rng.permutation(nb * 16)[:t].astype(np.int32)
    slots[::3] = -1  # padding entries: nothing written
    positions = rng.integers(0, 4096, t).astype(np.int32)
    cos_sin = reference.rope_cos_sin(d, 4096, 1e6)
    qn, kn = (stored(rng, (d,), dtype) for _ in range(2)) if norm else (None, None)
    qkv = stored(rng, (t, (hq + 2 * hkv) * d), dtype)
    sentinel = dtypes.from_float32(np.full((nb, hkv, 16, d), 7.0, np.float32), dtypes.get(dtype))
    arrays = [qkv, positions, slots, sentinel, sentinel.copy(), cos_sin] + ([qn, kn] if norm else [])
    return arrays


def run_rope(*a):
    jit_ops.rope_and_cache(*a[:6], *(a[6:] or (None, None)), eps=1e-6)


def check_rope(emulated, dtype, d, hq, hkv, norm, rng):
    arrays = rope_case(rng, dtype, d, hq, hkv, norm)
    cpu, emu = emulated.both(arrays, run_rope)
    qkv, slots, what = arrays[0], arrays[2], f"rope_cache d={d} Hq={hq} Hkv={hkv} norm={norm}"
    # without the norm the arithmetic is the interpreter's, operation for operation; with it, a row sum (the GPU
    # test's 1 + norm ulps for 16-bit types; in float32, x1 c - x2 s cancels: ulps of the O(1) terms)
    ulps = (SUM_ULPS[dtype] if dtype == "float32" else 2) if norm else 0
    for i, name in ((0, "qkv"), (3, "k_cache"), (4, "v_cache")):
        assert_match(cpu[i], emu[i], dtype, f"{what} {name}", ulps=0 if name == "v_cache" else ulps,
                     floor=1.0 if dtype == "float32" else 2.0 ** -14)
    # v of qkv is not rotated, and the caches change only at the slots of real tokens: k from the k heads, v as is
    t = qkv.shape[0]
    heads = emu[0].reshape(t, hq + 2 * hkv, d)
    assert_bits(qkv.reshape(heads.shape)[:, hq + hkv:], heads[:, hq + hkv:], f"{what}: v part of qkv")
    written = np.zeros(arrays[3].shape[0] * 16, bool)
    written[slots[slots >= 0]] = True
    for i, name in ((3, "k_cache"), (4, "v_cache")):
        cache = emu[i].transpose(0, 2, 1, 3).reshape(-1, hkv, d)
        assert_bits(arrays[i].transpose(0, 2, 1, 3).reshape(-1, hkv, d)[~written], cache[~written],
                    f"{what}: {name} at unused slots")
    v_in = qkv.reshape(t, hq + 2 * hkv, d)[:, hq + hkv:]
    v_cache = emu[4].transpose(0, 2, 1, 3).reshape(-1, hkv, d)
    assert_bits(v_in[slots >= 0], v_cache[slots[slots >= 0]], f"{what}: v_cache rows")
    assert_bits(cpu[4], emu[4], f"{what}: v_cache")


# A lowering bug this emulator found (test_one_row_tile_in_place_update): with Hkv = 1 the kernel tile is one row
# (1 x D/2), and every lane-row of threads held that row and stored it. Each rotated the same chunk of qkv in
# place: a race across warps on the GPU. lower.py now lets lane-row 0 alone store a one-row operand.


@pytest.mark.parametrize("dtype", list(STORAGE))
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("d,hq,hkv", ROPE)
def test_rope_and_cache(emulated, dtype, norm, d, hq, hkv):
    check_rope(emulated, dtype, d, hq, hkv, norm, np.random.default_rng(SEED + d + hq))


def _twice(x_ref):
    x_ref[...] = x_ref[...] * 2.0


@pytest.mark.parametrize("nt", [32, 64])  # 4 lane-rows in one warp; 8 over two warps
def test_one_row_tile_in_place_update(emulated, nt):
    """x *= 2 in place over (1, 40) tiles: 5 chunks of 8 on TPR = 8 lanes, NT / 8 lane-rows holding the same row."""
    call = jit.pallas_call(_twice, grid=(3,), in_specs=[BlockSpec((None, 40), lambda i: (i, 0))], num_threads=nt,
                           name="twice")
    cpu, emu = emulated.both([np.ones((3, 40), np.float32)], call)
    assert_bits(cpu[0], emu[0], f"x *= 2 with {nt} threads")


def test_the_emulator_catches_an_unmasked_vector_store(emulated, monkeypatch):
    """The bug the emulator was built after: rope_cache's masked vector stores lost their mask (`&& mask` in the
    chunk's guard), so q/k/v programs all rotated v in qkv and wrote both caches. Put it back into the generated
    source: the comparison with the interpreter must fail."""
    generate, dropped = lower.generate, []

    def unmasked(ir, nt):
        source, n = re.subn(r"(col0 \+ \d+ <= d\d+_\d+) && v\d+(\[sr\])?;", r"\1;", generate(ir, nt))
        dropped.append(n)
        return source
    monkeypatch.setattr(lower, "generate", unmasked)
    with pytest.raises(AssertionError, match="differ"):
        check_rope(emulated, "float16", 128, 4, 4, False, np.random.default_rng(SEED))
    assert dropped and dropped[0] >= 6  # lo/hi stores of qkv, k_cache and v_cache


# --- the language's pieces (kernels of tests/test_jit.py and more), generated vs interpreted ------------------

def test_masks_iota_reductions_where(emulated):
    """tests/test_jit.py's kernel: a masked load with `other` over a ragged last block, max/min/sum, where, iota."""
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((3, 300)).astype(np.float32)
    call = jit.pallas_call(masked_stats, grid=(3, 3), in_specs=[BlockSpec((None, 128), lambda i, j: (i, j))],
                           out_specs=[BlockSpec((None, 128), lambda i, j: (i, j)),
                                      BlockSpec((None, None, 1), lambda i, j: (i, j, 0))])
    cpu, emu = emulated.both([x, np.full((3, 300), np.nan, np.float32), np.zeros((3, 3, 1), np.float32)], call)
    assert_bits(cpu[1], emu[1], "out")
    assert_bits(cpu[2], emu[2], "stats")
    np.testing.assert_array_equal(emu[1], np.where(x > 0, x, np.float32(0.5) * x))


def test_integer_semantics_casts_and_prefetch(emulated):
    """tests/test_jit.py's kernel: floor division/modulo, float -> int, casts to fp16/bf16/fp8, a prefetch ref."""
    a = np.arange(-20, 20, dtype=np.int32).reshape(5, 8)
    idx = np.array([4, 3, 2, 1, 0], np.int32)
    spec = BlockSpec((None, 8), lambda i, idx: (idx[i], 0))
    call = jit.pallas_call(int_casts_prefetch, grid=(5,), num_scalar_prefetch=1, in_specs=[spec], out_specs=[spec] * 4)
    cpu, emu = emulated.both([idx, a, np.zeros_like(a)] + [np.zeros((5, 8), np.float32) for _ in range(3)], call)
    for i in range(2, 6):
        assert_bits(cpu[i], emu[i], f"output {i}")
    np.testing.assert_array_equal(emu[2], a // 3 * 100 + a % 3)


def _convert(x_ref, h_ref, b_ref, f_ref, i_ref):
    x = x_ref[...]
    h_ref[...] = x
    b_ref[...] = x
    f_ref[...] = x
    i_ref[...] = jit.where(jit.abs(x) < 2e9, x, 0.0).astype(jit.int32)


def _widen(h_ref, b_ref, f_ref, oh_ref, ob_ref, of_ref):
    oh_ref[...] = h_ref[...]
    ob_ref[...] = b_ref[...]
    of_ref[...] = f_ref[...]


@pytest.mark.filterwarnings("ignore:overflow")
def test_conversions_bit_exact(emulated):
    """Stores round float32 to fp16/bf16/fp8/int32 and loads widen them as the interpreter does: every fp16 and
    bf16 value, the midpoints between neighbours and a hair either side, infinities, NaNs, random bit patterns."""
    rng = np.random.default_rng(SEED)
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    halves = halves[np.isfinite(halves)]
    up = np.nextafter(halves.astype(np.float16), np.float16(np.inf)).astype(np.float32)
    mid = (halves.astype(np.float64) + up) / 2
    bf = dtypes.bf16_bits_to_float32(np.arange(1 << 16, dtype=np.uint16))
    bf_mid = (bf.view(np.uint32) + np.uint32(0x8000)).view(np.float32)  # the tie above each bf16 value
    extra = np.array([np.inf, -np.inf, np.nan, -np.nan, 0.0, -0.0, 65504, 65519.99, 65520, 1e-8, 2 ** -25,
                      2 ** -25 * 1.0000001, 448, 464, 1e30, -1e30], np.float32)
    x = np.concatenate([halves, mid.astype(np.float32), np.nextafter(mid.astype(np.float32), np.float32(np.inf)),
                        np.nextafter(mid.astype(np.float32), -np.float32(np.inf)), bf, bf_mid, extra,
                        rng.integers(0, 2 ** 32, 1 << 16, dtype=np.uint64).astype(np.uint32).view(np.float32)])
    n = -(-x.size // 1024) * 1024
    x = np.concatenate([x, np.zeros(n - x.size, np.float32)]).reshape(-1, 1024)
    row = BlockSpec((None, 1024), lambda i: (i, 0))
    call = jit.pallas_call(_convert, grid=(x.shape[0],), in_specs=[row], out_specs=[row] * 4)
    outs = [np.zeros(x.shape, t) for t in (np.float16, np.uint16, np.uint8, np.int32)]
    cpu, emu = emulated.both([x, *outs], call)
    nan = np.isnan(x)
    assert_bits(np.isnan(cpu[1]), np.isnan(emu[1]), "fp16 NaNs")
    assert_bits(np.where(nan, 0, cpu[1]), np.where(nan, 0, emu[1]), "float32 -> fp16")
    for i, name in ((2, "bf16"), (3, "fp8 e4m3"), (4, "int32")):
        assert_bits(cpu[i], emu[i], f"float32 -> {name}")
    # and back: every fp16, bf16 and fp8 code widened to float32
    codes = np.arange(1 << 16, dtype=np.uint16).reshape(-1, 1024)
    fp8 = np.tile(np.arange(256, dtype=np.uint8), codes.size // 256).reshape(codes.shape)
    call = jit.pallas_call(_widen, grid=(codes.shape[0],), in_specs=[row] * 3, out_specs=[row] * 3)
    cpu, emu = emulated.both([codes.view(np.float16), codes, fp8] + [np.zeros(codes.shape, np.float32)] * 3, call)
    for i, name in ((3, "fp16"), (4, "bf16"), (5, "fp8 e4m3")):
        a, b = cpu[i], emu[i]
        assert_bits(np.isnan(a), np.isnan(b), f"{name} -> float32 NaNs")
        assert_bits(np.where(np.isnan(a), 0, a), np.where(np.isnan(b), 0, b), f"{name} -> float32")


def _tiles(x_ref, w_ref, o1_ref, o2_ref, o3_ref, sum_ref, max_ref, min_ref, *, scale, rows_of, cols_of):
    """Row tiles (R, C) over a ragged [M, N]: loads masked at the right edge, stores masked per element (a column
    pattern), per row and per program, and the three row reductions into (R, 1) blocks."""
    i, j = jit.program_id(0), jit.program_id(1)
    row = i * rows_of + jit.iota(0)                 # (R, 1)
    col = j * cols_of + jit.iota(1)                 # (1, C)
    inside = col < jit.dim(x_ref, 1)
    x = x_ref.load(mask=inside, other=0.0)
    y = x * w_ref.load(mask=inside, other=1.0) * scale
    o1_ref.store(y, mask=(col % 3) != 1)            # varies along columns: element stores
    o2_ref.store(y + 1.0, mask=(row % 2) == 0)      # one value per row: the chunk's guard
    o3_ref.store(y - 1.0, mask=j != 1)              # one value per program
    sum_ref[...] = jit.sum(x * x)
    max_ref[...] = jit.max(jit.where(inside, x, -1e30))
    min_ref[...] = jit.min(jit.where(inside, x, 1e30))


TILES = [  # M, N, R, C, threads
    (13, 200, 5, 96, 32),       # 12 chunks on 16 lanes, 2 rows a pass: 3 passes for 5 rows; ragged rows and columns
    (7, 3000, 3, 2048, 256),    # a row over 8 warps: reductions through shared memory, one row a pass
    (4, 4104, 2, 4096, 128),    # 512 chunks on 128 threads: 4 chunks a thread; the last column block one chunk
    (5, 1001, 4, 64, 64),       # odd width: no vector accesses; 8 rows a pass for 4 rows
    (9, 640, 3, 256, None),     # the default thread count
]


@pytest.mark.parametrize("dtype", list(STORAGE))
@pytest.mark.parametrize("m,n,r,c,nt", TILES)
def test_row_tiles(emulated, dtype, m, n, r, c, nt):
    rng = np.random.default_rng(SEED + n)
    x, w = stored(rng, (m, n), dtype), stored(rng, (n,), dtype)
    ncb = -(-n // c)
    outs = [np.full((m, n), 7, STORAGE[dtype]) for _ in range(3)] + [np.full((m, ncb, 1), 7, np.float32)
                                                                      for _ in range(3)]
    tile, col = BlockSpec((r, c), lambda i, j: (i, j)), BlockSpec((c,), lambda i, j: (j,))
    stat = BlockSpec((r, None, 1), lambda i, j: (i, j, 0))
    call = jit.pallas_call(functools.partial(_tiles, rows_of=r, cols_of=c), grid=(-(-m // r), ncb),
                           in_specs=[tile, col], out_specs=[tile] * 3 + [stat] * 3, num_threads=nt, name="tiles")
    cpu, emu = emulated.both([x, w, *outs], lambda *a: call(*a, scale=0.75))
    for i in (2, 3, 4):
        assert_bits(cpu[i], emu[i], f"masked store {i - 1}")
    assert_match(cpu[5], emu[5], "float32", "row sums", ulps=SUM_ULPS["float32"])
    assert_bits(cpu[6], emu[6], "row max")
    assert_bits(cpu[7], emu[7], "row min")


# --- the emulator itself, on hand-written CUDA ------------------------------------------------------------------

_SELF = r"""
extern "C" __global__ void __launch_bounds__(128)
probe(float *__restrict__ out, int n, const float *__restrict__ x, int nx, int mode) {
    __shared__ float buf[128];
    const int t = threadIdx.x, lane = t & 31;
    const float v = x[blockIdx.x * 128 + t];
    buf[t] = v;
    if (mode != 6) __syncthreads();            // mode 6: the barrier forgotten
    float *o = out + (blockIdx.x * 128 + t) * 6;
    o[0] = buf[127 - t];                       // another warp's value: needs the barrier
    float s = v;
    for (int k = 16; k > 0; k >>= 1) s += __shfl_xor_sync(0xffffffffu, s, k);
    o[1] = s;
    o[2] = __shfl_down_sync(0xffffffffu, v, 3);
    o[3] = __shfl_up_sync(0xffffffffu, v, 5, 16);
    o[4] = __shfl_sync(0xffffffffu, v, 31 - lane);
    o[5] = (float)(blockDim.x * 1000 + gridDim.x);
    if (mode == 1 && t < 64) __syncthreads();                     // divergent barrier
    if (mode == 2 && t == 5) out[-3] = 1.f;                       // a write just before the start
    if (mode == 3 && t == 5) out[n + 64] = 1.f;                   // ... into the guard page
    if (mode == 4 && t == 5) reinterpret_cast<uint4 *>(out + 1)[0] = make_uint4(0, 0, 0, 0);  // misaligned
    if (mode == 5 && lane < 16) s = __shfl_xor_sync(0xffffffffu, s, 1);  // half a warp
}
"""


def _probe(mode):
    x = np.random.default_rng(SEED).standard_normal(2 * 128).astype(np.float32)
    out = np.zeros(2 * 128 * 6, np.float32)
    host_cuda.run_source(_SELF, "probe", 128, 2, [out, np.int32(out.size), x, np.int32(x.size), np.int32(mode)])
    return x, out.reshape(2, 128, 6)


def test_emulator_barriers_and_shuffles():
    x, out = _probe(0)
    xb = x.reshape(2, 128)
    lane = np.arange(128) % 32
    np.testing.assert_array_equal(out[..., 0], xb[:, ::-1])
    np.testing.assert_allclose(out[..., 1], np.repeat(xb.reshape(2, 4, 32).sum(-1), 32, axis=1), rtol=1e-5)
    down = np.where(lane + 3 < 32, np.arange(128) + 3, np.arange(128)) % 128
    np.testing.assert_array_equal(out[..., 2], xb[:, down])
    up = np.where(lane % 16 >= 5, np.arange(128) - 5, np.arange(128))
    np.testing.assert_array_equal(out[..., 3], xb[:, up])
    np.testing.assert_array_equal(out[..., 4], xb[:, np.arange(128) - lane + 31 - lane])
    assert (out[..., 5] == 128 * 1000 + 2).all()


def test_emulator_exposes_a_missing_syncthreads():
    """Warps run in turn, forward in even blocks and backward in odd ones: without the barrier some warps read
    buf before the warp that writes it has run, in both blocks."""
    x, out = _probe(6)
    wrong = out[..., 0] != x.reshape(2, 128)[:, ::-1]
    assert wrong[0].sum() >= 64 and wrong[1].sum() >= 64


@pytest.mark.parametrize("mode,error,match", [
    (1, RuntimeError, r"__syncthreads reached by 64 of 128"),
    (2, AssertionError, r"wrote out of bounds of out float32\[1536\].*offsets \[-12"),
    (3, RuntimeError, r"SIGSEGV.*out float32\[1536\]: out of bounds"),
    (4, RuntimeError, r"16-byte vector store .* not 16-byte aligned"),
    (5, RuntimeError, r"__shfl_xor_sync reached by 16 of its 32 lanes"),
])
def test_emulator_reports_what_a_gpu_would_not(mode, error, match):
    with pytest.raises(error, match=match):
        _probe(mode)


# --- FP8 quantizers (issue #13): the generated ones are ops/quant's arithmetic, bit for bit -------------------

@pytest.mark.parametrize("dtype", list(STORAGE))
@pytest.mark.parametrize("h", [200, 896, 3584])
def test_fp8_quantizers(emulated, dtype, h):
    from ops import quant
    rng = np.random.default_rng(SEED + h)
    x, res, w = stored(rng, (5, h), dtype), stored(rng, (5, h), dtype), stored(rng, (h,), dtype)
    codes, scale = np.full((5, h), 3, np.uint8), np.full((5, 1), np.nan, np.float32)
    wide = (rng.standard_normal((7, h)) * rng.uniform(1e-3, 1e3, (7, 1))).astype(np.float32)
    wide[4] = 0.0
    cpu, emu = emulated.both([wide, codes[:1].repeat(7, 0), scale[:1].repeat(7, 0)], jit_ops.quantize_fp8)
    want_codes, want_scale = quant.quantize_rows(wide)
    for got in (cpu, emu):
        np.testing.assert_array_equal(got[1], want_codes)
        np.testing.assert_array_equal(got[2][:, 0], want_scale)
    normed, summed = np.zeros((5, h), STORAGE[dtype]), res.copy()
    emulated.mode = "interpret"  # the references: the interpreter's unfused kernels
    jit_ops.add_rms_norm(x, summed, w, 1e-6, normed)  # the unfused pair: what the fused kernel must quantize
    want = quant.quantize_rows(dtypes.to_float32(normed, dtypes.get(dtype)))
    cpu, emu = emulated.both([x, res, w, codes, scale],
                             lambda x, r, w, c, s: jit_ops.add_rms_norm_fp8(x, r, w, 1e-6, c, s))
    assert_bits(cpu[1], emu[1], "residual")
    assert_bits(cpu[1], summed, "residual (unfused)")
    assert_quantized(cpu[3:], want, exact=True)  # the interpreter: the unfused ops' arithmetic exactly
    assert_quantized(emu[3:], want, exact=dtype != "float32")
    gate_up, act = stored(rng, (5, 2 * h), dtype), np.zeros((5, h), STORAGE[dtype])
    emulated.mode = "interpret"
    jit_ops.silu_and_mul(gate_up, act)
    want = quant.quantize_rows(dtypes.to_float32(act, dtypes.get(dtype)))
    cpu, emu = emulated.both([gate_up, codes, scale], jit_ops.silu_and_mul_fp8)
    assert_quantized(cpu[1:], want, exact=True)
    assert_quantized(emu[1:], want, exact=dtype != "float32")


def assert_quantized(got, want, exact):
    """FP8 codes and scales equal to `want`'s; not `exact` (float32 storage, where glibc's expf and the reduction
    order move an unrounded value by an ulp): scales within 4 ulps, and a code off by at most one step, rarely."""
    (codes, scale), (want_codes, want_scale) = got, want
    if exact:
        np.testing.assert_array_equal(codes, want_codes)
        np.testing.assert_array_equal(scale[:, 0], want_scale)
        return
    np.testing.assert_allclose(scale[:, 0], want_scale, rtol=4 * 2.0 ** -23)
    step = np.abs(codes.astype(np.int16) - want_codes.astype(np.int16))
    assert step.max() <= 1 and (step > 0).mean() < 0.01, f"{(step > 0).sum()} codes differ, by up to {step.max()}"


@pytest.mark.parametrize("dtype", list(STORAGE))
@pytest.mark.parametrize("d,hq,hkv", [(64, 8, 2), (80, 8, 1), (128, 28, 4)])
def test_rope_writes_an_fp8_cache(emulated, dtype, d, hq, hkv):
    rng = np.random.default_rng(SEED + d)
    t, nb = 6, 2
    qkv = stored(rng, (t, (hq + 2 * hkv) * d), dtype)
    positions = rng.integers(0, 100, t).astype(np.int32)
    slots = rng.permutation(nb * 16)[:t].astype(np.int32)
    slots[1] = -1
    kv_scale = rng.uniform(0.05, 1.0, (2, hkv)).astype(np.float32)
    caches = [np.full((nb, hkv, 16, d), 5, np.uint8) for _ in range(2)]
    cpu, emu = emulated.both([qkv, positions, slots, *caches, reference.rope_cos_sin(d, 128, 1e4), kv_scale],
                             lambda q, p, s, k, v, cs, sc: jit_ops.rope_and_cache(q, p, s, k, v, cs, kv_scale=sc))
    assert_match(cpu[0], emu[0], dtype, "qkv")
    for i, what in ((3, "k_cache"), (4, "v_cache")):
        assert (cpu[i] != 5).any()  # something was written
        assert_bits(cpu[i], emu[i], what)  # no transcendental between load and store: the same codes
