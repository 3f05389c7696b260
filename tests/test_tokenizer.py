"""Tokenizer, chat templates, incremental detokenizer and the built-in demo checkpoint.

transformers (and torch under it) are used only here, as the reference loader for the demo model.
"""
import json
import os
import random
import subprocess
import sys

import pytest

from engine import demo
from engine.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer, TokenizerError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTIBYTE_TEXTS = [
    "海は広い、心も広く。 The sea is wide.",
    "Théo wrote: « Il faut cultiver notre jardin. » 🐟☀",
    "灯塔 means lamp tower; 你好 and こんにちは 😊 résumé façade Zürich −4 °C",
    "🐟🐟🐟 emoji in a row, then ñ, ü, ø, 한국어, and Ελληνικά",
]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo")
    demo.build_demo_model(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tok(demo_dir):
    return Tokenizer.from_pretrained(demo_dir)


@pytest.fixture
def rng():
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    return random.Random(seed)


def stream(tokenizer, ids, **kwargs):
    detok = IncrementalDetokenizer(tokenizer, [1, 42, 7], **kwargs)
    chunks = [detok.add(i) for i in ids]
    chunks.append(detok.flush())
    assert detok.text == "".join(chunks)
    return chunks


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_equals_full_decode_for_random_ids(tok, rng, skip):
    # Range past the tokenizer's vocabulary, as a padded LM head can sample those ids.
    for _ in range(200):
        ids = [rng.randrange(1024) for _ in range(rng.randrange(1, 60))]
        full = tok.decode(ids, skip_special_tokens=skip)
        chunks = stream(tok, ids, skip_special_tokens=skip)
        assert "".join(chunks) == full, ids
        if "\ufffd" not in full:
            assert not any("\ufffd" in c for c in chunks), ids


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS, ids=["japanese", "french", "mixed", "emoji"])
def test_incremental_never_splits_a_character(tok, text):
    ids = tok.encode(text)
    # The property is only tested if some character really is split across tokens.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    chunks = stream(tok, ids)
    assert "".join(chunks) == text
    assert not any("\ufffd" in c for c in chunks)
    assert chunks[-1] == ""  # nothing left for flush when the text ends on a whole character


def test_incremental_holds_back_then_releases_an_emoji(tok):
    ids = tok.encode("ok 🐟")
    detok = IncrementalDetokenizer(tok, [])
    outputs = [detok.add(i) for i in ids]
    assert "".join(outputs) == "ok 🐟"
    assert outputs[-1].endswith("🐟")
    assert "" in outputs  # the emoji's first bytes were held back


def test_flush_returns_an_unfinished_character(tok):
    partial = tok.encode("🐟")[:-1]  # generation stopped inside the emoji
    assert partial and tok.decode(partial).endswith("\ufffd")
    detok = IncrementalDetokenizer(tok, [])
    assert [detok.add(i) for i in partial] == [""] * len(partial)
    assert detok.flush() == tok.decode(partial) and detok.flush() == ""


def test_special_tokens_skipped_or_kept(tok):
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi 🐟"}])
    ids = tok.encode(prompt, add_special_tokens=False)
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert im_start in ids and im_end in ids and {im_start, im_end} <= tok.all_special_ids
    assert tok.decode(ids, skip_special_tokens=False) == prompt
    assert tok.decode(ids) == "user\nHi 🐟\nassistant\n"
    assert "".join(stream(tok, ids, skip_special_tokens=False)) == prompt
    assert "".join(stream(tok, ids)) == "user\nHi 🐟\nassistant\n"


def _model_dir(tmp_path, generation_config=None, config=None, tokenizer_config_update=None):
    demo.write_demo_tokenizer(str(tmp_path))
    if tokenizer_config_update:
        path = tmp_path / "tokenizer_config.json"
        data = json.loads(path.read_text())
        data.update(tokenizer_config_update)
        path.write_text(json.dumps(data))
    if generation_config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_eos_ids_are_the_union_of_all_sources(tmp_path):
    path = _model_dir(tmp_path, generation_config={"eos_token_id": [0, 17]}, config={"eos_token_id": 99})
    tok = Tokenizer.from_pretrained(path)
    im_end = tok.token_to_id("<|im_end|>")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == im_end
    assert tok.eos_token_ids == frozenset({im_end, 0, 17, 99})
    assert Tokenizer.from_pretrained(path, use_generation_config=False).eos_token_ids == frozenset({im_end, 99})


def test_special_tokens_given_as_dicts(tmp_path):
    path = _model_dir(tmp_path, tokenizer_config_update={
        "eos_token": {"content": "<|endoftext|>", "special": True}, "add_bos_token": True})
    tok = Tokenizer.from_pretrained(path)
    assert tok.eos_token_id == tok.token_to_id("<|endoftext|>")
    ids = tok.encode("hello")
    assert ids[0] == tok.bos_token_id and tok.encode("hello", add_special_tokens=False) == ids[1:]


