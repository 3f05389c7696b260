"""The GPU side of structured outputs, checked on the CPU: ops/kernels/token_mask.cu compiles with nvcc for every
LOGIT_T without a warning, and runs (g++ and the emulator of tests/host_cuda.py) on parameter buffers that
ops/cuda/sampling.SamplingBuffers.load packed, against ops.sampling.apply_token_mask.

ops/cuda/sampling.py runs here on a stand-in for CuPy (numpy arrays as device memory, copies as memmove) with the
mask launches emulated and the sampler's launches only recorded: what load() copies (nothing more without a mask),
that sample() masks first, and that DecodeGraphs.run turns a stale mask off for a step that samples eagerly.
tests/gpu/test_token_mask.py holds the real thing to numpy on a GPU.
"""
from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from engine.sampling_params import SamplingParams
from ops.kernel_source import KERNEL_DIR, kernel_source
from ops.sampling import apply_token_mask
from ops.sampling_types import SamplingTensors
from tests import host_cuda, host_mma

NVCC = shutil.which("nvcc") or shutil.which("nvcc", path="/usr/local/cuda/bin")
SOURCE = KERNEL_DIR / "token_mask.cu"
LOGIT_TYPES = {"float32": "float", "float16": "half", "bfloat16": "__nv_bfloat16"}
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
NEG_INF = {"float32": 0xff800000, "float16": 0xfc00, "bfloat16": 0xff80}


def _variants() -> list[list[str]]:
    m = re.search(r"^//\s*nvcc-variants:(.*)$", SOURCE.read_text(), re.M)
    return [v.split() for v in m.group(1).split(";") if v.strip()]


def test_variants_cover_every_logit_type():
    assert sorted(d[0].split("=", 1)[1] for d in _variants()) == sorted(LOGIT_TYPES.values())


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
@pytest.mark.parametrize("defines", _variants(), ids=lambda d: d[0].split("=")[1])
def test_compiles_without_warnings_or_spills(defines, arch, tmp_path):
    alone = tmp_path / "token_mask.cu"  # as NVRTC gets it: headers pasted in
    alone.write_text(kernel_source("token_mask.cu"))
    cmd = [NVCC, f"-arch={arch}", "-std=c++17", "-Xptxas", "-v", "-Werror", "all-warnings", "-cubin",
           "-o", str(tmp_path / "k.cubin"), *defines, str(alone)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}"
    assert "warning" not in proc.stderr.lower(), proc.stderr
    assert not re.search(r"[1-9]\d* bytes spill", proc.stderr), proc.stderr
    assert "0 bytes stack frame" in proc.stderr, proc.stderr


# ---- a stand-in for CuPy, enough for ops/cuda/sampling.py and DecodeGraphs.run
DevArray, _dev = host_mma.DevArray, host_mma.dev


class FakeCuda:
    """Records every copy and launch in order: ("copy", bytes), ("memset", offset in params), (kernel name, ...)."""

    def __init__(self, sms: int = 132):
        self.log: list[tuple] = []
        self.sms = sms
        self.kernels: dict[str, "FakeKernel"] = {}
        cp = types.ModuleType("cupy")
        cp.ndarray = DevArray
        cp.zeros = lambda shape, dtype=float: _dev(np.zeros(shape, dtype))
        cp.empty = lambda shape, dtype=float: _dev(np.zeros(shape, dtype))
        cp.full = lambda shape, value, dtype=float: _dev(np.full(shape, value, dtype))
        cp.asarray = lambda a: _dev(np.array(a))
        cp.asnumpy = lambda a: np.array(np.asarray(a).view(np.ndarray))
        cuda = types.SimpleNamespace()
        cuda.alloc_pinned_memory = host_mma._pinned
        cuda.Event = _Event
        cuda.get_current_stream = lambda: types.SimpleNamespace(ptr=0)
        cuda.Device = lambda i=0: types.SimpleNamespace(attributes={"MultiProcessorCount": self.sms})
        runtime = types.SimpleNamespace(memcpyHostToDevice=1, memcpyDeviceToHost=2)
        runtime.memcpyAsync = self._memcpy
        runtime.memsetAsync = self._memset
        cuda.runtime = runtime
        cp.cuda = cuda
        self.cp = cp

    def _memcpy(self, dst, src, n, kind, stream):
        ctypes.memmove(dst, src, n)
        self.log.append(("copy", n))

    def _memset(self, ptr, value, n, stream):
        ctypes.memset(ptr, value, n)
        self.log.append(("memset", ptr, n))

    def get_kernel(self, filename, name, **defines):
        key = f"{filename}:{name}:{sorted(defines.items())}"
        if key not in self.kernels:
            self.kernels[key] = FakeKernel(self, filename, name, defines)
        return self.kernels[key]


