"""The real server on loopback (`python -m api.cli serve`, the demo model), driven by the official
openai client (sync and async) and by raw HTTP for what a client library would hide.

One server process serves the module; every test leaves it idle, and tests that read /metrics poll
it until it shows what they expect instead of sleeping.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import socket
import subprocess
import threading
import time

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server_process import launch_server, stop_process, wait_until

KEY = "sk-test-" + os.urandom(8).hex()
NAMES = ("demo", "demo-alias")
MAX_MODEL_LEN = 1024
MAX_BODY = 256 * 1024
STREAM_TOKENS = 48  # per request of the 64-stream test
WORDS = "the quick brown fox jumps over lazy dog river stone light morning tea".split()


def parse_sse(raw: bytes) -> list[dict]:
    """Every `data: {json}` event of a stream, which must end with `data: [DONE]`."""
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-300:]
    blocks = raw.split(b"\n\n")
    assert blocks[-1] == b"" and blocks[-2] == b"data: [DONE]"
    events = []
    for block in blocks[:-2]:
        assert block.startswith(b"data: "), block
        events.append(json.loads(block[len(b"data: "):]))
    return events


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text, read by prometheus_client's parser -> {sample name or name{other labels}: value}, without
    the model_name label (which every sample must carry) and the `_created` timestamps."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = dict(sample.labels)
            assert labels.pop("model_name", None) is not None, sample
            other = ",".join(f'{k}="{v}"' for k, v in labels.items())
            out[f"{sample.name}{{{other}}}" if other else sample.name] = sample.value
    return out


class Server:
    def __init__(self, port: int, proc: subprocess.Popen, log_path: str):
        self.port, self.proc, self.log_path = port, proc, log_path
        self.base = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def request(self, method: str, path: str, body=None, key: str | None = KEY,
                headers: dict | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            h = {"Content-Type": "application/json", **(headers or {})}
            if key is not None:
                h["Authorization"] = f"Bearer {key}"
            conn.request(method, path, data, h)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def post(self, path: str, body) -> dict:
        status, raw = self.request("POST", path, body)
        assert status == 200, raw
        return json.loads(raw)

    def stream(self, path: str, body: dict) -> list[dict]:
        status, raw = self.request("POST", path, {**body, "stream": True})
        assert status == 200, raw
        return parse_sse(raw)

    def metrics(self) -> dict[str, float]:
        status, raw = self.request("GET", "/metrics", key=None)
        assert status == 200
        return parse_metrics(raw.decode())

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """Metrics once no request runs or waits and the KV cache is empty again."""
        def idle():
            m = self.metrics()
            done = (m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
                    and m["vllm:kv_cache_usage_perc"] == 0)
            return m if done else None
        return wait_until(idle, timeout, "the server to become idle with an empty KV cache")


def serve_demo(tmp_path_factory, args: list[str]):
    """A module fixture's body: `cupyllm serve ARGS` (the demo model on the numpy backend, the test key) on an
    ephemeral port, which it reports in its "ready" log line; stopped afterwards, its log free of tracebacks."""
    log_path = str(tmp_path_factory.mktemp("server") / "server.log")
    env = {**os.environ, "CUPYLLM_API_KEY": KEY, "NO_PROXY": "127.0.0.1"}
    proc, port = launch_server([*args, "--device", "numpy"], log_path, env)
    srv = Server(port, proc, log_path)
    yield srv
    stop_process(proc, 10)
    assert "Traceback" not in srv.log(), srv.log()


def openai_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve_demo(tmp_path_factory, ["--served-model-name", *NAMES, "--max-model-len", str(MAX_MODEL_LEN),
                                             "--max-request-body-bytes", str(MAX_BODY)])


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def random_text(rng, n_words: int) -> str:
    return " ".join(rng.choice(WORDS, n_words))


def count_tokens(server, **body) -> int:
    return server.post("/tokenize", body)["count"]


# endpoints around generation
def test_models_health_version_and_metric_names(server):
    status, raw = server.request("GET", "/v1/models")
    data = json.loads(raw)["data"]
    assert status == 200 and [m["id"] for m in data] == list(NAMES)
    assert re.search(r"engine start \(load, kernels, graph capture\) took [\d.]+ s", server.log())
    assert all(m["object"] == "model" and m["max_model_len"] == MAX_MODEL_LEN for m in data)
    assert server.request("GET", "/health", key=None)[0] == 200
    status, raw = server.request("GET", "/version", key=None)
    assert status == 200 and re.fullmatch(r"\d+\.\d+\.\d+.*", json.loads(raw)["version"])
    status, raw = server.request("GET", "/metrics", key=None)
    text = raw.decode()
    for name, kind in [("vllm:num_requests_running", "gauge"), ("vllm:num_requests_waiting", "gauge"),
                       ("vllm:kv_cache_usage_perc", "gauge"), ("vllm:prompt_tokens_total", "counter"),
                       ("vllm:generation_tokens_total", "counter"), ("vllm:num_preemptions_total", "counter"),
                       ("vllm:time_to_first_token_seconds", "histogram"),
                       ("vllm:inter_token_latency_seconds", "histogram"),
                       ("vllm:e2e_request_latency_seconds", "histogram")]:
        assert f"# TYPE {name} {kind}\n" in text, name
    assert 'vllm:e2e_request_latency_seconds_bucket{le="+Inf"}' in parse_metrics(text)


# vLLM's histograms and their bucket boundaries
HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                                         5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0),
    "vllm:inter_token_latency_seconds": (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                                         7.5, 10.0, 20.0, 40.0, 80.0),
    "vllm:e2e_request_latency_seconds": (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                                         60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0),
    "vllm:request_prompt_tokens": (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),  # 1-2-5 up to max_model_len
}
HISTOGRAMS["vllm:time_per_output_token_seconds"] = HISTOGRAMS["vllm:inter_token_latency_seconds"]
HISTOGRAMS["vllm:request_queue_time_seconds"] = HISTOGRAMS["vllm:e2e_request_latency_seconds"]
HISTOGRAMS["vllm:request_generation_tokens"] = HISTOGRAMS["vllm:request_prompt_tokens"]


def scrape_families(server) -> dict:
    status, raw = server.request("GET", "/metrics", key=None)
    assert status == 200
    return {f.name: f for f in text_string_to_metric_families(raw.decode())}


def test_metrics_scrape_parses_with_prometheus_client(server, client, rng):
    """/metrics read by prometheus_client's own parser: vLLM's names and types, every sample labelled
    model_name=<first served name>, vLLM's bucket boundaries, cumulative buckets, and each request counted."""
    server.wait_idle()
    before = scrape_families(server)
    requests, max_tokens, prompt_tokens = 3, 6, 0
    for _ in range(requests):
        prompt = random_text(rng, 5)
        prompt_tokens += count_tokens(server, prompt=prompt)
        r = client.completions.create(model=NAMES[0], prompt=prompt, max_tokens=max_tokens,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "length"
    server.wait_idle()
    after = scrape_families(server)

    types = {"vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
             "vllm:kv_cache_usage_perc": "gauge", "vllm:gpu_cache_usage_perc": "gauge",
             "vllm:num_preemptions": "counter", "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter",
             "vllm:request_success": "counter", **{name: "histogram" for name in HISTOGRAMS}}
    for name, kind in types.items():
        assert after[name].type == kind, name
    assert not any(name.startswith(("vllm:spec_decode", "cupyllm:spec_decode")) for name in after)  # speculation off
    for family in after.values():
        for sample in family.samples:
            assert sample.labels.get("model_name") == NAMES[0], sample
            assert set(sample.labels) <= {"model_name", "le", "finished_reason"}, sample
    assert {s.labels["finished_reason"] for s in after["vllm:request_success"].samples} >= {"stop", "length", "abort"}

    def value(families, name: str, sample: str, **labels) -> float:
        return next(s.value for s in families[name].samples
                    if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))

    def delta(name: str, sample: str, **labels) -> float:
        return value(after, name, sample, **labels) - value(before, name, sample, **labels)

    for name, bounds in HISTOGRAMS.items():
        buckets = [s for s in after[name].samples if s.name == name + "_bucket"]
        assert [s.labels["le"] for s in buckets] == [repr(float(b)) for b in bounds] + ["+Inf"], name
        counts = [s.value for s in buckets]
        assert counts == sorted(counts) and counts[-1] == value(after, name, name + "_count"), name
    for name in ("vllm:e2e_request_latency_seconds", "vllm:time_to_first_token_seconds",
                 "vllm:request_queue_time_seconds", "vllm:request_prompt_tokens", "vllm:request_generation_tokens"):
        assert delta(name, name + "_count") == requests, name  # one observation per request
    assert delta("vllm:request_generation_tokens", "vllm:request_generation_tokens_sum") == requests * max_tokens
    assert delta("vllm:request_prompt_tokens", "vllm:request_prompt_tokens_sum") == prompt_tokens
    assert delta("vllm:request_success", "vllm:request_success_total", finished_reason="length") == requests
    assert delta("vllm:generation_tokens", "vllm:generation_tokens_total") == requests * max_tokens
    assert delta("vllm:prompt_tokens", "vllm:prompt_tokens_total") == prompt_tokens
    itl = delta("vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_count")
    assert 0 < itl <= requests * (max_tokens - 1)
    assert itl == delta("vllm:time_per_output_token_seconds", "vllm:time_per_output_token_seconds_count")
    queue = delta("vllm:request_queue_time_seconds", "vllm:request_queue_time_seconds_sum")
    assert 0 <= queue <= delta("vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_sum")


