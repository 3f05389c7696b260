"""OpenAI response bodies and server-sent-event chunks, serialized with orjson.

Chunk builders pre-serialize the fields every chunk of a request shares (id, created, model), so
a token's chunk costs one small orjson.dumps.
"""
from __future__ import annotations

from collections.abc import Callable

import orjson

from engine.outputs import PromptLogprob, TokenLogprob

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps to the same value

TokenText = Callable[[int], str]


def sse(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens, "prompt_tokens_details": None}


def _lp(value: float) -> float:
    return value if value > MIN_LOGPROB else MIN_LOGPROB  # also maps NaN to the floor


def completion_logprobs(entries: list[TokenLogprob], token_text: TokenText, text_offset: int) -> tuple[dict, int]:
    """The legacy completions logprobs object, and the text offset after its last token.

    `text_offset` is where the first token's text starts in the choice's text. An entry whose logprob is None
    (an echoed prompt's first token) has null token_logprobs and top_logprobs, as in vLLM.
    """
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, logprob, top in entries:
        text = token_text(token_id)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        if logprob is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_lp(logprob))
        alternatives = {token_text(i): _lp(v) for i, v in top}
        alternatives.setdefault(text, _lp(logprob))  # the sampled token is always listed, as in vLLM
        top_logprobs.append(alternatives)
    return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens,
            "top_logprobs": top_logprobs}, text_offset


def chat_logprobs(entries: list[TokenLogprob], token_text: TokenText, top_n: int) -> dict:
    content = []
    for token_id, logprob, top in entries:
        text = token_text(token_id)
        content.append({"token": text, "logprob": _lp(logprob), "bytes": list(text.encode()),
                        "top_logprobs": [{"token": (t := token_text(i)), "logprob": _lp(v), "bytes": list(t.encode())}
                                         for i, v in top[:top_n]]})
    return {"content": content}


def completion_body(request_id: str, created: int, model: str, choices: list[dict], usage_: dict) -> bytes:
    return orjson.dumps({"id": request_id, "object": "text_completion", "created": created, "model": model,
                         "choices": choices, "usage": usage_, "system_fingerprint": None})


def echo_logprob_entries(prompt_ids: list[int], prompt_logprobs: list[PromptLogprob | None],
                         top_n: int) -> list[tuple]:
    """The echoed prompt's entries of the legacy logprobs (completion_logprobs' form): the first token without a
    logprob, then each token's with at most `top_n` alternatives."""
    entries = [(prompt_ids[0], None, None)]
    entries += [(token_id, logprob, top[:top_n]) for token_id, logprob, _, top in prompt_logprobs[1:]]
    return entries


def prompt_logprobs_list(prompt_logprobs: list[PromptLogprob | None] | None, token_text: TokenText) -> list | None:
    """vLLM's `prompt_logprobs` of a completion choice: null for the first prompt token, then per token
    {token id: {logprob, rank, decoded_token}} of the prompt token and its best alternatives (ranks 1..N)."""
    if prompt_logprobs is None:
        return None
    out = [None]
    for token_id, logprob, rank, top in prompt_logprobs[1:]:
        entry = {str(token_id): {"logprob": _lp(logprob), "rank": rank, "decoded_token": token_text(token_id)}}
        for r, (i, v) in enumerate(top, 1):  # the prompt token among them takes its place's rank, as in vLLM
            entry[str(i)] = {"logprob": _lp(v), "rank": r, "decoded_token": token_text(i)}
        out.append(entry)
    return out


def completion_choice(index: int, text: str, logprobs: dict | None, finish_reason, stop_reason,
                      prompt_logprobs: list | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason, "prompt_logprobs": prompt_logprobs}


def chat_body(request_id: str, created: int, model: str, choices: list[dict], usage_: dict) -> bytes:
    return orjson.dumps({"id": request_id, "object": "chat.completion", "created": created, "model": model,
                         "choices": choices, "usage": usage_, "system_fingerprint": None})


def chat_choice(index: int, text: str | None, logprobs: dict | None, finish_reason, stop_reason,
                tool_calls: list | None = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text, "tool_calls": tool_calls or []},
            "logprobs": logprobs, "finish_reason": finish_reason, "stop_reason": stop_reason}


class _Chunks:
    """SSE chunks of one response: `data: {id, object, created, model, choices: [...]}`."""

    def __init__(self, request_id: str, created: int, model: str, object_name: str):
        head = orjson.dumps({"id": request_id, "object": object_name, "created": created, "model": model})
        self._prefix = b"data: " + head[:-1] + b',"choices":['
        self._head = {"id": request_id, "object": object_name, "created": created, "model": model}

    def _choice(self, choice: dict) -> bytes:
        return self._prefix + orjson.dumps(choice) + b"]}\n\n"

    def usage(self, usage_: dict) -> bytes:
        return sse({**self._head, "choices": [], "usage": usage_})


class CompletionChunks(_Chunks):
    def __init__(self, request_id: str, created: int, model: str):
        super().__init__(request_id, created, model, "text_completion")

    def choice(self, index: int, text: str, logprobs: dict | None = None, finish_reason=None,
               stop_reason=None) -> bytes:
        return self._choice({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
                             "stop_reason": stop_reason})


class ChatChunks(_Chunks):
    def __init__(self, request_id: str, created: int, model: str):
        super().__init__(request_id, created, model, "chat.completion.chunk")

    def role(self, index: int) -> bytes:
        return self._choice({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})

    def choice(self, index: int, text: str, logprobs: dict | None = None, finish_reason=None,
               stop_reason=None) -> bytes:
        return self.delta(index, {"content": text} if text else {}, logprobs, finish_reason, stop_reason)

    def delta(self, index: int, delta: dict, logprobs: dict | None = None, finish_reason=None,
              stop_reason=None) -> bytes:
        """A chunk with any delta body: content, or tool_calls fragments (api/chat_tools.py)."""
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        return self._choice(choice)
