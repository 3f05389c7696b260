"""Tests for engine/loader.py: reading weights (finding a model: tests/test_model_hub.py).
Checkpoints come from torch, transformers and engine.safetensors; every error names file and tensor."""
from __future__ import annotations

import json
import mmap
import struct
import tracemalloc

import numpy as np
import pytest

from engine.loader import CheckpointWeights, WeightsError
from engine.safetensors import float32_to_bf16_bits, save_file

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture
def rng():
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed={seed}")
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def write_raw(path, header: dict, data: bytes, header_len: int | None = None) -> None:
    """A safetensors file byte by byte, so tests can make it wrong on purpose."""
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)


def torch_checkpoint(dir_path, rng) -> dict:
    tensors = {
        "w.f32": torch.from_numpy(rng.standard_normal((5, 7), dtype=np.float32)),
        "w.f16": torch.from_numpy(rng.standard_normal((3, 4, 2), dtype=np.float32)).half(),
        "w.bf16": torch.from_numpy(rng.standard_normal((6, 3), dtype=np.float32)).bfloat16(),
        "w.scalar": torch.tensor(rng.standard_normal(), dtype=torch.bfloat16),
    }
    safetensors_torch.save_file(tensors, str(dir_path / "model.safetensors"))
    return tensors


# ---- values ---------------------------------------------------------------------------------------

def test_values_equal_what_torch_wrote(tmp_path, rng):
    tensors = torch_checkpoint(tmp_path, rng)
    with CheckpointWeights(tmp_path) as weights:
        assert sorted(weights.names()) == sorted(tensors)
        for name, t in tensors.items():
            got = weights.get(name)
            assert got.dtype == np.float32 and got.shape == tuple(t.shape)
            np.testing.assert_array_equal(got, t.float().numpy())
            path, dtype, shape = weights.info(name)
            assert path == str(tmp_path / "model.safetensors") and shape == tuple(t.shape)
        assert weights.get_raw("w.f16")[1] == "F16"
        np.testing.assert_array_equal(weights.get_raw("w.f16")[0], tensors["w.f16"].numpy())
        bits, dtype = weights.get_raw("w.bf16")
        assert dtype == "BF16" and bits.dtype == np.uint16
        np.testing.assert_array_equal(bits, tensors["w.bf16"].view(torch.int16).numpy().view(np.uint16))


def test_engine_bf16_bits_read_back_as_torch_rounds(tmp_path, rng):
    x = rng.standard_normal((9, 11), dtype=np.float32) * 100
    save_file({"x": float32_to_bf16_bits(x), "y": x}, str(tmp_path / "a.safetensors"), dtypes={"x": "BF16"})
    with CheckpointWeights(tmp_path) as weights:
        np.testing.assert_array_equal(weights.get("x"), torch.from_numpy(x).bfloat16().float().numpy())
        np.testing.assert_array_equal(weights.get("y"), x)


def test_reads_through_a_memory_map_not_the_whole_file(tmp_path, rng):
    big = rng.standard_normal((2048, 2048), dtype=np.float32)  # 16 MiB that must not be read
    small = rng.standard_normal((4, 8), dtype=np.float32)
    save_file({"big": big, "small": small}, str(tmp_path / "model.safetensors"))
    tracemalloc.start()
    try:
        weights = CheckpointWeights(tmp_path)
        raw, _ = weights.get_raw("small")
        np.testing.assert_array_equal(weights.get("small"), small)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < big.nbytes // 16, f"opening and reading one small tensor allocated {peak} bytes"
    base = raw
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, (mmap.mmap, memoryview)) and not raw.flags.writeable
    assert np.shares_memory(raw, weights.get_raw("small")[0])
    copy = weights.get("small")
    assert copy.flags.writeable and not np.shares_memory(copy, raw)
    weights.close()
    np.testing.assert_array_equal(raw, small)  # views handed out stay valid after close
    with pytest.raises(WeightsError, match="small"):
        weights.get("small")


def test_sharded_transformers_checkpoint(tmp_path, rng):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True)
    model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():  # norms start at exactly 1: make every tensor distinctive
        for p in model.parameters():
            p.normal_()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1 and not (tmp_path / "model.safetensors").exists()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to embed_tokens
    with CheckpointWeights(tmp_path) as weights:
        assert set(state) <= set(weights.names())
        weights.check({name: tuple(t.shape) for name, t in state.items()})
        for name, t in state.items():
            path, dtype, _ = weights.info(name)
            assert path == str(tmp_path / index[name]) and dtype == "BF16"
            np.testing.assert_array_equal(weights.get(name), t.float().numpy())


def test_loose_files_without_index_are_all_read(tmp_path, rng):
    a, b = rng.standard_normal(3, dtype=np.float32), rng.standard_normal(5, dtype=np.float32)
    save_file({"a": a}, str(tmp_path / "part-a.safetensors"))
    save_file({"b": b.astype(np.float16)}, str(tmp_path / "part-b.safetensors"))
    with CheckpointWeights(tmp_path) as weights:
        assert sorted(weights.names()) == ["a", "b"]
        np.testing.assert_array_equal(weights.get("b"), b.astype(np.float16).astype(np.float32))


# ---- broken checkpoints ---------------------------------------------------------------------------