def test_completion_usage_equals_tokenizer_counts(server, client, rng):
    prompt = random_text(rng, 9)
    r = client.completions.create(model=NAMES[1], prompt=prompt, max_tokens=7, extra_body={"ignore_eos": True})
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == NAMES[0]
    assert r.usage.prompt_tokens == count_tokens(server, prompt=prompt)
    assert r.usage.completion_tokens == 7 and r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert r.choices[0].finish_reason == "length" and r.choices[0].index == 0


def test_completion_stream_equals_non_stream(server, client, rng):
    body = dict(model=NAMES[0], prompt=random_text(rng, 6), max_tokens=24, temperature=0.9,
                seed=int(rng.integers(2 ** 31)))
    whole = client.completions.create(**body)
    events = server.stream("/v1/completions", {**body, "stream_options": {"include_usage": True}})
    *chunks, last = events
    assert all(e["id"] == chunks[0]["id"] and e["object"] == "text_completion" for e in events)
    # sampling may draw EOS before max_tokens: the stream must end the way the whole response did
    assert whole.choices[0].finish_reason in ("length", "stop")
    assert ([c["choices"][0]["finish_reason"] for c in chunks]
            == [None] * (len(chunks) - 1) + [whole.choices[0].finish_reason])
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole.choices[0].text
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == whole.usage.completion_tokens
    assert last["usage"]["prompt_tokens"] == whole.usage.prompt_tokens
    streamed = client.completions.create(**body, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text


def test_chat_stream_equals_non_stream(server, client, rng):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": [{"type": "text", "text": random_text(rng, 5)},
                                             {"type": "text", "text": random_text(rng, 3)}]}]
    body = dict(model=NAMES[0], messages=messages, max_completion_tokens=20, temperature=0.8,
                seed=int(rng.integers(2 ** 31)))
    whole = client.chat.completions.create(**body)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == count_tokens(server, messages=messages)
    events = server.stream("/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    *chunks, last = events
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons[:-1] == [None] * (len(chunks) - 1) and reasons[-1] == whole.choices[0].finish_reason
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole.choices[0].message.content
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == whole.usage.completion_tokens
    assert last["usage"]["prompt_tokens"] == whole.usage.prompt_tokens
    streamed = client.chat.completions.create(**body, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == whole.choices[0].message.content


def test_n_and_prompt_lists_fan_out(server, client, rng):
    prompts = [random_text(rng, 4), random_text(rng, 7)]
    body = dict(model=NAMES[0], prompt=prompts, n=3, max_tokens=6, temperature=1.0, seed=int(rng.integers(2 ** 31)),
                extra_body={"ignore_eos": True})
    r = client.completions.create(**body)
    assert [c.index for c in r.choices] == list(range(6))
    assert r.usage.prompt_tokens == sum(count_tokens(server, prompt=p) for p in prompts)
    assert r.usage.completion_tokens == 36
    assert len({c.text for c in r.choices[:3]}) > 1  # the n choices of a prompt are separate samples
    raw_body = {**{k: v for k, v in body.items() if k != "extra_body"}, "ignore_eos": True}
    events = server.stream("/v1/completions", raw_body)
    for k in range(6):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == k]
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + ["length"]
        assert "".join(c["text"] for c in mine) == r.choices[k].text
    chat = client.chat.completions.create(model=NAMES[0], messages=[{"role": "user", "content": "hi"}], n=2,
                                          max_tokens=3, temperature=1.0)
    assert [c.index for c in chat.choices] == [0, 1]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_choices_finishing_at_different_steps_finish_once(server, rng, path):
    """Stop strings end the n choices at different steps; each choice still ends exactly once, last."""
    body = {"n": 4, "max_tokens": 30, "temperature": 1.0, "seed": int(rng.integers(2 ** 31)), "stop": ["e", "o"]}
    body.update({"prompt": "x"} if "chat" not in path else {"messages": [{"role": "user", "content": "x"}]})
    whole = server.post(path, body)
    events = server.stream(path, body)
    lengths = set()
    for choice in whole["choices"]:
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == choice["index"]]
        reasons = [c["finish_reason"] for c in mine]
        assert reasons[-1] == choice["finish_reason"] and reasons[:-1] == [None] * (len(mine) - 1)
        if "chat" in path:
            assert "".join(c["delta"].get("content", "") for c in mine) == choice["message"]["content"]
            lengths.add(len(choice["message"]["content"]))
        else:
            assert "".join(c["text"] for c in mine) == choice["text"]
            lengths.add(len(choice["text"]))
    print(f"choice text lengths {sorted(lengths)}")


