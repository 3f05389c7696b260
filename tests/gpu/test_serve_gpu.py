"""`cupyllm serve <checkpoint dir> --device cuda` answering the official openai client, streaming: greedy text equal
to an LLMEngine's on the same checkpoint and GPU, right usage and finish reasons, concurrent streams batched on the
GPU, and a bad request answered 400 without disturbing the server.

Needs sanic, orjson and openai (on the H100 they are installed from the carried wheels: scripts/gpu_check.sh serve).
"""
from __future__ import annotations

import asyncio
import os
import re

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.server_process import launch_server, stop_process

for _module in ("sanic", "orjson"):
    pytest.importorskip(_module, reason=f"{_module} is not installed: scripts/gpu_check.sh serve installs it")
openai = pytest.importorskip("openai")

NAME = "tiny"
MAX_MODEL_LEN, MAX_NUM_SEQS, MAX_TOKENS = 512, 8, 40
WORDS = "the lighthouse keeper woke before gulls and walked down to the harbour where boats rocked".split()


class Reference:
    """An LLMEngine on the same checkpoint and GPU, run one prompt at a time, greedy."""

    def __init__(self, path: str):
        self.engine = LLMEngine(EngineConfig(model=path, device="cuda", dtype="float16",
                                             max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompt: str | list[int], max_tokens: int = MAX_TOKENS):
        """(prompt ids, completion output) of a greedy run of `prompt` alone."""
        out = self.engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens))[0]
        return out.prompt_token_ids, out.outputs[0]

    def generate_chat(self, messages: list[dict], max_tokens: int = MAX_TOKENS):
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(self.tokenizer.encode(text, add_special_tokens=False), max_tokens)


@pytest.fixture(scope="module")
def reference(checkpoint):
    # Built before the server starts, so that the server finds the kernels compiled and the GEMM algorithms
    # chosen (both cached on disk) and runs exactly the same computation.
    path, _ = checkpoint("qwen2_untied")
    return path, Reference(path)


@pytest.fixture(scope="module")
def server(reference, tmp_path_factory):
    """The real server process on an ephemeral port: its base URL."""
    path, _ = reference
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    proc, port = launch_server([path, "--device", "cuda", "--dtype", "float16", "--served-model-name", NAME,
                                "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS)],
                               log_path, {**os.environ, "NO_PROXY": "127.0.0.1"}, timeout=120)
    try:
        print("server", re.search(r"ready in [\d.]+ s(?=: serving)", log_path.read_text()).group(0))
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc, 30)
    log = log_path.read_text()
    assert "Traceback" not in log, log[-4000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=60)


def random_prompt(rng) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(3, 12))))


def check_completion_stream(chunks: list, prompt_ids: list[int], expected) -> str:
    """The chunks of a streamed completion with include_usage: text chunks, a finish reason on the last one
    only, then a usage chunk with no choices. Returns the streamed text."""
    *body, usage = chunks
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.prompt_tokens == len(prompt_ids)
    assert usage.usage.completion_tokens == len(expected.token_ids)
    assert usage.usage.total_tokens == len(prompt_ids) + len(expected.token_ids)
    assert [c.choices[0].finish_reason for c in body] == [None] * (len(body) - 1) + [expected.finish_reason]
    return "".join(c.choices[0].text for c in body)


def test_streamed_completion_equals_the_engine(reference, client, rng):
    _, ref = reference
    prompt = random_prompt(rng)
    prompt_ids, expected = ref.generate(prompt)
    assert expected.text, "the reference generated no text: nothing to compare"
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    assert check_completion_stream(chunks, prompt_ids, expected) == expected.text
    whole = client.completions.create(model=NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert whole.choices[0].text == expected.text and whole.choices[0].finish_reason == expected.finish_reason
    assert whole.usage.completion_tokens == len(expected.token_ids)


def test_streamed_chat_equals_the_engine(reference, client, rng):
    _, ref = reference
    messages = [{"role": "system", "content": random_prompt(rng)}, {"role": "user", "content": random_prompt(rng)}]
    prompt_ids, expected = ref.generate_chat(messages)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    first, *body, usage = chunks
    assert first.choices[0].delta.role == "assistant" and all(c.object == "chat.completion.chunk" for c in chunks)
    assert [c.choices[0].finish_reason for c in body] == [None] * (len(body) - 1) + [expected.finish_reason]
    assert "".join(c.choices[0].delta.content or "" for c in body) == expected.text
    assert usage.choices == [] and usage.usage.prompt_tokens == len(prompt_ids)
    assert usage.usage.completion_tokens == len(expected.token_ids)
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    assert whole.choices[0].message.content == expected.text


def test_concurrent_streams_each_equal_the_engine_alone(reference, server, rng):
    """Streams batched together on the GPU (graph replay at batch > 1) give each what it gets alone."""
    _, ref = reference
    prompts = [random_prompt(rng) for _ in range(MAX_NUM_SEQS)]
    lengths = [int(rng.integers(8, MAX_TOKENS + 1)) for _ in prompts]  # finishing at different steps
    expected = [ref.generate(p, n) for p, n in zip(prompts, lengths)]

    async def stream(aclient, prompt: str, max_tokens: int) -> list:
        response = await aclient.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                    stream=True, stream_options={"include_usage": True})
        return [c async for c in response]

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=60)
        try:
            return await asyncio.gather(*(stream(aclient, p, n) for p, n in zip(prompts, lengths)))
        finally:
            await aclient.close()
    for chunks, (prompt_ids, out) in zip(asyncio.run(main()), expected):
        assert check_completion_stream(chunks, prompt_ids, out) == out.text


def test_bad_request_gets_400_naming_the_field_and_the_server_keeps_serving(reference, client, rng):
    _, ref = reference
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=NAME, prompt="the keeper", max_tokens=-1, stream=True)
    assert bad.value.status_code == 400 and "'max_tokens' must be" in bad.value.message
    assert bad.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=NAME, prompt="the keeper", max_tokens=MAX_MODEL_LEN)
    prompt = random_prompt(rng)
    prompt_ids, expected = ref.generate(prompt)
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert check_completion_stream(chunks, prompt_ids, expected) == expected.text
