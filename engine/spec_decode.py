"""Speculative decoding: proposers, the acceptance rule, and its counters.

A proposal is a list of K token ids the sequence may continue with. The engine appends them to the sequence's
tokens, the scheduler runs all K + 1 positions in one target forward (the small-query path over the paged cache),
and every position is sampled with the sequence's own sampler state: position j with the output so far plus the
first j proposals as penalty history, and step counter (tokens generated) + j.

The rule. Proposals are single tokens (point masses q = 1 at d_j): n-gram lookup is one, and draft models propose
their argmax. For such q the standard rule (accept d_j with probability min(1, p(d_j) / q(d_j)) = p(d_j); on
rejection draw from the residual max(0, p - q), normalised) is the same as: draw t_j from p as the plain sampler
would, accept d_j exactly when t_j == d_j, and on rejection emit t_j. P(t_j = d_j) = p(d_j), and t_j conditioned
on t_j != d_j is p restricted to the other tokens, renormalised: the residual. The first rejected position
emits its t_j; when all K are accepted, position K's draw is the bonus token.

Because the sampler is counter-based (a Philox stream keyed by the request seed and the step), each t_j is the
very token the same request would draw without speculation at that step, given the same prefix. So output with
speculation is not just distributed as the target's: it is identical, greedy or seeded, logprobs included.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from engine.config import ConfigError


class NgramProposer:
    """Prompt lookup (vLLM's method "ngram"): find the latest earlier occurrence of the sequence's last n tokens
    (n from prompt_lookup_max down to prompt_lookup_min) and propose the tokens that followed it."""

    def __init__(self, num_speculative_tokens: int, prompt_lookup_max: int, prompt_lookup_min: int):
        self.k, self.n_max, self.n_min = num_speculative_tokens, prompt_lookup_max, prompt_lookup_min

    def propose(self, token_ids: list[int], k: int | None = None) -> list[int]:
        k = self.k if k is None else k
        length = len(token_ids)
        if k <= 0 or length < self.n_min + 1:
            return []
        tokens = np.asarray(token_ids, np.int64)
        for n in range(min(self.n_max, length - 1), self.n_min - 1, -1):
            tail = tokens[length - n:]
            # windows starting at 0 .. length - n - 1: every earlier n-gram, the tail itself excluded
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:length - 1], n)
            hits = np.flatnonzero((windows == tail).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n  # the latest match: the freshest continuation
                return token_ids[start:start + k]
        return []


@dataclass(slots=True)
class SpecDecodeStats:
    """vLLM's spec-decode counters: drafts (proposals verified), draft tokens, accepted tokens, and accepted
    tokens per position (index j: proposals whose j-th token was accepted)."""
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    def record(self, proposed: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        if len(self.accepted_per_pos) < proposed:
            self.accepted_per_pos += [0] * (proposed - len(self.accepted_per_pos))
        for j in range(accepted):
            self.accepted_per_pos[j] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verify step emits per sequence on average: the accepted proposals plus the one drawn."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


class GreedyDraftProposer:
    """Greedy drafting over the paged cache, for two methods:
    - "self_draft": the target's first `num_layers` layers, its final norm and lm_head. Those layers are the
      target's own weights on the same tokens, so their K/V are what the target computes there: the draft writes
      straight into the target's cache (slots the verify step rewrites with the same values, or later steps
      overwrite), and it is always caught up.
    - "draft_model": the runner's DraftModel, with a cache of its own (`own_cache`): seq.draft_computed says how
      many of a sequence's positions it holds, and the first forward of a proposal also catches it up on the rest
      (the prompt, the tokens accepted since).
    A proposal's first forward drafts the first token; then one token a forward."""

    def __init__(self, runner, block_manager, model, kv_caches, num_layers: int | None = None,
                 own_cache: bool = False):
        self.runner, self.block_manager = runner, block_manager
        self.model, self.kv_caches, self.num_layers, self.own_cache = model, kv_caches, num_layers, own_cache

    def propose_batch(self, wants: list[tuple]) -> list[list[int]]:
        """wants: (seq, k) of sequences in plain decode; the drafts, k tokens each ([] where no slots are left)."""
        from engine.scheduler import ScheduledSeq

        # the slots of the verify step's K + 1 positions, taken now (the scheduler's allocate finds them there)
        drafting = [(seq, k) for seq, k in wants if self.block_manager.allocate(seq, k + 1)]
        start = {id(seq): seq.num_tokens for seq, _ in drafting}
        if drafting:
            self._draft([ScheduledSeq(seq, first, seq.num_tokens - first) for seq, _ in drafting
                         for first in [seq.draft_computed if self.own_cache else seq.num_computed_tokens]])
        for j in range(1, max((k for _, k in drafting), default=0)):
            self._draft([ScheduledSeq(seq, seq.num_tokens - 1, 1) for seq, k in drafting if k > j])
        drafts = {}
        for seq, k in drafting:
            if self.own_cache:
                seq.draft_computed = start[id(seq)] + k - 1  # the last draft's K/V is not in (never an input)
            drafts[id(seq)] = seq.token_ids[start[id(seq)]:]
            del seq.token_ids[start[id(seq)]:]
        return [drafts.get(id(seq), []) for seq, _ in wants]

    def _draft(self, scheduled) -> None:
        """One draft forward over the scheduled spans; each sequence's greedy next token appended to its tokens."""
        from engine.sampling_params import SamplingParams
        from engine.scheduler import SchedulerOutput
        from ops.sampling_types import SamplingTensors

        runner, model = self.runner, self.model
        b = runner.backend
        input_ids, positions, meta = runner.prepare(SchedulerOutput(scheduled))
        vocab = model.config.vocab_size  # ids past it are the target's padding rows: the draft reads token 0 there
        input_ids = np.where(input_ids < vocab, input_ids, 0).astype(np.int32)
        hidden = model.forward(*runner.upload(input_ids, positions, meta), self.kv_caches, self.num_layers)
        rows = b.from_host(np.asarray(meta.query_start_loc[1:] - 1, np.int32))
        greedy = (SamplingParams(temperature=0.0), (), (), 0, ())
        ids = b.sample(model.compute_logits(hidden[rows]), SamplingTensors.build([greedy] * len(scheduled), vocab)
                       ).token_ids
        for s, token in zip(scheduled, ids):
            s.seq.token_ids.append(int(token))


