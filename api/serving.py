"""The OpenAI endpoints' work between parsing and HTTP: prompts become engine requests, outputs
become one response body or a stream of SSE chunks.

A list of prompts fans out to one engine request per prompt; the n choices of a prompt are the
engine's own sequences (they share the prompt's KV blocks). Choice k of prompt i is index i*n + k.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator

import orjson

from api import responses as R
from api.chat_tools import ChoiceTools
from api.engine_stream import EngineStream, to_api_error
from api.metrics import Metrics
from api.protocol import APIError, ChatRequest, CompletionRequest, make_sampling_params
from engine.sampling_params import SamplingParams, check_token_ids
from engine.tokenizer import GIL_FREE_CHARS

logger = logging.getLogger(__name__)

LONG_TEXT_CHARS = GIL_FREE_CHARS  # texts at least this long are tokenized off the event loop, without the GIL
# Sequences allowed to wait for a place in the batch before new requests get 503 (--max-waiting-requests).
# A waiting sequence costs its prompt's ids (~40 bytes a token as Python ints) and a few KB besides.
DEFAULT_MAX_WAITING = 4096
RETRY_AFTER = {"Retry-After": "1"}


class TokenTexts:
    """Text of single token ids, for logprobs; cached, since the same ids recur in every response."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text


class _Job:
    """One API request in flight: its engine stream, its prompts and how to shape the answer."""

    def __init__(self, serving: "OpenAIServing", request_id: str, prompts: list[list[int]], params: list):
        self.serving = serving
        self.request_id = request_id
        self.created = int(time.time())
        self.prompt_ids = prompts
        self.n = params[0].n
        self.stream = EngineStream(serving.engine, serving.metrics, request_id, prompts, params, serving.log_requests)

    def usage(self, completion_tokens: int) -> dict:
        return R.usage(sum(len(p) for p in self.prompt_ids), completion_tokens)

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def collect(self) -> tuple[list[str], list[list], list, list, int]:
        """Whole texts, logprob entries, finish and stop reasons per choice; completion tokens in all."""
        num = len(self.prompt_ids) * self.n
        texts: list[list[str]] = [[] for _ in range(num)]
        logprobs: list[list] = [[] for _ in range(num)]
        finish, stop = [None] * num, [None] * num
        tokens = 0
        async for i, out in self._outputs():
            for o in out.outputs:
                k = i * self.n + o.index
                texts[k].append(o.text)
                tokens += len(o.token_ids)
                if o.logprobs:
                    logprobs[k].extend(o.logprobs)
                if o.finish_reason is not None:
                    finish[k], stop[k] = o.finish_reason, o.stop_reason
        return ["".join(t) for t in texts], logprobs, finish, stop, tokens

    async def chunks(self) -> AsyncIterator[bytes]:
        """SSE chunks to the [DONE] terminator; an error after the first byte goes in-band."""
        try:
            async for chunk in self._chunks():
                yield chunk
        except Exception as e:  # the status line is gone: the error travels as a chunk
            yield R.sse(to_api_error(e).to_dict())
        yield R.DONE

    def _outputs(self) -> AsyncIterator:
        """The engine stream of (prompt index, RequestOutput); a subclass may look at them as they pass."""
        return self.stream

    def _chunks(self) -> AsyncIterator[bytes]:
        raise NotImplementedError


