"""What the engine hands back per step: new text, tokens and logprobs since the last output (deltas),
and the per-sequence post-processing that produces them (detokenize, stop checks).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.sequence import Sequence
from engine.tokenizer import IncrementalDetokenizer, Tokenizer

# (sampled token id, its logprob, [(top id, top logprob), ...]) per generated token
TokenLogprob = tuple[int, float, list[tuple[int, float]]]
# (prompt token id, its logprob given the tokens before it, its rank in that distribution (1 = the most likely;
# vLLM's rank: how many tokens have a logprob >= its), [(top id, top logprob), ...]) per prompt token after the
# first; RequestOutput.prompt_logprobs is a list aligned with the prompt whose first entry is None
PromptLogprob = tuple[int, float, int, list[tuple[int, float]]]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str  # new text since this request's previous output
    token_ids: list[int]  # new token ids
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]  # the choices with news: a finished choice appears once more, no later
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)
    # SamplingParams.prompt_logprobs: [None, PromptLogprob, ...] aligned with the prompt, in the request's first
    # output only (later deltas carry None)
    prompt_logprobs: list[PromptLogprob | None] | None = None

    def merge(self, later: "RequestOutput") -> None:
        """Fold a later delta into this one (offline generate keeps whole outputs)."""
        by_index = {o.index: o for o in self.outputs}
        for o in later.outputs:
            mine = by_index.get(o.index)
            if mine is None:
                self.outputs.append(o)
                by_index[o.index] = o
                continue
            mine.text += o.text
            mine.token_ids = mine.token_ids + o.token_ids
            if o.logprobs is not None:
                mine.logprobs = (mine.logprobs or []) + o.logprobs
            mine.finish_reason, mine.stop_reason = o.finish_reason, o.stop_reason
        self.outputs.sort(key=lambda o: o.index)
        if self.prompt_logprobs is None:
            self.prompt_logprobs = later.prompt_logprobs
        self.finished = later.finished
        self.num_cached_tokens = later.num_cached_tokens


class SequenceOutputState:
    """Incremental text of one sequence, with stop-string detection that works across token
    boundaries: text that could still turn into a stop string is held back until it cannot."""

    __slots__ = ("detok", "text", "sent_chars", "sent_tokens", "sent_logprobs", "hold_back", "stops",
                 "finish_sent")

    def __init__(self, tokenizer: Tokenizer, seq: Sequence):
        p = seq.params
        # No tokenizer (skip_tokenizer_init): token ids only, the text stays empty.
        self.detok = None if tokenizer is None else IncrementalDetokenizer(
            tokenizer, seq.prompt_token_ids, p.skip_special_tokens, p.spaces_between_special_tokens)
        self.stops = tuple(p.stop or ())
        self.hold_back = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent_chars = self.sent_tokens = self.sent_logprobs = 0
        self.finish_sent = False

    def append(self, seq: Sequence, token_id: int, check_stops: bool) -> str | None:
        """Add the text of a new token; returns the stop string it completed, if any."""
        new = self.detok.add(token_id) if self.detok is not None else ""
        if not new:
            return None
        start = max(0, len(self.text) - self.hold_back)
        self.text += new
        if not check_stops:
            return None
        for stop in self.stops:
            at = self.text.find(stop, start)
            if at >= 0:
                keep = at + len(stop) if seq.params.include_stop_str_in_output else at
                self.text = self.text[:keep]
                return stop
        return None

    def flush(self) -> None:
        if self.detok is not None:
            self.text += self.detok.flush()

    def delta(self, seq: Sequence) -> CompletionOutput | None:
        """What is new since the last delta; None once the finish has been reported."""
        if self.finish_sent:
            return None
        self.finish_sent = seq.is_finished
        upto = len(self.text) if seq.is_finished else max(self.sent_chars, len(self.text) - self.hold_back)
        text = self.text[self.sent_chars:upto]
        self.sent_chars = upto
        out_ids = seq.token_ids[seq.num_prompt_tokens + self.sent_tokens:]
        self.sent_tokens += len(out_ids)
        logprobs = None
        if seq.logprobs is not None:
            logprobs = seq.logprobs[self.sent_logprobs:]
            self.sent_logprobs = len(seq.logprobs)
        return CompletionOutput(seq.index, text, out_ids, logprobs, seq.finish_reason, seq.stop_reason)


def collect_prompt_logprobs(parts, requests: dict) -> None:
    """Append what a step computed (ModelRunner.prompt_logprobs: `parts`) to the prompt logprobs of each request of
    `requests` (LLMEngine's). Each choice computes its positions in order from the first (such requests take no
    prefix-cache hits); positions already known (another choice's, or recomputed after a preemption) are dropped."""
    for part in parts:
        req = requests.get(part.seq.request_id)
        if req is None or req.prompt_logprobs is None:
            continue
        have = req.prompt_logprobs
        if part.first > len(have):
            raise RuntimeError(f"prompt logprobs of request {req.request_id} from token {part.first} while "
                               f"{len(have)} are known: a prompt position was skipped")
        tokens = part.seq.token_ids
        for j in range(len(have) - part.first, len(part.logprobs)):
            top = [] if part.top_ids is None else [(int(i), float(v)) for i, v in
                                                   zip(part.top_ids[j], part.top_logprobs[j])]
            have.append((tokens[part.first + j], float(part.logprobs[j]), int(part.ranks[j]), top))
