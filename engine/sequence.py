"""Sequence: one generated continuation (a request with n > 1 owns n of them) and its progress.

The scheduler counts tokens, not phases: `num_computed_tokens` catches up with `num_tokens`;
prefill, chunked prefill, prefix-cache hits and decode are all the same motion.
"""
from __future__ import annotations

import enum
import itertools
import time

from engine.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    __slots__ = ("seq_id", "request_id", "index", "token_ids", "num_prompt_tokens", "params", "seed",
                 "arrival_time", "status", "num_computed_tokens", "num_cached_tokens", "block_table",
                 "block_hashes", "finish_reason", "stop_reason", "logprobs", "first_token_time", "pending_row",
                 "num_spec", "draft_computed", "grammar", "num_released_blocks")

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 seed: int, arrival_time: float | None = None):
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index  # choice index within its request
        self.token_ids = list(prompt_token_ids)  # prompt, then every generated token
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.seed = seed  # the counter-based sampler's key; step = number of generated tokens
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_tokens = 0  # of those, how many came from prefix-cache hits
        self.block_table: list[int] = []  # -1: a block released because the sliding window has passed it
        self.num_released_blocks = 0  # the first entries of block_table released so (BlockManager.window)
        self.block_hashes: list[int] = []  # hash chain of the full blocks, computed lazily
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.stop_reason: int | str | None = None  # the stop token id or stop string that matched
        self.logprobs: list | None = [] if params.logprobs is not None else None
        self.first_token_time: float | None = None
        # >= 0 while the last token is a placeholder: its id is that row of a launched step's sample, not
        # yet on the host (the engine schedules one step ahead; see LLMEngine.step)
        self.pending_row = -1
        # the last num_spec tokens are proposals (speculative decoding) the next step verifies, not output yet
        self.num_spec = 0
        self.draft_computed = 0  # positions whose K/V a draft model (speculative decoding) holds in its own cache
        self.grammar = None  # structured output: its engine.structured.SequenceGrammar, advanced per sampled token

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}#{self.index}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, {self.status.value})")