class CompletionJob(_Job):
    def __init__(self, serving, req: CompletionRequest, request_id, prompt_texts, prompts, params):
        super().__init__(serving, request_id, prompts, params)
        self.req = req
        self.prompt_texts = prompt_texts
        # per prompt, the engine's prompt logprobs (SamplingParams.prompt_logprobs, also set for echo + logprobs):
        # they come with its request's first output
        self.prompt_logprobs: list[list | None] = [None] * len(prompts)

    def _echo(self, i: int) -> str:
        return self.prompt_texts[i] if self.req.echo else ""

    def _echo_entries(self, i: int) -> list:
        """The legacy logprobs entries of prompt i when it is echoed (they lead the choice's), else none."""
        if not self.req.echo or self.prompt_logprobs[i] is None:
            return []
        return R.echo_logprob_entries(self.prompt_ids[i], self.prompt_logprobs[i], self.req.logprobs)

    async def _outputs(self) -> AsyncIterator:
        """The engine stream, keeping each prompt's prompt logprobs aside as they pass."""
        async for i, out in self.stream:
            if out.prompt_logprobs is not None:
                self.prompt_logprobs[i] = out.prompt_logprobs
            yield i, out

    async def response(self) -> bytes:
        texts, logprobs, finish, stop, tokens = await self.collect()
        choices = []
        for k, text in enumerate(texts):
            i = k // self.n
            prefix = self._echo(i)
            lp = None
            if self.req.logprobs is not None:
                echoed = self._echo_entries(i)  # with these, the offsets start at the prompt's first token
                lp, _ = R.completion_logprobs(echoed + logprobs[k], self.serving.token_text,
                                              0 if echoed else len(prefix))
            choices.append(R.completion_choice(k, prefix + text, lp, finish[k], stop[k],
                                               R.prompt_logprobs_list(self.prompt_logprobs[i],
                                                                      self.serving.token_text)))
        return R.completion_body(self.request_id, self.created, self.serving.model_name, choices,
                                 self.usage(tokens))

    async def _chunks(self) -> AsyncIterator[bytes]:
        build = R.CompletionChunks(self.request_id, self.created, self.serving.model_name)
        num = len(self.prompt_ids) * self.n
        offsets, echoed, tokens = [0] * num, [not self.req.echo] * num, 0
        async for i, out in self._outputs():
            for o in out.outputs:
                k = i * self.n + o.index
                tokens += len(o.token_ids)
                text, entries = o.text, o.logprobs or []
                if not echoed[k]:  # the prompt, and with logprobs its entries, go with the choice's first chunk
                    text, echoed[k] = self._echo(i) + text, True
                    entries = self._echo_entries(i) + entries
                lp = None
                if self.req.logprobs is not None and entries:
                    lp, offsets[k] = R.completion_logprobs(entries, self.serving.token_text, offsets[k])
                if text or lp or o.finish_reason is not None:
                    yield build.choice(k, text, lp, o.finish_reason, o.stop_reason)
        if self.req.include_usage:
            yield build.usage(self.usage(tokens))


class ChatJob(_Job):
    def __init__(self, serving, req: ChatRequest, request_id, prompts, params):
        super().__init__(serving, request_id, prompts, params)
        self.req = req

    def _logprobs(self, entries: list) -> dict | None:
        if not self.req.logprobs:
            return None
        return R.chat_logprobs(entries, self.serving.token_text, self.req.top_logprobs)

    def _tools(self) -> ChoiceTools | None:
        """Per choice: how its text becomes content and tool calls (None: plain content)."""
        req = self.req
        if req.tools is None or req.tool_choice == "none":
            return None
        return ChoiceTools(req.tool_choice, self.serving.tool_parser)

    async def response(self) -> bytes:
        texts, logprobs, finish, stop, tokens = await self.collect()
        choices = []
        for k, text in enumerate(texts):
            tools, calls = self._tools(), None
            if tools is not None:
                text, calls = tools.whole(text)
                finish[k] = tools.finish_reason(finish[k])
            choices.append(R.chat_choice(k, text, self._logprobs(logprobs[k]), finish[k], stop[k], calls))
        return R.chat_body(self.request_id, self.created, self.serving.model_name, choices, self.usage(tokens))

    async def _chunks(self) -> AsyncIterator[bytes]:
        build = R.ChatChunks(self.request_id, self.created, self.serving.model_name)
        for k in range(self.n):
            yield build.role(k)
        tokens = 0
        tools = [self._tools() for _ in range(self.n)]
        async for _, out in self.stream:
            for o in out.outputs:
                tokens += len(o.token_ids)
                lp = self._logprobs(o.logprobs) if o.logprobs else None
                t = tools[o.index]
                if t is None:
                    if o.text or lp or o.finish_reason is not None:
                        yield build.choice(o.index, o.text, lp, o.finish_reason, o.stop_reason)
                    continue
                deltas = t.feed(o.text) + (t.finish() if o.finish_reason is not None else [])
                for delta in deltas:
                    yield build.delta(o.index, delta)
                if lp or o.finish_reason is not None:
                    yield build.delta(o.index, {}, lp, t.finish_reason(o.finish_reason), o.stop_reason)
        if self.req.include_usage:
            yield build.usage(self.usage(tokens))


