"""`cupyllm benchmark` on the CPU: dummy weights from a config.json alone, no tokenizer, one JSON line per N."""
from __future__ import annotations

import json

from api.cli import main

TINY = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def test_benchmark_with_dummy_weights_and_no_tokenizer(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    out = tmp_path / "bench.jsonl"
    rc = main(["benchmark", "--model", str(tmp_path), "--load-format", "dummy", "--n", "1,3", "--input-len", "9",
               "--output-len", "7", "--device", "numpy", "--json", str(out), "--no-history"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["n"] for r in rows] == [1, 3]
    for r in rows:
        assert r["output_tokens"] == r["n"] * 7, "every request makes exactly output-len tokens (ignore_eos)"
        assert r["tok_s"] > 0 and r["ttft_ms"] > 0 and r["step_ms_p95"] >= r["step_ms_p50"] > 0
        assert r["card"] == "cpu" and r["bench"] == "engine_benchmark" and "--load-format dummy" in r["command"]
        # process start (here: pytest's) to the first token, and this process's resident memory
        assert r["cold_start_first_token_s"] > 0 and r["rss_peak_mib"] >= r["rss_mib"] > 10
        assert "gpu_memory_mib" not in r  # the numpy backend has no GPU memory to report
    assert "tok/s" in capsys.readouterr().out


def test_dummy_weights_are_seeded(tmp_path):
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    make = lambda seed: LLMEngine(EngineConfig(model=str(tmp_path), device="numpy", load_format="dummy",  # noqa: E731
                                               skip_tokenizer_init=True, seed=seed, max_model_len=64))
    a, b, c = make(1), make(1), make(2)
    wa, wb, wc = (e.runner.model.layers[1].gate_up for e in (a, b, c))
    assert (wa == wb).all() and not (wa == wc).all()
    out = a.generate([[1, 2, 3]], None)[0].outputs[0]
    assert out.text == "" and len(out.token_ids) == 16


def test_spec_acceptance_benchmark_accepts_at_the_asked_rates(tmp_path):
    """--spec-acceptance: a plain row per N, then one per rate whose measured acceptance is the oracle's
    sum_{j<=K} a^j / K (up to sampling noise), with the tok/s ratio against the plain row."""
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    out = tmp_path / "spec.jsonl"
    rc = main(["benchmark", "--model", str(tmp_path), "--load-format", "dummy", "--n", "2", "--input-len", "9",
               "--output-len", "64", "--device", "numpy", "--json", str(out), "--no-history",
               "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}',
               "--spec-acceptance", "0,0.8", "--spec-gate", "off"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["acceptance_target"], r["k"]) for r in rows] == [(None, 0), (0.0, 3), (0.8, 3)]
    assert all(r["output_tokens"] == 2 * 64 for r in rows)
    assert rows[1]["acceptance_rate"] == 0 and rows[1]["mean_accepted_length"] == 1
    assert abs(rows[2]["acceptance_rate"] - (0.8 + 0.64 + 0.512) / 3) < 0.12
    assert rows[2]["speedup"] == round(rows[2]["tok_s"] / rows[0]["tok_s"], 3)
