"""Prompt logprobs (SamplingParams.prompt_logprobs, vLLM's field) and echo with logprobs in /v1/completions.

The engine's numbers are transformers' log_softmax over the same checkpoint, position by position; chunked prefill,
preemption, prefix caching and n > 1 change none of them. Through the server (the demo model on the numpy backend):
vLLM's `prompt_logprobs` list, and echo + logprobs covering the prompt first, streamed as whole.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.conftest import VOCAB
from tests.test_server import WORDS, openai_client, serve_demo


def _engine(path=None, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=path, device="numpy", **kw))


def _ref_logprobs(model, ids: list[int]) -> tuple[np.ndarray, float]:
    """transformers' log_softmax at every position (float64 for the comparison) and the largest |logit|."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy(), float(logits.abs().max())


def _check_against_reference(entries, ids: list[int], ref: np.ndarray, scale: float, n: int) -> None:
    # test_parity.py holds logits to 1e-4 of the largest |logit|; a logprob adds the log-sum-exp's error
    tol = 2e-4 * scale
    assert len(entries) == len(ids) and entries[0] is None
    for p, (token, logprob, rank, top) in enumerate(entries[1:], 1):
        row = ref[p - 1]  # the distribution after tokens 0 .. p - 1
        assert token == ids[p]
        assert abs(logprob - row[token]) < tol, (p, logprob, row[token])
        assert (row > row[token] + tol).sum() < rank <= (row >= row[token] - tol).sum(), (p, rank)
        assert len(top) == n
        best = np.sort(row)[::-1][:n]
        np.testing.assert_allclose([v for _, v in top], best, atol=tol)  # values: robust to near-ties
        np.testing.assert_allclose([v for _, v in top], row[[i for i, _ in top]], atol=tol)
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)


@pytest.mark.parametrize("arch", ["qwen2_tied", "llama3_scaled", "qwen3"])
def test_prompt_logprobs_match_transformers(arch, checkpoint, rng):
    path, model = checkpoint(arch)
    engine = _engine(path, max_model_len=256)
    for length, n in ((2, 0), (37, 5), (200, 20)):
        ids = rng.integers(0, VOCAB, length).tolist()
        out = engine.generate([ids], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=n))[0]
        ref, scale = _ref_logprobs(model, ids)
        _check_against_reference(out.prompt_logprobs, ids, ref, scale, n)


def test_one_token_prompt_and_no_prompt_logprobs(checkpoint):
    engine = _engine(checkpoint("qwen2_tied")[0], max_model_len=64)
    one, none = engine.generate([[7], [7, 8, 9]], [SamplingParams(max_tokens=2, prompt_logprobs=3),
                                                  SamplingParams(max_tokens=2)])
    assert one.prompt_logprobs == [None] and none.prompt_logprobs is None


def _assert_same(a, b) -> None:
    assert len(a) == len(b) and a[0] is None and b[0] is None
    for (ta, la, ra, topa), (tb, lb, rb, topb) in zip(a[1:], b[1:]):
        assert ta == tb and ra == rb and [i for i, _ in topa] == [i for i, _ in topb]
        np.testing.assert_allclose([la, *(v for _, v in topa)], [lb, *(v for _, v in topb)], atol=1e-4)


def test_chunked_prefill_and_preemption_change_nothing(checkpoint, rng):
    path, model = checkpoint("llama3_scaled")
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (5, 17, 33, 50)]
    params = [SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, prompt_logprobs=n) for n in (2, 0, 4, 3)]
    whole = _engine(path, max_model_len=128).generate(prompts, params)
    # a 24-token budget chunks the prompts; 13 blocks of 16 cannot hold all four at full length: preemption
    engine = _engine(path, max_model_len=128, max_num_batched_tokens=24, num_kv_blocks=13)
    chunked = engine.generate(prompts, params)
    assert engine.scheduler.num_preemptions > 0, "the test meant to force preemption"
    for prompt, p, a, b in zip(prompts, params, whole, chunked):
        _assert_same(a.prompt_logprobs, b.prompt_logprobs)
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        ref, scale = _ref_logprobs(model, prompt)
        _check_against_reference(b.prompt_logprobs, prompt, ref, scale, p.prompt_logprobs)
    assert engine.block_manager.usage == 0.0