def test_chat_template_string_and_text_parts(tok):
    as_string = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one\ntwo"}]
    as_parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\none\ntwo<|im_end|>\n"
    assert tok.apply_chat_template(as_string, add_generation_prompt=False) == expected
    assert tok.apply_chat_template(as_parts, add_generation_prompt=False) == expected
    assert tok.apply_chat_template(as_parts) == expected + "<|im_start|>assistant\n"
    assert as_parts[1]["content"][0] == {"type": "text", "text": "one"}  # the caller's messages are not mutated


def test_chat_template_kwargs_and_tojson(tok):
    template = "{{ bos_token }}|{{ tools | tojson }}|{{ greeting }}"
    out = tok.apply_chat_template([], chat_template=template, tools=[{"a": "<é>"}], greeting="hi")
    assert out == '<|endoftext|>|[{"a": "<é>"}]|hi'


def test_non_text_parts_are_refused(tok):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(ValueError, match="only text parts"):
        tok.apply_chat_template(messages)


def test_raise_exception_surfaces_the_message(tok):
    with pytest.raises(ChatTemplateError, match="Conversation roles must be .* got robot") as info:
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ messages.append(1) }}",
    "{{ '{0.__class__}'.format(1) }}",
])
def test_sandbox_escapes_are_refused(tok, tmp_path, template):
    marker = tmp_path / "escaped"
    with pytest.raises(ChatTemplateError, match="unsafe"):
        tok.apply_chat_template([{"role": "user", "content": "x"}],
                                chat_template=template.replace("{marker}", str(marker)))
    assert not marker.exists()


def test_syntax_error_is_a_value_error(tok):
    with pytest.raises(ValueError, match="syntax error on line 1"):
        tok.apply_chat_template([], chat_template="{% for %}")


def test_missing_chat_template(tmp_path):
    path = _model_dir(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(path)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="must provide a chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    template_file = tmp_path / "t.jinja"
    template_file.write_text("{{ messages[0]['content'] }}!")
    assert Tokenizer.from_pretrained(path, chat_template=str(template_file)).apply_chat_template(
        [{"role": "user", "content": "hi"}]) == "hi!"


def test_missing_tokenizer_json_names_the_path(tmp_path):
    with pytest.raises(TokenizerError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_pretrained(str(tmp_path))


def test_demo_model_dir_is_built_once_under_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CUPYLLM_CACHE", str(tmp_path))
    path = demo.demo_model_dir()
    assert path == str(tmp_path / demo.DEMO_NAME)
    assert sorted(os.listdir(path)) == ["config.json", "generation_config.json", "model.safetensors",
                                        "tokenizer.json", "tokenizer_config.json"]
    assert os.listdir(tmp_path) == [demo.DEMO_NAME]  # no temporary directory left behind
    assert demo.demo_model_dir() == path


def test_demo_build_is_deterministic_and_race_safe(tmp_path, demo_dir):
    # Several fresh processes race to build into one cache; each must get the same bytes as this one.
    env = dict(os.environ, CUPYLLM_CACHE=str(tmp_path))
    code = "from engine.demo import demo_model_dir; print(demo_model_dir())"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    paths = {p.communicate()[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert paths == {str(tmp_path / demo.DEMO_NAME)}
    assert os.listdir(tmp_path) == [demo.DEMO_NAME]
    for name in os.listdir(demo_dir):
        with open(os.path.join(demo_dir, name), "rb") as a, open(tmp_path / demo.DEMO_NAME / name, "rb") as b:
            assert a.read() == b.read(), name


def test_demo_loads_in_transformers(demo_dir, tok):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    config = transformers.AutoConfig.from_pretrained(demo_dir)
    assert config.model_type == "qwen2" and config.vocab_size % 64 == 0
    assert tok.vocab_size <= config.vocab_size <= 1024
    hf_tok = transformers.AutoTokenizer.from_pretrained(demo_dir)
    messages = [{"role": "user", "content": "Théo counted 4007 terns 🐟"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(messages)
    for text in MULTIBYTE_TEXTS:
        ids = tok.encode(text)
        assert hf_tok.encode(text) == ids
        assert hf_tok.decode(ids) == tok.decode(ids)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(demo_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("The sea")])).logits
    assert logits.shape[-1] == config.vocab_size and torch.isfinite(logits).all()


def test_incremental_decodes_only_a_small_window(tok, monkeypatch):
    with open(demo.CORPUS_PATH, encoding="utf-8") as f:
        text = f.read()
    ids = tok.encode(text)
    windows = []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids, *a, **k: windows.append(len(ids)) or decode(ids, *a, **k))
    assert "".join(stream(tok, ids)) == text
    assert len(ids) > 1000 and max(windows) <= 8
