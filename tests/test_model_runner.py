"""ModelRunner.prepare: the step's token ids, positions and paged-cache metadata, checked token by token
against the definition (position p of a sequence lives in slot table[p // 16] * 16 + p % 16)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSeq, SchedulerOutput
from engine.sequence import Sequence

BS = 16


def _batch(rng, shapes):
    """shapes: (context already computed, tokens this step) per sequence; blocks drawn at random."""
    items, free = [], list(rng.permutation(10_000))
    for i, (start, num) in enumerate(shapes):
        seq = Sequence(f"r{i}", 0, rng.integers(0, 1000, start + num).tolist(), SamplingParams(), 0)
        seq.block_table = [int(free.pop()) for _ in range(-(-(start + num) // BS))]
        items.append(ScheduledSeq(seq, start, num))
    return SchedulerOutput(items)


@pytest.mark.parametrize("shapes", [
    [(0, 1)],                                     # a one-token prompt
    [(37, 1), (15, 1), (16, 1), (300, 1)],        # decodes across block edges
    [(0, 40), (5, 1), (16, 17), (100, 3), (0, 1)],  # prefills, a chunk, decodes mixed
])
def test_prepare_matches_token_by_token_definition(shapes, rng):
    sched = _batch(rng, shapes)
    ids, positions, meta = ModelRunner.prepare(SimpleNamespace(block_size=BS), sched)
    want_ids, want_pos, want_slots, row = [], [], [], 0
    for b, s in enumerate(sched.scheduled):
        assert meta.query_start_loc[b] == row
        for p in range(s.start, s.start + s.num_tokens):
            want_ids.append(s.seq.token_ids[p])
            want_pos.append(p)
            want_slots.append(s.seq.block_table[p // BS] * BS + p % BS)
            row += 1
        assert meta.seq_lens[b] == s.start + s.num_tokens
        assert list(meta.block_tables[b, :len(s.seq.block_table)]) == s.seq.block_table
        assert not meta.block_tables[b, len(s.seq.block_table):].any()  # padded with block 0
    assert meta.query_start_loc[-1] == row
    for got, want in ((ids, want_ids), (positions, want_pos), (meta.slot_mapping, want_slots)):
        assert got.dtype == np.int32 and got.tolist() == want
    assert meta.max_query_len == max(n for _, n in shapes)
    assert meta.max_seq_len == max(s + n for s, n in shapes)