def test_prefix_cache_hits_are_skipped_for_prompt_logprobs(checkpoint, rng):
    path, model = checkpoint("qwen2_tied")
    engine = _engine(path, max_model_len=256, enable_prefix_caching=True)
    ids = rng.integers(0, VOCAB, 70).tolist()  # four full blocks of 16 and some
    plain = SamplingParams(temperature=0, max_tokens=2)
    with_lp = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2)
    assert engine.generate([ids], plain)[0].num_cached_tokens == 0
    assert engine.generate([ids], plain)[0].num_cached_tokens == 64  # the cache works
    first = engine.generate([ids], with_lp)[0]
    again = engine.generate([ids], with_lp)[0]
    for out in (first, again):
        assert out.num_cached_tokens == 0  # every position computed: no hit taken
        ref, scale = _ref_logprobs(model, ids)
        _check_against_reference(out.prompt_logprobs, ids, ref, scale, 2)
    _assert_same(first.prompt_logprobs, again.prompt_logprobs)
    assert first.outputs[0].token_ids == again.outputs[0].token_ids
    assert engine.generate([ids], plain)[0].num_cached_tokens == 64  # and it still serves others


def test_delivered_once_in_the_first_output_with_n_choices(checkpoint, rng):
    engine = _engine(checkpoint("qwen2_tied")[0], max_model_len=128, max_num_batched_tokens=16)
    ids = rng.integers(0, VOCAB, 40).tolist()
    ref = engine.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3))[0].prompt_logprobs
    engine.add_request("r", ids, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, prompt_logprobs=3))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[0].outputs, "the first output has the first tokens"
    _assert_same(outputs[0].prompt_logprobs, ref)
    assert all(o.prompt_logprobs is None for o in outputs[1:])


@pytest.mark.parametrize("bad", [-1, 21, 2.0, True, "3"])
def test_sampling_params_checks_prompt_logprobs(bad):
    with pytest.raises(ValueError, match="prompt_logprobs must be an integer in"):
        SamplingParams(prompt_logprobs=bad)


# through the server
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve_demo(tmp_path_factory, ["--served-model-name", "demo", "--max-model-len", "512",
                                             "--max-num-batched-tokens", "8"])


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def demo_engine():
    return _engine(max_model_len=512)


def _text(rng, words: int) -> str:
    return " ".join(rng.choice(WORDS, words))


def test_prompt_logprobs_field_is_vllms(server, demo_engine, rng):
    prompt = _text(rng, 6)
    ids = server.post("/tokenize", {"prompt": prompt})["tokens"]
    body = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 3, "temperature": 0, "prompt_logprobs": 4})
    ref = demo_engine.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=4))[0]
    field = body["choices"][0]["prompt_logprobs"]
    assert body["choices"][0]["logprobs"] is None and len(field) == len(ids) and field[0] is None
    detok = lambda i: server.post("/detokenize", {"tokens": [i]})["prompt"]  # noqa: E731
    for entry, token, (_, logprob, rank, top) in zip(field[1:], ids[1:], ref.prompt_logprobs[1:]):
        assert str(token) in entry and entry[str(token)]["logprob"] == pytest.approx(logprob, abs=1e-4)
        assert entry[str(token)]["decoded_token"] == detok(token)
        assert {k: v["rank"] for k, v in entry.items()} == {str(token): rank, **{str(i): r for r, (i, _) in
                                                                               enumerate(top, 1)}}
        assert len(entry) in (4, 5)
    again = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 3, "temperature": 0,
                                            "prompt_logprobs": 4})  # a prefix-cache hit would lose positions
    assert again["choices"][0]["prompt_logprobs"] == field


def _echo_lp(lp: dict) -> None:
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v is not None for v in lp["token_logprobs"][1:]) and all(lp["top_logprobs"][1:])
    offsets, tokens = lp["text_offset"], lp["tokens"]
    assert offsets[0] == 0 and len(offsets) == len(tokens) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
    assert all(offsets[j + 1] == offsets[j] + len(tokens[j]) for j in range(len(tokens) - 1))