def test_truncated_file(tmp_path, rng):
    path = tmp_path / "model.safetensors"
    save_file({"first": rng.standard_normal(64, dtype=np.float32),
               "last": rng.standard_normal(64, dtype=np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(WeightsError) as e:
        CheckpointWeights(tmp_path)
    assert str(path) in str(e.value) and "'last'" in str(e.value) and "truncated" in str(e.value)


def test_corrupt_header(tmp_path):
    path = tmp_path / "model.safetensors"
    garbage = b'{"w": {"dtype": "F32", "sha'
    path.write_bytes(struct.pack("<Q", len(garbage)) + garbage + b"\0" * 16)
    with pytest.raises(WeightsError) as e:
        CheckpointWeights(tmp_path)
    assert str(path) in str(e.value) and "JSON" in str(e.value)


def test_header_length_larger_than_file(tmp_path):
    path = tmp_path / "model.safetensors"
    header = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    write_raw(path, header, b"\0" * 4, header_len=1 << 20)
    with pytest.raises(WeightsError) as e:
        CheckpointWeights(tmp_path)
    assert str(path) in str(e.value) and str(1 << 20) in str(e.value)


def test_offsets_disagree_with_shape(tmp_path):
    path = tmp_path / "model.safetensors"
    write_raw(path, {"layer.w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\0" * 16)
    with pytest.raises(WeightsError) as e:
        CheckpointWeights(tmp_path)
    assert str(path) in str(e.value) and "'layer.w'" in str(e.value) and "16 bytes" in str(e.value)


def test_check_reports_missing_and_wrong_shapes_at_once(tmp_path, rng):
    path = tmp_path / "model.safetensors"
    save_file({"embed": rng.standard_normal((10, 4), dtype=np.float32),
               "norm": rng.standard_normal(4, dtype=np.float32),
               "lm_head.weight": rng.standard_normal((10, 4), dtype=np.float32)}, str(path))
    with CheckpointWeights(tmp_path) as weights:
        weights.check({"embed": (10, 4), "norm": (4,)})  # tied lm_head.weight left over: fine
        with pytest.raises(WeightsError) as e:
            weights.check({"embed": (10, 4), "norm": (8,), "layers.0.q": (4, 4), "layers.0.k": (2, 4)})
    msg = str(e.value)
    assert "2 missing" in msg and "layers.0.q" in msg and "layers.0.k" in msg
    assert f"searched {path}" in msg
    assert f"{path}: tensor 'norm' has shape [4], expected [8]" in msg
    assert "'embed'" not in msg


def test_missing_shard(tmp_path, rng):
    first = tmp_path / "model-00001-of-00002.safetensors"
    save_file({"a": rng.standard_normal(3, dtype=np.float32)}, str(first))
    weight_map = {"a": first.name, "b.weight": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(WeightsError) as e:
        CheckpointWeights(tmp_path)
    assert str(tmp_path / "model-00002-of-00002.safetensors") in str(e.value) and "'b.weight'" in str(e.value)
    assert "model-00001" not in str(e.value)


def test_index_names_a_tensor_its_shard_lacks(tmp_path, rng):
    shard = tmp_path / "model-00001-of-00001.safetensors"
    save_file({"a": rng.standard_normal(3, dtype=np.float32)}, str(shard))
    weight_map = {"a": shard.name, "b": shard.name}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(WeightsError) as e:
        CheckpointWeights(tmp_path)
    assert str(shard) in str(e.value) and "'b'" in str(e.value)


def test_same_tensor_in_two_files(tmp_path, rng):
    for name in ("x.safetensors", "y.safetensors"):
        save_file({"dup": rng.standard_normal(2, dtype=np.float32)}, str(tmp_path / name))
    with pytest.raises(WeightsError) as e:
        CheckpointWeights(tmp_path)
    msg = str(e.value)
    assert "'dup'" in msg and str(tmp_path / "x.safetensors") in msg and str(tmp_path / "y.safetensors") in msg


def test_integer_weight_is_refused(tmp_path, rng):
    path = tmp_path / "model.safetensors"
    save_file({"ok": rng.standard_normal(4, dtype=np.float32),
               "ids": rng.integers(-9, 9, size=(2, 4), dtype=np.int32)}, str(path))
    with CheckpointWeights(tmp_path) as weights:
        assert weights.info("ids") == (str(path), "I32", (2, 4))
        for read in (weights.get, weights.get_raw):
            with pytest.raises(WeightsError) as e:
                read("ids")
            msg = str(e.value)
            assert f"{path}: tensor 'ids' has dtype I32" in msg and "F32, F16, BF16" in msg
        with pytest.raises(WeightsError, match="'ids' has dtype I32"):
            weights.check({"ok": (4,), "ids": (2, 4)})


def test_unknown_tensor_names_the_files_searched(tmp_path, rng):
    save_file({"a": rng.standard_normal(2, dtype=np.float32)}, str(tmp_path / "model.safetensors"))
    with CheckpointWeights(tmp_path) as weights, pytest.raises(WeightsError) as e:
        weights.get("model.norm.weight")
    assert "'model.norm.weight'" in str(e.value) and str(tmp_path / "model.safetensors") in str(e.value)


def test_only_safetensors_are_supported(tmp_path):
    with pytest.raises(WeightsError) as e:
        CheckpointWeights(tmp_path)
    assert str(tmp_path) in str(e.value) and "only loads safetensors" in str(e.value)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02 pickle")
    with pytest.raises(WeightsError) as e:
        CheckpointWeights(tmp_path)
    assert "pytorch_model.bin" in str(e.value) and "save_pretrained" in str(e.value)
