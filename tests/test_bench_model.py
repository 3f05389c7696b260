"""The benchmark model directory (api/bench_model.py): a real config.json beside a synthetic tokenizer. What the
serving benchmark relies on: every id a random model can sample streams as text, prompts are exact token counts,
and the engine's eos, bos and chat template handling see the config's own ids."""
from __future__ import annotations

import json
import os

import pytest

from api import bench_model
from engine.tokenizer import IncrementalDetokenizer, Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN_7B = os.path.join(REPO, "perf", "configs", "qwen2.5-7b")
QWEN_SPECIALS = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"}


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return bench_model.build_bench_model(str(tmp_path_factory.mktemp("qwen7b-bench")), QWEN_7B)


@pytest.fixture(scope="module")
def tokenizer(qwen_dir):
    return Tokenizer.from_pretrained(qwen_dir)


def test_every_id_below_vocab_size_is_one_word(qwen_dir, tokenizer):
    with open(os.path.join(QWEN_7B, "config.json")) as f, open(os.path.join(qwen_dir, "config.json")) as g:
        assert json.load(f) == json.load(g)
    assert tokenizer.vocab_size == 152064
    assert tokenizer.all_special_ids == set(QWEN_SPECIALS)
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 151643 and tokenizer.eos_token_ids == {151643}
    texts = [tokenizer.decode([i], skip_special_tokens=False) for i in range(tokenizer.vocab_size)]
    assert {i: texts[i] for i in QWEN_SPECIALS} == QWEN_SPECIALS
    assert all(t and not any(c.isspace() for c in t) for t in texts), "an id decodes to nothing or to spaces"
    assert len(set(texts)) == len(texts)


def test_streamed_tokens_each_carry_text(tokenizer, rng):
    ids = rng.integers(0, tokenizer.vocab_size, 300).tolist() + sorted(QWEN_SPECIALS)
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    chunks = [(i, detok.add(i)) for i in ids]
    assert all(bool(text) != (i in QWEN_SPECIALS) for i, text in chunks), "an empty chunk for an ordinary id"
    assert "".join(text for _, text in chunks) + detok.flush() == tokenizer.decode(ids)


def test_text_encodes_below_vocab_size_and_prompts_cut_exactly(tokenizer, rng):
    words = bench_model.corpus_words()
    ids = tokenizer.encode(" ".join(words))
    assert len(ids) == len(words) and max(ids) < tokenizer.vocab_size  # each corpus word is one token
    assert tokenizer.decode(ids) == " ".join(words)
    # The load test cuts a prompt at k tokens and sends its text: the server must count k again.
    prompt = tokenizer.encode(" ".join(rng.choice(words, 600)))
    for k in rng.integers(1, 600, 20):
        assert tokenizer.encode(tokenizer.decode(prompt[:k])) == prompt[:k]
    # Text outside the corpus still encodes (characters and ## continuations) inside the vocabulary.
    odd = "Zyxwv quokka-42 naïve {json: [1, 2]} \t\n ~`|"
    assert max(tokenizer.encode(odd)) < tokenizer.vocab_size
    assert tokenizer.decode(tokenizer.encode(odd)) == " ".join(odd.split())


def test_chat_template_uses_the_chat_tokens(tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "the keeper"}], add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert ids[0] == 151644 and ids.count(151644) == 2 and ids.count(151645) == 1
    assert tokenizer.decode(ids) == "user the keeper assistant"


def test_llama_style_config_gets_bos_and_eos_at_its_ids(tmp_path, capsys):
    out = str(tmp_path / "llama")
    assert bench_model.main([out, "--config", os.path.join(REPO, "perf", "configs", "llama-3.1-8b",
                                                              "config.json")]) == 0
    assert "128256 tokens" in capsys.readouterr().out
    tokenizer = Tokenizer.from_pretrained(out)
    assert tokenizer.vocab_size == 128256 and tokenizer.bos_token_id == 128000 and tokenizer.eos_token_id == 128001
    assert tokenizer.token_to_id("<|im_start|>") == 128002 and tokenizer.token_to_id("<|im_end|>") == 128003
    assert tokenizer.encode("the sea")[0] == 128000  # Llama adds BOS; Qwen (bos == eos) does not


@pytest.mark.parametrize("change,message", [
    ({"vocab_size": 100}, "vocab_size 100 is too small"),
    ({"eos_token_id": 5000}, "eos_token_id 5000 is outside the vocabulary [0, 1000)"),
    ({"vocab_size": "big"}, "vocab_size must be a positive integer"),
])
def test_bad_configs_are_refused_with_the_field(tmp_path, change, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"vocab_size": 1000, "eos_token_id": 2, **change}))
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        bench_model.build_bench_model(str(tmp_path / "out"), str(path))


def test_dummy_engine_streams_text_for_every_token(tmp_path, rng):
    """A random model served from a bench dir: each generated token arrives with text of its own."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 152064,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False,
        "torch_dtype": "float32", "bos_token_id": 151643, "eos_token_id": 151643}))
    path = bench_model.build_bench_model(str(tmp_path / "bench"), str(config))
    seed = int(rng.integers(2 ** 31))
    engine = LLMEngine(EngineConfig(model=path, device="numpy", load_format="dummy", seed=seed,
                                    max_model_len=128, max_num_seqs=4))
    params = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True, seed=seed)
    for i in range(3):
        engine.add_request(str(i), "the lighthouse keeper", params)
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            [o] = out.outputs
            assert len(o.token_ids) == 1 and (o.text or o.token_ids[0] in QWEN_SPECIALS), (o.token_ids, o.text)
        steps += 1
    assert steps == 24