class _Event:
    def __init__(self, disable_timing=False):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


WRAPPER = r"""
extern "C" __global__ void __launch_bounds__(256) emu_token_mask(LOGIT_T* logits, int V, int vec,
                                                                 const unsigned char* params, int per_row) {
  // the emulator runs a 1-D grid: block b is (b % per_row, b / per_row); a block's threads run one after another
  const unsigned b = blockIdx.x, g = gridDim.x;
  blockIdx.x = b % per_row; blockIdx.y = b / per_row; gridDim.x = per_row;
  token_mask_kernel(logits, V, vec, params);
  blockIdx.x = b; blockIdx.y = 0; gridDim.x = g;
}
"""
HOST_TYPES = "struct __half { unsigned short x; };\ntypedef __half half;\nstruct __nv_bfloat16 { unsigned short x; };\n"


def emulated_source(logit_t: str) -> str:
    source = kernel_source("token_mask.cu")
    source = re.sub(r"^#include <cuda_(fp16|bf16)\.h>\n", "", source, flags=re.M)
    return f"#define LOGIT_T {logit_t}\n" + HOST_TYPES + source + WRAPPER


class FakeKernel:
    def __init__(self, fake, filename, name, defines):
        self.fake, self.filename, self.name, self.defines = fake, filename, name, defines
        self.max_dynamic_shared_size_bytes = 0

    def __call__(self, grid, block, args, shared_mem=0):
        self.fake.log.append((self.name, tuple(grid), tuple(block), args[0].ctypes.data))
        if self.name != "token_mask_kernel":
            return  # the sampler runs on a GPU only (tests/gpu/test_sampling.py)
        logits, vocab, vec, params = args
        assert block == (256,) and grid[1] == logits.shape[0]
        plain = lambda a: a.view(np.ndarray)  # noqa: E731
        host_cuda.run_source(emulated_source(self.defines["LOGIT_T"]), "emu_token_mask", 256, grid[0] * grid[1],
                             [plain(logits), vocab, vec, plain(params), np.int32(grid[0])])


skip_no_host = pytest.mark.skipif(not host_cuda.available(), reason="no g++ (or not Linux): cannot emulate CUDA C")


