"""Continuous batching under a token budget: running sequences first, then new prefill chunks.

When the KV cache runs out, the most recently admitted running sequence is preempted by
recompute: its blocks are freed and it goes back to the front of the waiting queue.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed this step (num_computed_tokens before the step)
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the sequence, so its last row yields a token."""
        return self.start + self.num_tokens == self.seq.num_tokens

    @property
    def num_sampled_rows(self) -> int:
        """Rows that yield a token: the last one, and with speculative proposals one per proposal before it."""
        return self.seq.num_spec + 1 if self.samples else 0


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n == 0:  # its last token is still being sampled and ends it (one step ahead): nothing to run
                i += 1
                continue
            while not self.block_manager.allocate(seq, n):
                victim = self.running.pop()  # the newest running sequence gives way
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
                budget -= n
                i += 1
        # New sequences only when nothing had to be preempted: they would take its blocks back.
        while (self.waiting and budget > 0 and not out.preempted
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[0]
            hits = self.block_manager.find_cached_prefix(seq)
            n = min(seq.num_tokens - len(hits) * self.block_manager.block_size, budget)
            if not self.block_manager.allocate(seq, n, hits):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
            budget -= n
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_tokens
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take `seq` out of the queues and return its blocks (finished, stopped or aborted)."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
