"""CPU cost the HTTP layer adds per request and per token: parsing an OpenAI request body, and
building the SSE chunk of one streamed token. Run with `python -m pytest perf --benchmark-enable`."""
from __future__ import annotations

import orjson

from api import responses as R
from api.protocol import make_sampling_params, parse_chat, parse_completion, parse_json

COMPLETION = orjson.dumps({
    "model": "qwen", "prompt": "Summarize the following text in three sentences. " * 40, "max_tokens": 128,
    "temperature": 0.7, "top_p": 0.95, "top_k": 50, "stream": True, "stream_options": {"include_usage": True},
    "stop": ["\n\n", "###"], "seed": 1234, "presence_penalty": 0.1, "frequency_penalty": 0.2,
    "logit_bias": {"11": 2.0, "198": -1.0}, "ignore_eos": False})
CHAT = orjson.dumps({
    "model": "qwen", "max_completion_tokens": 256, "temperature": 0.6, "stream": True,
    "messages": [{"role": "system", "content": "You are a helpful assistant."},
                 {"role": "user", "content": "Write a haiku about the sea. " * 20},
                 {"role": "assistant", "content": "Grey waves fold and break."},
                 {"role": "user", "content": [{"type": "text", "text": "Another, about morning light."}]}]})


def _completion():
    req = parse_completion(parse_json(COMPLETION))
    return req, make_sampling_params({**req.sampling, "max_tokens": req.max_tokens})


def _chat():
    req = parse_chat(parse_json(CHAT))
    return req, make_sampling_params({**req.sampling, "max_tokens": req.max_tokens})


def test_parse_completion_request(benchmark):
    req, params = benchmark(_completion)
    assert req.stream and req.include_usage and params.max_tokens == 128 and params.top_k == 50


def test_parse_chat_request(benchmark):
    req, params = benchmark(_chat)
    assert req.stream and len(req.messages) == 4 and params.max_tokens == 256


def test_completion_sse_chunks_64_streams(benchmark):
    # One decode step's worth: a one-token chunk for each of 64 streams.
    builds = [R.CompletionChunks(f"cmpl-{i:032x}", 1760000000, "qwen") for i in range(64)]
    chunks = benchmark(lambda: [b.choice(0, " morning") for b in builds])
    assert orjson.loads(chunks[-1][len(b"data: "):])["choices"][0]["text"] == " morning"


def test_chat_sse_chunks_64_streams(benchmark):
    builds = [R.ChatChunks(f"chatcmpl-{i:032x}", 1760000000, "qwen") for i in range(64)]
    chunks = benchmark(lambda: [b.choice(0, " light") for b in builds])
    assert orjson.loads(chunks[-1][len(b"data: "):])["choices"][0]["delta"] == {"content": " light"}


def test_completion_bodies_16_answers_256_tokens(benchmark):
    # Non-streamed answers: each one body with the whole text and usage.
    text = "The sea was the colour of slate. " * 32

    def bodies():
        return [R.completion_body(f"cmpl-{i}", 1760000000, "qwen", [R.completion_choice(0, text, None, "length", None)],
                                  R.usage(500, 256)) for i in range(16)]
    assert orjson.loads(benchmark(bodies)[-1])["usage"]["total_tokens"] == 756
