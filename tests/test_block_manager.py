"""Block manager and scheduler invariants: ref counts, prefix-cache reuse, LRU eviction, budgets."""
from __future__ import annotations

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus


def _seq(tokens, rid="r"):
    return Sequence(rid, 0, list(tokens), SamplingParams(), seed=0)


def test_allocate_is_all_or_nothing_and_free_returns_blocks():
    bm = BlockManager(4)
    a = _seq(range(40))  # 3 blocks
    assert bm.allocate(a, 40)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 1
    b = _seq(range(100, 140))
    assert not bm.allocate(b, 40)
    assert b.block_table == [] and bm.num_free_blocks == 1, "a failed allocation must take nothing"
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.usage == 0.0


def test_prefix_hit_shares_blocks_and_leaves_one_token_to_compute():
    bm = BlockManager(8)
    a = _seq(range(48))
    assert bm.allocate(a, 48)
    a.num_computed_tokens = 48
    b = _seq(list(range(32)) + [999] * 5)
    hits = bm.find_cached_prefix(b)
    assert hits == a.block_table[:2]
    assert bm.allocate(b, b.num_tokens - 32, hits)
    assert b.num_computed_tokens == 32 and b.num_cached_tokens == 32
    assert [bm.ref_counts[i] for i in hits] == [2, 2]
    # A prompt fully cached still computes its last token (its logits are needed).
    c = _seq(range(48))
    assert len(bm.find_cached_prefix(c)) == 2


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    bm = BlockManager(4)
    a = _seq(range(32))
    assert bm.allocate(a, 32)
    bm.free(a)
    assert bm.num_free_blocks == 4
    again = _seq(list(range(32)) + [7])
    hits = bm.find_cached_prefix(again)
    assert hits == [0, 1], "a freed block keeps its content for the next request with that prefix"
    # Filling the cache with other tokens evicts the cached blocks.
    other = _seq(range(500, 564))
    assert bm.allocate(other, 64)
    assert bm.find_cached_prefix(again) == []


def test_hash_chain_depends_on_the_whole_prefix():
    bm = BlockManager(8)
    a = _seq([1] * 16 + [2] * 16)
    assert bm.allocate(a, 32)
    b = _seq([3] * 16 + [2] * 16 + [5])  # same second block, different first block
    assert bm.find_cached_prefix(b) == []


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(8, enable_prefix_caching=False)
    a = _seq(range(32))
    assert bm.allocate(a, 32)
    assert bm.find_cached_prefix(_seq(range(40))) == []


def test_scheduler_budget_decodes_first_and_chunked_prefill():
    bm = BlockManager(64)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=20, max_model_len=256), bm)
    a, b = _seq(range(30), "a"), _seq(range(100, 110), "b")
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_tokens) for s in out.scheduled] == [("a", 20)]
    assert not out.scheduled[0].samples
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_tokens) for s in out.scheduled] == [("a", 10), ("b", 10)]
    assert all(s.samples for s in out.scheduled)
    a.token_ids.append(1)
    b.token_ids.append(1)
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_tokens, s.start) for s in out.scheduled] == [("a", 1, 30), ("b", 1, 10)]


def test_scheduler_respects_max_num_seqs():
    bm = BlockManager(64)
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=1000, max_model_len=256), bm)
    for i in range(3):
        sched.add(_seq(range(5), str(i)))
    out = sched.schedule()
    assert len(out.scheduled) == 2 and len(sched.waiting) == 1


def test_preemption_frees_the_newest_and_requeues_it_first():
    bm = BlockManager(4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=1000, max_model_len=64), bm)
    a, b = _seq(range(32), "a"), _seq(range(100, 132), "b")
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert bm.num_free_blocks == 0
    a.token_ids.append(1)
    b.token_ids.append(1)
    out = sched.schedule()  # a needs a third block: b gives way
    assert out.preempted == [b] and [s.seq for s in out.scheduled] == [a]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and sched.waiting[0] is b
    assert sched.num_preemptions == 1
    sched.finish(a, "stop")
    out = sched.schedule()
    assert [s.seq for s in out.scheduled] == [b]
    # a took one of b's two freed blocks (b's tail, evicted first); b's head block comes back as a hit.
    assert b.num_cached_tokens == 16


def test_sliding_window_releases_blocks_the_window_has_passed():
    """window 20: computing from position p needs keys from p - 19 on; blocks wholly before go back (cached ones
    stay reusable for a prefix hit), the table keeps their places as -1, and free() returns the rest once."""
    bm = BlockManager(8, window=20)
    a = _seq(range(64))
    assert bm.allocate(a, 48)  # a prefill chunk from 0: nothing released yet
    a.num_computed_tokens = 48
    assert bm.allocate(a, 16)  # next chunk from 48 sees keys 29..: block 0 (0-15) goes, block 1 (16-31) stays
    assert a.block_table[0] == -1 and a.num_released_blocks == 1 and -1 not in a.block_table[1:]
    assert bm.num_free_blocks == 8 - 3
    a.num_computed_tokens = 64
    a.token_ids.append(7)
    assert bm.allocate(a, 1)  # from 64: keys 45..: block 1 (16-31) goes, block 2 (32-47) holds 45 and stays
    assert a.block_table[:2] == [-1, -1] and a.num_released_blocks == 2
    b = _seq(list(range(32)) + [5])
    assert len(bm.find_cached_prefix(b)) == 2  # the released blocks are still cached
    bm.free(a)
    assert bm.num_free_blocks == 8 and all(c == 0 for c in bm.ref_counts) and a.num_released_blocks == 0
