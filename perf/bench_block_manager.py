"""CPU cost of the paged KV block manager: admitting a 2k-token prompt (blocks plus prefix-cache hashes)
and releasing it. Run with `python -m pytest perf --benchmark-enable`."""
from __future__ import annotations

import numpy as np

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

PROMPT_LEN = 2048


def _admit_and_free(bm: BlockManager, ids: list[int], prefix_hit: bool) -> int:
    seq = Sequence("r", 0, ids, SamplingParams(), seed=0)
    cached = bm.find_cached_prefix(seq)
    assert bm.allocate(seq, len(ids) - len(cached) * bm.block_size, cached)
    assert bool(cached) == prefix_hit
    n = len(seq.block_table)
    bm.free(seq)
    return n


def test_allocate_free_2k_prompt_cold(benchmark):
    # Every round a prompt never seen before: hash 128 blocks, take them, release them into the LRU.
    bm = BlockManager(num_blocks=1024)
    rng = np.random.default_rng(2)
    prompts = iter([rng.integers(0, 32000, PROMPT_LEN).tolist() for _ in range(200)])
    n = benchmark.pedantic(lambda: _admit_and_free(bm, next(prompts), False), rounds=200, iterations=1)
    assert n == PROMPT_LEN // 16


def test_allocate_free_2k_prompt_prefix_hit(benchmark):
    # The same prompt again: 127 blocks adopted from the prefix cache, one computed.
    bm = BlockManager(num_blocks=1024)
    ids = np.random.default_rng(3).integers(0, 32000, PROMPT_LEN).tolist()
    _admit_and_free(bm, ids, False)
    assert benchmark(_admit_and_free, bm, ids, True) == PROMPT_LEN // 16
