"""perf/step_floor.py: weight bytes match Qwen2.5-7B's real parameter count, KV bytes scale linearly,
and the floor is never below bytes / bandwidth.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN_7B = os.path.join(REPO, "perf", "configs", "qwen2.5-7b")
_spec = importlib.util.spec_from_file_location("step_floor", os.path.join(REPO, "perf", "step_floor.py"))
sf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sf)


@pytest.fixture(scope="module")
def raw():
    with open(os.path.join(QWEN_7B, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def cfg():
    return sf.ModelConfig.from_pretrained(QWEN_7B)


def _independent_params(raw):
    h, i, layers, v = raw["hidden_size"], raw["intermediate_size"], raw["num_hidden_layers"], raw["vocab_size"]
    hq, hkv = raw["num_attention_heads"], raw["num_key_value_heads"]
    d = h // hq
    attn = h * hq * d + hq * d + 2 * (h * hkv * d + hkv * d) + hq * d * h  # q, k, v with bias; o
    mlp = 3 * h * i  # gate, up, down
    layer = attn + mlp + 2 * h  # two RMSNorms
    return layers * layer + h + v * h * (1 if raw["tie_word_embeddings"] else 2)  # final norm, embed, head


def test_param_count_matches_config(raw, cfg):
    expected = _independent_params(raw)
    assert 7.6e9 < expected < 7.7e9  # Qwen2.5-7B: 7.61e9 parameters
    assert sf.param_count(cfg) == expected
    assert expected * 2 / 1e9 == pytest.approx(15.23, abs=0.01)  # GPU.md's fp16 weight bytes


def test_weight_bytes_read_skips_all_but_n_embedding_rows(raw, cfg):
    h, v = raw["hidden_size"], raw["vocab_size"]
    for n in (1, 16, 256):
        r = sf.step_costs(cfg, n, dtype_bytes=2)
        expected = (_independent_params(raw) - v * h + n * h) * 2
        assert r["weights_gb"] * 1e9 == pytest.approx(expected, rel=1e-12)
    # At batch 1 the weight stream alone bounds the step at about 4.73 ms (211 tok/s): below GPU.md's
    # 196 tok/s, which counted the full embedding table as read.
    r1 = sf.step_costs(cfg, 1)
    assert r1["floor_tok_s"] > 196


def test_kv_read_linear_in_n_and_context(raw, cfg):
    base = sf.step_costs(cfg, 1, input_len=32, output_len=512)
    for n in (2, 16, 128, 256):
        assert sf.step_costs(cfg, n)["kv_read_gb"] == pytest.approx(n * base["kv_read_gb"], rel=1e-12)
    short = sf.step_costs(cfg, 8, input_len=0, output_len=99)  # avg context 50
    long = sf.step_costs(cfg, 8, input_len=50, output_len=199)  # avg context 150
    assert short["avg_context"] == 50 and long["avg_context"] == 150
    assert long["kv_read_gb"] == pytest.approx(3 * short["kv_read_gb"], rel=1e-12)
    per_token = raw["num_hidden_layers"] * 2 * raw["num_key_value_heads"] * raw["hidden_size"] // raw[
        "num_attention_heads"] * 2
    assert short["kv_read_gb"] * 1e9 == pytest.approx(8 * 50 * per_token, rel=1e-12)
    assert short["kv_write_gb"] * 1e9 == pytest.approx(8 * per_token, rel=1e-12)


def test_floor_not_below_bytes_over_bw(cfg):
    for n in sf.DEFAULT_N:
        r = sf.step_costs(cfg, n)
        assert r["floor_ms"] >= r["total_gb"] * 1e9 / sf.BW * 1e3 * (1 - 1e-12)
        assert r["floor_ms"] >= r["flops_t"] * 1e12 / sf.PEAK * 1e3 * (1 - 1e-12)
        assert r["sum_ms"] >= r["floor_ms"]
        assert r["floor_tok_s"] == pytest.approx(n / r["floor_ms"] * 1e3)
        if n in sf.GEMM_MS_7B:
            assert r["practical_ms"] == pytest.approx(sf.GEMM_MS_7B[n] + r["kv_read_gb"] * 1e9 / sf.BW * 1e3)
        else:
            assert r["practical_ms"] is None


def test_main_writes_json(tmp_path, capsys):
    out = tmp_path / "floor.jsonl"
    assert sf.main([QWEN_7B, "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["n"] for r in rows] == list(sf.DEFAULT_N)
    for r in rows:
        assert r["bench"] == "step_floor" and r["model"] == "qwen2.5-7b"
        assert {"weights_gb", "kv_read_gb", "flops_t", "floor_ms", "floor_tok_s", "target_step_ms"} <= set(r)
    assert "floor_ms" not in capsys.readouterr().err