class OpenAIServing:
    def __init__(self, engine, tokenizer, served_names: list[str], max_model_len: int, vocab_size: int,
                 metrics: Metrics, model_root: str = "", max_waiting: int = DEFAULT_MAX_WAITING,
                 log_prompts: bool = False, tool_parser: str | None = None, log_requests: bool = True):
        self.engine = engine
        self.log_requests = log_requests  # one line per finished request, as vLLM prints (--disable-log-requests)
        self.tool_parser = tool_parser  # --tool-call-parser when --enable-auto-tool-choice: tool_choice "auto" works
        self.max_waiting = max_waiting
        self.log_prompts = log_prompts  # prompts reach the log only when the operator asked (--log-prompts)
        self.draining = False  # set on SIGTERM: new generations get 503 while running ones finish
        self.tokenizer = tokenizer
        self.served_names = served_names
        self.model_name = served_names[0]
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.metrics = metrics
        self.model_root = model_root
        self.token_text = TokenTexts(tokenizer)
        self.created = int(time.time())

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_names:
            raise APIError(f"The model `{model:.200}` does not exist.", 404, "model")

    def admit(self, num_prompts: int, n: int) -> None:
        """Refuse a generation the server should not queue: 503 while draining or when the waiting queue
        is full (with Retry-After), 400 when the request alone asks for more sequences than the queue holds."""
        if self.draining:
            raise APIError("The server is shutting down and takes no new requests.", 503, headers=RETRY_AFTER)
        num_seqs = num_prompts * n
        if num_seqs > self.max_waiting:
            raise APIError(f"This request asks for {num_seqs} sequences ({num_prompts} prompts x n={n}); the "
                           f"server accepts at most {self.max_waiting} in one request.", param="prompt")
        waiting = getattr(self.engine, "num_waiting", 0)
        if waiting >= self.max_waiting:
            raise APIError(f"The server is overloaded: {waiting} sequences are waiting (limit "
                           f"{self.max_waiting}). Retry later.", 503, headers=RETRY_AFTER)

    def _log_request(self, request_id: str, prompts: list, params: list[SamplingParams]) -> None:
        if self.log_prompts:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                logger.info("request %s-%d: prompt %r, params %s", request_id, i, prompt, p)

    def _check_ids(self, ids: list[int], param: str) -> list[int]:
        """Ids to detokenize or echo; a prompt's ids and the params' are checked by the engine when it adds the
        request (a ValueError there is this 400 too, before any byte is sent)."""
        try:
            check_token_ids(ids, self.vocab_size, param)
        except ValueError as e:
            raise APIError(str(e), param=param) from None
        return ids

    def _check_prompt_length(self, text: str) -> None:
        """The context-length 400 before encoding, for a text too long for the context whatever its ids: a 20 MB
        prompt costs a length check, not seconds of tokenizing and a gigabyte of ids. The bound is at most one
        token a character, so a text shorter than the context never needs it (nor the tokenizer's one-off scan of
        its vocabulary, which would otherwise land on the event loop with the first request)."""
        if len(text) < self.max_model_len:
            return
        need = self.tokenizer.min_tokens(text)
        if need >= self.max_model_len:
            raise APIError(f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                           f"prompt of {len(text)} characters has at least {need} tokens. Please reduce the length "
                           "of the messages or completion.")

    def _max_tokens(self, num_prompt: int, requested: int | None) -> int:
        """The completion budget, or the 400 vLLM gives when the prompt and completion exceed the context."""
        limit = self.max_model_len
        if requested is None:
            if num_prompt >= limit:
                raise APIError(f"This model's maximum context length is {limit} tokens. However, your request "
                               f"has {num_prompt} input tokens. Please reduce the length of the input messages.")
            return limit - num_prompt
        if num_prompt + requested > limit:
            raise APIError(f"This model's maximum context length is {limit} tokens. However, you requested "
                           f"{num_prompt + requested} tokens ({num_prompt} in the messages, {requested} in the "
                           "completion). Please reduce the length of the messages or completion.")
        return requested

    def _params(self, sampling: dict, num_prompt: int, requested: int | None) -> SamplingParams:
        # stop_token_ids and logit_bias against the vocabulary: the engine, when it adds the request
        return make_sampling_params({**sampling, "max_tokens": self._max_tokens(num_prompt, requested)})

    async def completion(self, req: CompletionRequest) -> CompletionJob:
        self.check_model(req.model)
        self.admit(len(req.prompts), req.sampling.get("n", 1))
        texts, prompts = [], []
        for p in req.prompts:
            if isinstance(p, str):
                texts.append(p)
                self._check_prompt_length(p)
                prompts.append(await self.encode(p, add_special_tokens=True))
            else:
                prompts.append(p)  # its ids are checked by the engine as it adds the request
                texts.append(self.tokenizer.decode(p, skip_special_tokens=False) if req.echo else "")
            if not prompts[-1]:
                raise APIError("the prompt is empty: give at least one token", param="prompt")
        params = [self._params(req.sampling, len(ids), req.max_tokens) for ids in prompts]
        await self.check_constraint(params[0])
        job = CompletionJob(self, req, f"cmpl-{uuid.uuid4().hex}", texts, prompts, params)
        self._log_request(job.request_id, req.prompts, params)
        return await _started(job)

    async def chat(self, req: ChatRequest) -> ChatJob:
        self.check_model(req.model)
        self.admit(1, req.sampling.get("n", 1))
        if req.tool_choice == "auto" and req.tools and self.tool_parser is None:
            raise APIError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                           param="tool_choice")
        template_kwargs = {**req.template_kwargs, "tools": req.tools} if req.tools else req.template_kwargs
        ids = await self.chat_prompt_ids(req.messages, req.add_generation_prompt, template_kwargs)
        params = self._params(req.sampling, len(ids), req.max_tokens)
        await self.check_constraint(params)
        job = ChatJob(self, req, f"chatcmpl-{uuid.uuid4().hex}", [ids], [params])
        self._log_request(job.request_id, [req.messages], [params])
        return await _started(job)

    async def check_constraint(self, params: SamplingParams) -> None:
        """Compile the request's structured-output grammar on a worker thread (cached per constraint, so the engine
        thread only copies it): a bad schema, regex or grammar is a 400 before anything is queued."""
        spec = params.structured_outputs
        if spec is None:
            return
        try:
            compiler = self.engine.engine.grammar_compiler
            await asyncio.to_thread(compiler.validate, spec)
        except ValueError as e:
            raise APIError(str(e), param="structured_outputs") from None

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of `text`; a long text is encoded on a worker thread so the event loop keeps serving."""
        if len(text) < LONG_TEXT_CHARS:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens)

    async def chat_prompt_ids(self, messages: list, add_generation_prompt: bool, template_kwargs: dict,
                              add_special_tokens: bool = False) -> list[int]:
        """The rendered chat prompt's ids; the template adds BOS itself, hence no special tokens by default."""
        render = functools.partial(self.tokenizer.apply_chat_template, messages, add_generation_prompt,
                                   **template_kwargs)
        try:  # long messages are rendered on a worker thread: the event loop keeps its turns (GIL switches)
            prompt = render() if _message_chars(messages) < LONG_TEXT_CHARS else await asyncio.to_thread(render)
        except ValueError as e:
            raise APIError(str(e), param="messages") from None
        self._check_prompt_length(prompt)
        ids = await self.encode(prompt, add_special_tokens)
        if not ids:
            raise APIError("the chat template rendered an empty prompt", param="messages")
        return ids

    async def tokenize(self, req: dict) -> bytes:
        self.check_model(req["model"])
        if "messages" in req:
            ids = await self.chat_prompt_ids(req["messages"], req["add_generation_prompt"], req["template_kwargs"],
                                             req["add_special_tokens"])
        else:
            ids = await self.encode(req["prompt"], req["add_special_tokens"])
        strs = [self.tokenizer.id_to_token(t) for t in ids] if req["return_token_strs"] else None
        return orjson.dumps({"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids,
                             "token_strs": strs})

    def detokenize(self, model: str | None, ids: list[int]) -> bytes:
        self.check_model(model)
        text = self.tokenizer.decode(self._check_ids(ids, "tokens"), skip_special_tokens=False)
        return orjson.dumps({"prompt": text})

    def models(self) -> bytes:
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "cupyllm",
                 "root": self.model_root or name, "parent": None, "max_model_len": self.max_model_len,
                 "permission": []} for name in self.served_names]
        return orjson.dumps({"object": "list", "data": data})


def _message_chars(messages: list) -> int:
    """Characters of the messages' text contents (string contents and text parts): what the template renders."""
    total = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return total


async def _started(job: _Job) -> _Job:
    """Wait for the job's first output; on failure abort what was started and raise the APIError."""
    try:
        await job.stream.start()
    except BaseException:
        await job.aclose()
        raise
    return job
