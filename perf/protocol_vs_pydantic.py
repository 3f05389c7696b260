"""Request validation, per request: api/protocol.py's hand-written parser against pydantic models of the same
fields (what vLLM uses), on perf/bench_protocol.py's completion and chat bodies, each ending in SamplingParams.

The models check what protocol.py checks for these bodies (types, ranges, stop as a string or a list, logit_bias
keys as token ids, messages as role + string or text parts); fields they do not use are left out, which only
flatters pydantic. pydantic is a dependency of the openai client (a test dependency), not of cupyllm.

    python perf/protocol_vs_pydantic.py [--repeat 2000] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import timeit
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.protocol import make_sampling_params, parse_chat, parse_completion, parse_json
from perf.bench_protocol import CHAT, COMPLETION


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    n: int | None = Field(None, ge=1, le=128)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    logit_bias: dict[int, float] | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v):
        if v and any(not -100 <= x <= 100 for x in v.values()):
            raise ValueError("'logit_bias' values must be in [-100, 100]")
        return v

    def sampling(self) -> dict:
        names = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "seed", "stop", "stop_token_ids", "min_tokens", "ignore_eos", "logit_bias")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


class _Completion(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class _Part(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[_Part] | None = None


class _Chat(_Sampling):
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def hand_completion():
    req = parse_completion(parse_json(COMPLETION))
    return make_sampling_params({**req.sampling, "max_tokens": req.max_tokens})


def pydantic_completion():
    req = _Completion.model_validate_json(COMPLETION)
    return make_sampling_params({**req.sampling(), "max_tokens": req.max_tokens})


def hand_chat():
    req = parse_chat(parse_json(CHAT))
    return make_sampling_params({**req.sampling, "max_tokens": req.max_tokens})


def pydantic_chat():
    req = _Chat.model_validate_json(CHAT)
    return make_sampling_params({**req.sampling(), "max_tokens": req.max_completion_tokens or req.max_tokens})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=2000)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    assert hand_completion() == pydantic_completion() and hand_chat() == pydantic_chat()  # the same parameters
    rows = []
    for name, hand, typed in (("completion", hand_completion, pydantic_completion), ("chat", hand_chat, pydantic_chat)):
        us = {}
        for impl, fn in (("hand", hand), ("pydantic", typed)):
            us[impl] = min(timeit.repeat(fn, number=args.repeat, repeat=5)) / args.repeat * 1e6
        rows.append({"bench": "request_validation", "request": name, "hand_us": round(us["hand"], 2),
                     "pydantic_us": round(us["pydantic"], 2)})
        print(f"{name:<11} hand-written {us['hand']:7.2f} us, pydantic {us['pydantic']:7.2f} us a request")
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