class OracleProposer:
    """For measuring speculation where dummy weights make real proposals meaningless (`cupyllm benchmark
    --spec-acceptance`): each of its K proposals is "right" with probability `acceptance`, independently, and the
    engine takes a right one as the target's own draw at its position (settle), a wrong one as differing from it.

    Why not the plain run's greedy tokens: with random weights the top logits are near ties everywhere, and the
    verify forward (K + 1 query rows, other GEMM shapes) rounds differently from a decode step, so the two runs part
    within a few tokens and every later proposal misses. Settling the verdicts here keeps the GPU's work exactly
    what speculation at acceptance rate a costs (the same verify forwards, the same accepted lengths and rollbacks);
    only the token values are the oracle's, which on dummy weights mean nothing either way."""

    def __init__(self, acceptance: float, vocab: int, seed: int = 0):
        self.acceptance, self.vocab = acceptance, vocab
        self.rng = np.random.default_rng(seed)
        self._pending: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # seq_id -> (proposal, right)

    def propose_batch(self, wants: list) -> list[list[int]]:
        out = []
        for seq, k in wants:
            proposal = self.rng.integers(0, self.vocab, k)
            self._pending[seq.seq_id] = (proposal, self.rng.random(k) < self.acceptance)
            out.append(proposal.tolist())
        return out

    def settle(self, seq, draws: np.ndarray) -> None:
        """draws: the verify step's K + 1 sampled ids of seq (a writable view): the right proposals become the draws
        at their positions, and a wrong one never equals its draw."""
        proposal, right = self._pending.pop(seq.seq_id)
        k = len(proposal)
        head = draws[:k]
        head[right] = proposal[right]
        clash = ~right & (head == proposal)
        head[clash] = (proposal[clash] + 1) % self.vocab