@pytest.fixture
def fake(monkeypatch):
    """ops.cuda.sampling (and graphs.manager's use of it) imported against FakeCuda; sys.modules restored after."""
    f = FakeCuda()
    monkeypatch.setitem(sys.modules, "cupy", f.cp)
    package = types.ModuleType("ops.cuda")  # not ops/cuda/__init__.py: the whole backend would need CuPy
    package.__path__ = [str(Path(KERNEL_DIR).parent / "cuda")]
    monkeypatch.setitem(sys.modules, "ops.cuda", package)
    compile_stub = types.ModuleType("ops.cuda.compile")
    compile_stub.get_kernel = f.get_kernel
    compile_stub.cuda_type = lambda dtype: {np.dtype(np.float32): "float", np.dtype(np.float16): "half",
                                            np.dtype(np.uint16): "__nv_bfloat16"}[np.dtype(dtype)]
    monkeypatch.setitem(sys.modules, "ops.cuda.compile", compile_stub)
    spec = importlib.util.spec_from_file_location("ops.cuda.sampling", package.__path__[0] + "/sampling.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "ops.cuda.sampling", module)
    spec.loader.exec_module(module)
    package.sampling = module
    f.sampling = module
    return f


def tensors(rng, batch: int, vocab: int, mask=None, logprobs=None, history=0) -> SamplingTensors:
    rows = [(SamplingParams(temperature=float(rng.choice([0.0, 1.0])), logprobs=logprobs,
                            repetition_penalty=1.2 if history else 1.0),
             rng.integers(0, vocab, history).tolist(), [], int(rng.integers(0, 2**63)), []) for _ in range(batch)]
    return SamplingTensors.build(rows, vocab, mask)


def random_mask(rng, batch: int, vocab: int) -> np.ndarray:
    """Row kinds in turn: all ones (no grammar), one allowed token, sparse, dense random bits, one word's worth."""
    words = -(-vocab // 32)
    mask = np.zeros((batch, words), np.int32)
    for i in range(batch):
        kind = i % 5
        if kind == 0:
            mask[i] = -1
        elif kind == 1:
            tok = int(rng.integers(vocab)) if i > 1 else vocab - 1  # the last token, in the partial word
            mask[i, tok >> 5] = np.int32(np.uint32(1 << (tok & 31)).view(np.int32))
        elif kind == 2:
            for tok in rng.choice(vocab, min(40, vocab), replace=False):
                mask[i, tok >> 5] |= np.uint32(1 << (int(tok) & 31)).view(np.int32)
        elif kind == 3:
            mask[i] = rng.integers(-2**31, 2**31, words, dtype=np.int64).astype(np.int32)
        else:
            mask[i, int(rng.integers(words))] = -1
    return mask


def as_float(stored: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)


def store(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # truncation is fine: only the bits of the stored values matter here
        return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return values.astype(STORAGE[dtype])


@skip_no_host
@pytest.mark.parametrize("dtype", list(LOGIT_TYPES))
@pytest.mark.parametrize("vocab", [1003, 4096, 152064])
def test_emulated_kernel_matches_numpy_on_loaded_buffers(fake, dtype, vocab, rng):
    sampling = fake.sampling
    max_batch, batch = 8, 6  # two rows of padding past the loaded batch
    buffers = sampling.SamplingBuffers(max_batch, vocab, max_history=16, max_bias=4)
    mask = random_mask(rng, batch, vocab)
    t = tensors(rng, batch, vocab, mask, history=5)  # tables before the mask: its offset is not the first
    stored = store(rng.standard_normal((max_batch, vocab), dtype=np.float32), dtype)
    logits = _dev(stored.copy())
    buffers.load(t)
    sampling.apply_token_mask(logits, buffers)
    want = as_float(stored, dtype)
    apply_token_mask(want[:batch], mask)
    got = logits.view(np.ndarray)
    np.testing.assert_array_equal(as_float(got, dtype), want)
    np.testing.assert_array_equal(got[batch:], stored[batch:])  # padding rows untouched
    bits = got[:batch].view({4: np.uint32, 2: np.uint16}[got.itemsize])
    assert ((bits == NEG_INF[dtype]) == np.isneginf(want[:batch])).all()  # -inf exactly, in the storage format
    launches = [e for e in fake.log if e[0] == "token_mask_kernel"]
    assert launches[-1][1] == sampling.mask_grid(max_batch, vocab, fake.sms)

    # a load without a mask: the same launch (as a graph replays it) changes nothing
    again = _dev(stored.copy())
    buffers.load(tensors(rng, batch, vocab))
    sampling.apply_token_mask(again, buffers)
    np.testing.assert_array_equal(again.view(np.ndarray), stored)


@skip_no_host
def test_unaligned_logits_take_the_scalar_path(fake, rng):
    # V % 8 == 0 but the rows start 4 bytes off 16: vec is off, every store is a scalar one (a misaligned vector
    # store fails the emulated launch)
    sampling, vocab = fake.sampling, 512
    buffers = sampling.SamplingBuffers(4, vocab, max_history=0, max_bias=0)
    mask = random_mask(rng, 4, vocab)
    base = np.zeros(4 * vocab + 1, np.float32)
    stored = rng.standard_normal((4, vocab), dtype=np.float32)
    view = base[1:].reshape(4, vocab).view(DevArray)
    view[:] = stored
    assert view.ctypes.data % 16 != 0
    buffers.load(tensors(rng, 4, vocab, mask))
    sampling.apply_token_mask(view, buffers)
    want = stored.copy()
    apply_token_mask(want, mask)
    np.testing.assert_array_equal(view.view(np.ndarray), want)


def test_load_copies_the_mask_only_when_there_is_one(fake, rng):
    sampling, vocab, batch = fake.sampling, 1003, 5
    buffers = sampling.SamplingBuffers(8, vocab, max_history=16, max_bias=4)
    words = buffers.mask_words
    assert words == 32
    t = tensors(rng, batch, vocab, history=3)
    used = t.prompt_token_ids.size + t.output_token_ids.size + 2 * t.logit_bias_ids.size
    buffers.load(t)
    header = buffers.params.view(np.ndarray)[:64].view(np.int32)
    assert fake.log[-1] == ("copy", buffers.table_offset + 4 * used) and header[5] == 0 and not buffers.masked
    mask = random_mask(rng, batch, vocab)
    buffers.load(tensors(rng, batch, vocab, mask, history=3))
    offset = int(header[5])
    assert offset % 16 == 0 and offset >= buffers.table_offset + 4 * used and buffers.masked
    assert fake.log[-1] == ("copy", offset + 4 * batch * words)
    np.testing.assert_array_equal(buffers.params.view(np.ndarray)[offset:offset + 4 * mask.size].view(np.int32),
                                  mask.reshape(-1))
    # the largest load fits: full tables and every row masked
    full = buffers.table_offset + 4 * 8 * (16 + 2 * 4) + 16 + 4 * 8 * words
    assert buffers.nbytes >= full
    buffers.load(tensors(rng, batch, vocab))  # and off again, in the header of the same copy
    assert header[5] == 0 and not buffers.masked
    with pytest.raises(ValueError, match=r"token_mask has shape \(5, 31\).*\[5, 32\]"):
        buffers.load(tensors(rng, batch, vocab, np.zeros((batch, 31), np.int32)))


def test_clear_mask_is_one_stream_ordered_memset(fake, rng):
    sampling, vocab = fake.sampling, 1003
    buffers = sampling.SamplingBuffers(4, vocab, max_history=0, max_bias=0)
    buffers.clear_mask()
    assert not fake.log  # nothing loaded with a mask: nothing to do
    buffers.load(tensors(rng, 2, vocab, random_mask(rng, 2, vocab)))
    buffers.clear_mask()
    assert fake.log[-1] == ("memset", buffers.params.data.ptr + 20, 4)
    assert buffers.params.view(np.ndarray)[:64].view(np.int32)[5] == 0 and not buffers.masked


def test_sample_masks_before_the_sampler(fake, rng):
    sampling, vocab = fake.sampling, 1003
    buffers = sampling.SamplingBuffers(4, vocab, max_history=0, max_bias=0)
    logits = _dev(np.zeros((4, vocab), np.float32))
    ids = _dev(np.zeros(4, np.int32))
    buffers.load(tensors(rng, 4, vocab))
    fake.log.clear()
    sampling.sample(logits, buffers, ids)  # the graph form masks always: a replay may follow a masked load
    assert [e[0] for e in fake.log] == ["token_mask_kernel", "sample_kernel"]
    assert fake.log[0][3] == fake.log[1][3] == logits.ctypes.data
    # the eager form launches the mask kernel only where its tensors carry a mask
    fake.log.clear()
    sampling.sample(logits, tensors(rng, 4, vocab))
    assert [e[0] for e in fake.log if e[0] != "copy"] == ["sample_kernel"]
    fake.log.clear()
    sampling.sample(logits, tensors(rng, 4, vocab, random_mask(rng, 4, vocab)))
    assert [e[0] for e in fake.log if e[0] != "copy"] == ["token_mask_kernel", "sample_kernel"]
    with pytest.raises(ValueError, match="logits has shape"):
        sampling.apply_token_mask(_dev(np.zeros((4, vocab + 1), np.float32)), buffers)


def test_mask_grid(fake):
    # about 4 CTAs per SM over the rows, at least one a row, at most one per 256 mask bytes (a row's whole width)
    grid = fake.sampling.mask_grid
    assert grid(1, 152064, 132) == (75, 1)
    assert grid(256, 152064, 132) == (3, 256)
    assert grid(1024, 152064, 132) == (1, 1024)
    assert grid(4, 1003, 132) == (1, 4)


def _fake_graphs(fake, rng, vocab: int, size: int):
    """A DecodeGraphs of one size on the fake device, whose graph writes fixed random logits then samples them from
    its buffers, as the captured _forward does; the backend's sampling is ops.cuda.sampling's (CudaBackend's)."""
    from graphs import manager
    sampling = fake.sampling
    g = manager.DecodeGraphs.__new__(manager.DecodeGraphs)
    g.cp, g.sizes, g.query_len = fake.cp, [size], 1
    g.backend = types.SimpleNamespace(sample=sampling.sample,
                                      sample_into=lambda logits, buffers, out: sampling.sample(logits, buffers, out))
    g.sampling_buffers = sampling.SamplingBuffers(size, vocab, max_history=0, max_bias=0)
    g.sampled = _dev(np.zeros(size, np.int32))
    g.logits = {size: _dev(np.zeros((size, vocab), np.float32))}
    g.steps = g.steps_sampled_in_graph = 0
    g._stage = lambda *args: None
    raw = rng.standard_normal((size, vocab), dtype=np.float32)

    class Graph:
        def launch(self, stream):
            g.logits[size][:] = raw
            sampling.sample(g.logits[size], g.sampling_buffers, g.sampled)

    g.graphs = {size: Graph()}
    return g, raw, types.SimpleNamespace(seq_lens=np.zeros(3, np.int32))


@skip_no_host
def test_decode_graphs_late_mask_samples_as_a_mask_loaded_before(fake, rng):
    """run(late_mask=f): f is called after the launch (the step in flight lands meanwhile), then the parameters and
    f's mask are loaded and the mask and sampler kernels run on the graph's logits, which end up masked exactly
    by f's mask (the graph's own sampler ran with the older step's mask switched off)."""
    g, raw, meta = _fake_graphs(fake, rng, vocab := 1003, size := 4)
    ids = np.zeros(3, np.int32)
    mask = random_mask(rng, 3, vocab)
    t = tensors(rng, 3, vocab)
    g.run(ids, ids, meta, tensors(rng, 3, vocab, random_mask(rng, 3, vocab)))  # an older step's mask, loaded
    before = g.run(ids, ids, meta, dataclasses.replace(t, token_mask=mask))
    calls = []

    def late():
        calls.append((g.steps, len(fake.log)))  # the graph was launched already
        return mask
    after = g.run(ids, ids, meta, t, late_mask=late)
    assert [c[0] for c in calls] == [3] and g.steps_sampled_in_graph == 2  # sampled after the graph, not in it
    # after f: one load (parameters and mask in one copy), then the mask and the sampler on the graph's logits
    late_ops = fake.log[calls[0][1]:]
    assert [e[0] for e in late_ops] == ["copy", "token_mask_kernel", "sample_kernel"]
    assert late_ops[1][3] == late_ops[2][3] == g.logits[size].ctypes.data
    np.testing.assert_array_equal(after.token_ids, before.token_ids)
    want = raw.copy()
    apply_token_mask(want[:3], mask)
    np.testing.assert_array_equal(g.logits[size].view(np.ndarray)[:3], want[:3])


@skip_no_host
def test_decode_graphs_run_turns_a_stale_mask_off_for_an_eager_step(fake, rng):
    """run(): a masked step samples in the graph (its load carries the mask, the replay applies it); a step that
    samples eagerly (logprobs) must not have the graph mask its logits with the older step's mask."""
    g, raw, meta = _fake_graphs(fake, rng, vocab := 1003, size := 4)
    ids = np.zeros(3, np.int32)
    mask = random_mask(rng, 3, vocab)
    g.run(ids, ids, meta, tensors(rng, 3, vocab, mask))
    assert g.steps_sampled_in_graph == 1  # a mask does not send the step out of the graph
    want = raw.copy()
    apply_token_mask(want[:3], mask)
    np.testing.assert_array_equal(g.logits[size].view(np.ndarray), want)
    g.run(ids, ids, meta, tensors(rng, 3, vocab, logprobs=2))  # eager sampling, no mask
    assert g.steps_sampled_in_graph == 1
    np.testing.assert_array_equal(g.logits[size].view(np.ndarray), raw)
    g.run(ids, ids, meta, tensors(rng, 3, vocab, mask, logprobs=2))  # eager sampling masks the graph's logits
    np.testing.assert_array_equal(g.logits[size].view(np.ndarray)[:3], want[:3])
    np.testing.assert_array_equal(g.logits[size].view(np.ndarray)[3:], raw[3:])