def test_logprobs_shape(server, client, rng):
    r = client.completions.create(model=NAMES[0], prompt=random_text(rng, 5), max_tokens=6, temperature=0,
                                  logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        # alternatives are keyed by text: partial-UTF-8 byte tokens all read "\ufffd" and share one key
        assert (3 <= len(top) or "\ufffd" in top) and len(top) <= 4 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely token
    chat = client.chat.completions.create(model=NAMES[0], messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.bytes == list(entry.token.encode())
    events = server.stream("/v1/completions", {"prompt": "abc", "max_tokens": 5, "logprobs": 0, "ignore_eos": True})
    assert sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in events if e["choices"][0]["logprobs"]) == 5


def test_echo_and_token_id_prompts(server, client, rng):
    prompt = random_text(rng, 5)
    r = client.completions.create(model=NAMES[0], prompt=prompt, max_tokens=4, echo=True, temperature=0)
    assert r.choices[0].text.startswith(prompt) and len(r.choices[0].text) > len(prompt)
    events = server.stream("/v1/completions", {"prompt": prompt, "max_tokens": 4, "echo": True, "temperature": 0})
    assert "".join(e["choices"][0]["text"] for e in events) == r.choices[0].text
    ids = server.post("/tokenize", {"prompt": random_text(rng, 4)})["tokens"]
    ids2 = server.post("/tokenize", {"prompt": random_text(rng, 6)})["tokens"]
    r = client.completions.create(model=NAMES[0], prompt=ids, max_tokens=3, echo=True, temperature=0)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].text.startswith(server.post("/detokenize", {"tokens": ids})["prompt"])
    r = client.completions.create(model=NAMES[0], prompt=[ids, ids2], max_tokens=3, temperature=0)
    assert len(r.choices) == 2 and r.usage.prompt_tokens == len(ids) + len(ids2)