class AcceptanceGate:
    """Turns speculation off for a sequence whose proposals keep failing: an exponential average of its
    acceptance rate; below `floor` the sequence decodes plainly for `pause` steps, then tries again."""

    def __init__(self, floor: float = 0.2, weight: float = 0.3, pause: int = 32, enabled: bool = True):
        self.enabled = enabled  # off: always speculate (the benchmark's cost curve)
        self.floor, self.weight, self.pause = floor, weight, pause
        self.rate: dict[int, float] = {}
        self.paused_until: dict[int, int] = {}

    def allows(self, seq_id: int, step: int) -> bool:
        return not self.enabled or self.paused_until.get(seq_id, -1) <= step

    def update(self, seq_id: int, step: int, proposed: int, accepted: int) -> None:
        rate = self.rate.get(seq_id, 1.0) * (1 - self.weight) + self.weight * accepted / proposed
        self.rate[seq_id] = rate
        if rate < self.floor:
            self.paused_until[seq_id] = step + self.pause
            self.rate[seq_id] = self.floor  # a fresh try after the pause gets a few chances

    def forget(self, seq_id: int) -> None:
        self.rate.pop(seq_id, None)
        self.paused_until.pop(seq_id, None)


def build_proposer(spec, runner, block_manager, num_layers: int):
    """The proposer of `spec` (a SpeculativeConfig) for the target of `runner`; ConfigError where it cannot run."""
    if spec.method == "self_draft":
        if not spec.draft_layers < num_layers:
            raise ConfigError(f"speculative_config draft_layers {spec.draft_layers} must be fewer than the "
                              f"model's {num_layers} layers")
        return GreedyDraftProposer(runner, block_manager, runner.model, runner.kv_caches, spec.draft_layers)
    if spec.method == "draft_model":
        if block_manager.window:
            raise ConfigError("speculative_config method draft_model: the target has sliding-window attention, so its "
                              "blocks outside the window are released, and a draft model reads the same block tables; "
                              "use ngram or self_draft with this model")
        if runner.draft is None:
            raise ConfigError("speculative_config method draft_model: the engine was built without its draft "
                              "(give the speculative config when the engine is made)")
        return GreedyDraftProposer(runner, block_manager, runner.draft.model, runner.draft.kv_caches, own_cache=True)
    return NgramProposer(spec.num_speculative_tokens, spec.prompt_lookup_max, spec.prompt_lookup_min)