def test_echo_with_logprobs_covers_the_prompt_first(server, client, demo_engine, rng):
    for prompt_ids in (False, True):
        prompt = _text(rng, 5)
        ids = server.post("/tokenize", {"prompt": prompt})["tokens"]
        body = {"prompt": ids if prompt_ids else prompt, "max_tokens": 5, "temperature": 0, "echo": True,
                "logprobs": 2, "ignore_eos": True}
        whole = server.post("/v1/completions", body)
        choice = whole["choices"][0]
        lp = choice["logprobs"]
        _echo_lp(lp)
        assert len(lp["tokens"]) == len(ids) + whole["usage"]["completion_tokens"] == len(ids) + 5
        assert "".join(lp["tokens"]) == choice["text"] and choice["text"].startswith(prompt)
        ref = demo_engine.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2))[0]
        np.testing.assert_allclose(lp["token_logprobs"][1:len(ids)], [e[1] for e in ref.prompt_logprobs[1:]],
                                   atol=1e-4)
        assert all(2 <= len(top) <= 3 for top in lp["top_logprobs"][1:len(ids)])  # the two best and the prompt token
        assert choice["prompt_logprobs"] is not None and len(choice["prompt_logprobs"]) == len(ids)  # as vLLM
        events = server.stream("/v1/completions", body)
        first = next(e for e in events if e["choices"])["choices"][0]
        assert first["text"].startswith(prompt) and first["logprobs"]["token_logprobs"][0] is None
        assert len(first["logprobs"]["tokens"]) > len(ids) - 1  # the prompt's entries come with the first chunk
        streamed = {k: [] for k in lp}
        for e in events:
            for k in lp:
                streamed[k] += (e["choices"][0]["logprobs"] or {}).get(k, [])
        assert "".join(e["choices"][0]["text"] for e in events) == choice["text"]
        assert streamed == lp
        # the openai client reads it as well
        r = client.completions.create(model="demo", prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=1)
        assert r.choices[0].logprobs.token_logprobs[0] is None and r.choices[0].logprobs.text_offset[0] == 0


def test_several_prompts_and_choices_each_get_their_prompts(server, rng):
    prompts = [_text(rng, 3), _text(rng, 7)]
    ids = [server.post("/tokenize", {"prompt": p})["tokens"] for p in prompts]
    body = server.post("/v1/completions", {"prompt": prompts, "n": 2, "max_tokens": 3, "temperature": 1.0,
                                           "seed": 3, "echo": True, "logprobs": 0, "prompt_logprobs": 1})
    assert len(body["choices"]) == 4
    for k, choice in enumerate(body["choices"]):
        i = k // 2
        assert choice["text"].startswith(prompts[i]) and len(choice["prompt_logprobs"]) == len(ids[i])
        assert [int(next(iter(e))) for e in choice["prompt_logprobs"][1:]] == ids[i][1:]
        _echo_lp(choice["logprobs"])
        assert body["choices"][2 * i]["prompt_logprobs"] == choice["prompt_logprobs"]


@pytest.mark.parametrize("extra, message", [
    ({"prompt_logprobs": 21}, "'prompt_logprobs' must be in [0, 20], got 21"),
    ({"prompt_logprobs": -1}, "'prompt_logprobs' must be in [0, 20], got -1"),
    ({"prompt_logprobs": "2"}, "'prompt_logprobs' must be an integer"),
    ({"prompt_logprobs": 2, "stream": True}, "`prompt_logprobs` are not available when `stream=True`."),
])
def test_bad_prompt_logprobs_is_400(server, extra, message):
    status, raw = server.request("POST", "/v1/completions", {"prompt": "abc", "max_tokens": 2, **extra})
    assert status == 400 and message in raw.decode(), raw
    assert server.post("/v1/completions", {"prompt": "abc", "max_tokens": 1})["choices"]  # still serving


def test_stream_with_prompt_logprobs_zero_is_accepted(server):
    events = server.stream("/v1/completions", {"prompt": "abc", "max_tokens": 2, "prompt_logprobs": 0,
                                                "ignore_eos": True})
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"])