def test_stop_strings(server, client, rng):
    body = dict(model=NAMES[0], prompt=random_text(rng, 5), max_tokens=40, temperature=0,
                extra_body={"ignore_eos": True})
    full = client.completions.create(**body).choices[0].text
    starts = [i for i in range(4, len(full) - 3) if "\ufffd" not in full[i:i + 3]]
    assert starts, f"no clean 3-character span in {full!r}"
    stop = full[starts[len(starts) // 2]:starts[len(starts) // 2] + 3]
    cut = full.index(stop)
    r = client.completions.create(**body, stop=[stop])
    assert r.choices[0].text == full[:cut] and r.choices[0].finish_reason == "stop"
    assert r.choices[0].stop_reason == stop
    r = client.completions.create(**{**body, "extra_body": {"ignore_eos": True, "include_stop_str_in_output": True}},
                                  stop=stop)
    assert r.choices[0].text == full[:cut + len(stop)]
    streamed = client.completions.create(**body, stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:cut]


def test_seeds_reproduce(server, client, rng):
    seed = int(rng.integers(2 ** 31))
    body = dict(model=NAMES[0], prompt=random_text(rng, 4), max_tokens=16, temperature=1.0,
                extra_body={"ignore_eos": True})
    first = client.completions.create(**body, seed=seed).choices[0].text
    assert client.completions.create(**body, seed=seed).choices[0].text == first
    others = {client.completions.create(**body, seed=seed + i).choices[0].text for i in range(1, 4)}
    assert others - {first}


def test_tokenize_round_trip(server, rng):
    alphabet = list("abcdefghijklmnopqrstuvwxyz ,.!?-\n") + ["é", "ß", "日本", "🙂", "  "]
    text = "".join(rng.choice(alphabet, 200))
    tok = server.post("/tokenize", {"prompt": text, "return_token_strs": True})
    assert tok["count"] == len(tok["tokens"]) == len(tok["token_strs"]) and tok["max_model_len"] == MAX_MODEL_LEN
    assert server.post("/detokenize", {"tokens": tok["tokens"]})["prompt"] == text


# errors
def _error(status: int, raw: bytes) -> str:
    err = json.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status, err
    return err["message"]


CHAT = {"messages": [{"role": "user", "content": "hi"}]}
BAD_REQUESTS = [
    ("/v1/completions", b"{not json", "not valid JSON"),
    ("/v1/completions", b"[1, 2]", "must be a JSON object"),
    ("/v1/completions", {"max_tokens": 3}, "'prompt' is required"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "'temperature' must be a number"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, "top_p must be in (0, 1]"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "'max_tokens' must be in [1,"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "'logprobs' must be in [0, 20]"),
    ("/v1/completions", {"prompt": "x", "n": 2, "temperature": 0}, "greedy"),
    ("/v1/completions", {"prompt": [[1, 2], "x"]}, "'prompt' must be"),
    ("/v1/completions", {"prompt": [5, 10 ** 6]}, "must be in [0,"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [10 ** 6]}, "outside the vocabulary"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}},
     "Stream options can only be defined when `stream=True`."),
    ("/v1/completions", {"prompt": [7], "max_tokens": 5000},
     f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested 5001 tokens "
     "(1 in the messages, 5000 in the completion). Please reduce the length of the messages or completion."),
    ("/v1/completions", {"prompt": [7] * MAX_MODEL_LEN, "max_tokens": None},
     f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, your request has "
     f"{MAX_MODEL_LEN} input tokens."),
    ("/v1/completions", {"prompt": "word " * 2400, "max_tokens": 4},  # long enough to tokenize off the loop
     f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested"),
    ("/v1/completions", {"prompt": "word " * 4000, "max_tokens": 4},  # too long by its length alone
     f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, your prompt of 20000 characters "
     "has at least"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "'suffix' is not supported yet"),
    ("/v1/chat/completions", {}, "'messages' must be a non-empty list"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
     '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, "'response_format' type must be one of"),
    ("/v1/chat/completions", {**CHAT, "chat_template": "{{ messages }}"}, "'chat_template' is not supported yet"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "only text parts are supported"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "roles must be"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "`logprobs` must be set to true"),
    ("/tokenize", {"prompt": 5}, "'prompt' must be a string"),
    ("/detokenize", {"tokens": [-1]}, "must be in [0,"),
]


@pytest.mark.parametrize("path,body,message", BAD_REQUESTS, ids=[m[:40] for _, _, m in BAD_REQUESTS])
def test_bad_request_is_400_with_message(server, path, body, message):
    status, raw = server.request("POST", path, body)
    assert status == 400, raw
    assert message in _error(400, raw)


def test_other_error_statuses_and_server_keeps_serving(server, client):
    status, raw = server.request("POST", "/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 404 and _error(404, raw) == "The model `nope` does not exist."
    status, raw = server.request("POST", "/v1/nothing-here", {})
    assert status == 404 and _error(404, raw)
    status, raw = server.request("GET", "/v1/completions")
    assert status == 405 and _error(405, raw)
    status, raw = server.request("POST", "/v1/completions", b'{"prompt": "' + b"x" * MAX_BODY + b'"}')
    assert status == 413 and _error(413, raw)
    with pytest.raises(openai.BadRequestError, match="'temperature' must be a number"):
        client.completions.create(model=NAMES[0], prompt="x", extra_body={"temperature": "hot"})
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=CHAT["messages"])
    assert client.completions.create(model=NAMES[0], prompt="still", max_tokens=2).usage.completion_tokens >= 1
    server.wait_idle()


def test_api_key_guards_v1_only(server):
    for key, message in [(None, "Missing API key"), ("wrong", "Incorrect API key provided.")]:
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]:
            status, raw = server.request(method, path, {"prompt": "x"}, key=key)
            assert status == 401 and message in _error(401, raw)
    assert server.request("GET", "/v1/models", headers={"Authorization": f"bearer {KEY}"}, key=None)[0] == 200
    for path in ("/health", "/metrics", "/version"):
        assert server.request("GET", path, key=None)[0] == 200
    bad = openai.OpenAI(base_url=server.base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# concurrency, disconnects and the metrics they leave behind
async def _stream_one(aclient, i: int) -> str:
    """One streaming request through the async client; checks the chunk order as it goes."""
    common = dict(model=NAMES[0], max_tokens=STREAM_TOKENS, temperature=1.0, seed=i, stream=True,
                  stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    if i % 2:
        stream = await aclient.chat.completions.create(messages=[{"role": "user", "content": f"request {i}"}],
                                                       **common)
        chunks = [c async for c in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        body = chunks[1:-1]
        text = "".join(c.choices[0].delta.content or "" for c in body)
    else:
        stream = await aclient.completions.create(prompt=f"request {i}", **common)
        chunks = [c async for c in stream]
        body = chunks[:-1]
        text = "".join(c.choices[0].text for c in body)
    assert [c.choices[0].finish_reason for c in body] == [None] * (len(body) - 1) + ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == STREAM_TOKENS
    return text


def _poll_health(server, stop: threading.Event, latencies: list) -> None:
    """/health latencies over one keep-alive connection, from a thread: the streams' client work in the
    event loop must not delay the probe (it still shares this process's GIL, so this is an upper bound)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    while not stop.is_set():
        t0 = time.perf_counter()
        conn.request("GET", "/health")
        resp = conn.getresponse()
        resp.read()
        latencies.append(time.perf_counter() - t0)
        assert resp.status == 200
        stop.wait(0.005)
    conn.close()


def test_64_concurrent_streams_while_health_stays_fast(server):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=60)
        texts = await asyncio.gather(*(_stream_one(aclient, i) for i in range(64)))
        await aclient.close()
        return texts

    stop, latencies = threading.Event(), []
    poller = threading.Thread(target=_poll_health, args=(server, stop, latencies))
    poller.start()
    try:
        texts = asyncio.run(main())
    finally:
        stop.set()
        poller.join()
    assert len(texts) == 64 and all(texts)
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    print(f"/health during 64 streams: n={len(latencies)} p50={p50 * 1e3:.1f} ms p99={p99 * 1e3:.1f} ms "
          f"max={latencies[-1] * 1e3:.1f} ms")
    assert p50 < 0.1
    m = server.wait_idle()
    assert m["vllm:time_to_first_token_seconds_count"] >= 64
    assert m["vllm:generation_tokens_total"] >= 64 * STREAM_TOKENS


def test_disconnects_abort_and_free_kv(server):
    aborted_before = server.metrics()['vllm:request_success_total{finished_reason="abort"}']
    tokens_before = server.metrics()["vllm:generation_tokens_total"]
    max_tokens = MAX_MODEL_LEN - 32

    async def main():
        sessions = [aiohttp.ClientSession() for _ in range(64)]
        responses = []
        for i, s in enumerate(sessions):
            r = await s.post(server.base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                             json={"prompt": f"long {i}", "max_tokens": max_tokens, "ignore_eos": True, "stream": True})
            assert r.status == 200
            responses.append(r)
        for r in responses:  # each stream has produced tokens: its request holds KV blocks now
            line = await r.content.readline()
            assert line.startswith(b"data: {")
        m = server.metrics()
        assert m["vllm:num_requests_running"] > 0 and m["vllm:kv_cache_usage_perc"] > 0
        for r, s in zip(responses, sessions):
            r.close()
            await s.close()
    asyncio.run(main())
    m = server.wait_idle()
    assert m['vllm:request_success_total{finished_reason="abort"}'] - aborted_before == 64
    assert m["vllm:generation_tokens_total"] - tokens_before < 64 * max_tokens / 2

    # a non-streaming client that goes away is aborted too
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        body = json.dumps({"prompt": "long", "max_tokens": max_tokens, "ignore_eos": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_until(lambda: server.metrics()["vllm:num_requests_running"] > 0, 10, "the request to run")
    m = server.wait_idle()
    assert m['vllm:request_success_total{finished_reason="abort"}'] - aborted_before == 65


# CORS (vLLM's defaults: every origin, method and header) and the per-request log line
def test_cors_preflight_and_headers(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        pre = conn.getresponse()  # a preflight carries no API key
        pre.read()
        assert pre.status in (200, 204) and pre.getheader("access-control-allow-origin") == "*"
        assert "post" in (pre.getheader("access-control-allow-methods") or "").lower()
        assert pre.getheader("access-control-allow-headers") in ("*", "authorization,content-type")
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2}),
                     {"Origin": "https://app.example", "Content-Type": "application/json",
                      "Authorization": f"Bearer {KEY}"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200 and resp.getheader("access-control-allow-origin") == "*"
    finally:
        conn.close()


def test_one_log_line_per_finished_request(server):
    body = server.post("/v1/completions", {"prompt": "log me", "max_tokens": 5, "ignore_eos": True})
    line = wait_until(lambda: next((ln for ln in server.log().splitlines() if body["id"] in ln), None), 10,
                      "the request's log line")
    prompt_tokens = body["usage"]["prompt_tokens"]
    assert re.search(rf"request {body['id']}: {prompt_tokens} prompt tokens, 5 output tokens, finish length, "
                     r"TTFT [\d.]+ s, e2e [\d.]+ s", line), line