class Speculator:
    """The engine's speculative decoding: before a step, proposals appended to the running sequences' tokens; after
    it, each verified against its rows' draws (the rule above). Owns the proposer, the gate, the counters and the
    step count the gate reads; the engine hands it the scheduler and block manager it shares, and its per-token
    append (LLMEngine._append_token: stop checks, detokenizing) for the tokens a verify emits.

    One step ahead stays on: a step that may propose lands the step in flight first (may_propose), and a verify step
    is never deferred; steps where every sequence's proposals are paused run ahead as without speculation."""

    def __init__(self, spec, proposer, gate: AcceptanceGate, scheduler, block_manager, max_model_len: int,
                 max_num_batched_tokens: int):
        self.spec, self.proposer, self.gate = spec, proposer, gate
        self.scheduler, self.block_manager = scheduler, block_manager
        self.max_model_len, self.max_num_batched_tokens = max_model_len, max_num_batched_tokens
        self.stats = SpecDecodeStats()
        self.steps = 0  # propose() calls: the gate's clock

    def may_propose(self) -> bool:
        """Whether the next propose() could propose for some running sequence (its gate open, no grammar, a batch
        small enough): then the ids in flight must land first."""
        running, step = self.scheduler.running, self.steps + 1
        return 0 < len(running) <= self.spec.disable_by_batch_size and any(
            seq.grammar is None and self.gate.allows(seq.seq_id, step) for seq in running)

    def propose(self) -> None:
        """Proposals for the running sequences in plain decode, when the batch is small enough to gain."""
        spec, running = self.spec, self.scheduler.running
        self.steps += 1
        if not running or len(running) > spec.disable_by_batch_size:
            return
        t0 = time.perf_counter()
        # The running sequences are scheduled first and whole while the budget lasts: keep every proposal inside
        # it, so that no step computes a proposal without the rows that verify it.
        room = self.max_num_batched_tokens - sum(s.num_tokens - s.num_computed_tokens for s in running)
        wants = []
        for seq in running:
            if seq.num_computed_tokens != seq.num_tokens - 1 or seq.pending_row >= 0 or seq.grammar is not None \
                    or not self.gate.allows(seq.seq_id, self.steps):
                continue
            k = min(spec.num_speculative_tokens, self.max_model_len - seq.num_tokens - 1, room)
            if seq.params.max_tokens is not None:
                k = min(k, seq.params.max_tokens - seq.num_output_tokens - 1)
            if k > 0:
                wants.append((seq, k))
                room -= k
        batch = getattr(self.proposer, "propose_batch", None)  # a draft model drafts for the batch at once
        proposals = batch(wants) if batch else [self.proposer.propose(seq.token_ids, k) for seq, k in wants]
        for (seq, k), proposal in zip(wants, proposals):
            if proposal:  # a short one filled up to k (the verify graphs take k a sequence): more to accept, or not
                proposal = proposal + [proposal[-1]] * (k - len(proposal))
                seq.token_ids.extend(proposal)
                seq.num_spec = len(proposal)
        self.stats.draft_seconds += time.perf_counter() - t0

    def drop_unscheduled(self, sched) -> None:
        """Preempted sequences start over without their proposals (no step ever computes them partly: proposals
        are made only where the whole batch's fit the token budget)."""
        verified = {id(s.seq) for s in sched.scheduled if s.samples}
        for seq in (*sched.preempted, *self.scheduler.running):
            if seq.num_spec and id(seq) not in verified:
                assert seq.num_computed_tokens < seq.num_tokens - seq.num_spec, "proposals partly scheduled"
                del seq.token_ids[-seq.num_spec:]
                seq.num_spec = 0
            # a draft model's cache: valid up to the tokens that stand; a preempted sequence's blocks are gone
            seq.draft_computed = 0 if seq.num_computed_tokens == 0 else min(seq.draft_computed, seq.num_tokens)

    def verify(self, seq, sampled, first: int, append) -> None:
        """Rows first .. first + K of `sampled` drew the tokens of the positions of seq's K proposals and the one
        after: keep the proposals up to the first that differs from its position's draw, emit the draws up to
        there with append(seq, sampled, row) (the last one a correction, or the bonus when all K matched), and roll
        the cache back."""
        k = seq.num_spec
        proposals = seq.token_ids[-k:]
        settle = getattr(self.proposer, "settle", None)
        if settle is not None:  # the benchmark's OracleProposer decides which proposals the target drew
            settle(seq, sampled.token_ids[first:first + k + 1])
        del seq.token_ids[-k:]
        seq.num_spec = 0
        verified_from = seq.num_tokens  # positions from here held proposals in this step's forward
        accepted = 0
        for j in range(k + 1):
            token = int(sampled.token_ids[first + j])
            append(seq, sampled, first + j)
            match = j < k and token == proposals[j]
            accepted += match
            if seq.is_finished or not match:
                break
        self.stats.record(k, accepted)
        self.gate.update(seq.seq_id, self.steps, k, accepted)
        if not seq.is_finished:
            seq.num_computed_tokens = seq.num_tokens - 1  # the last draw's K/V is not in the cache yet
            seq.draft_computed = min(seq.draft_computed, seq.num_computed_tokens)
            self.block_manager.rollback(seq, verified_from)
