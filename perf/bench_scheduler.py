"""CPU hot paths of the engine loop: a scheduler step over 256 running decodes, and the block
manager's prefix lookup. Run with `python -m pytest perf --benchmark-enable`."""
from __future__ import annotations

import numpy as np

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence


def _running_batch(num_seqs: int, prompt_len: int) -> Scheduler:
    rng = np.random.default_rng(0)
    bm = BlockManager(num_blocks=num_seqs * 64)
    sched = Scheduler(SchedulerConfig(max_num_seqs=num_seqs, max_num_batched_tokens=1 << 20,
                                      max_model_len=4096), bm)
    for i in range(num_seqs):
        sched.add(Sequence(str(i), 0, rng.integers(0, 32000, prompt_len).tolist(), SamplingParams(), seed=i))
    sched.schedule()  # everything prefilled: from here every step is 256 decodes
    return sched


def test_scheduler_decode_step_256(benchmark):
    sched = _running_batch(256, 100)

    def step():
        for seq in sched.running:
            seq.token_ids.append(7)  # the token sampled last step
        return sched.schedule()

    # A fixed number of rounds: each round grows every sequence by a token (600 tokens < 64 blocks).
    out = benchmark.pedantic(step, rounds=500, iterations=1, warmup_rounds=0)
    assert len(out.scheduled) == 256 and all(s.num_tokens == 1 for s in out.scheduled)
    assert not out.preempted


def test_prefix_lookup_2k_prompt(benchmark):
    bm = BlockManager(num_blocks=512)
    ids = np.random.default_rng(1).integers(0, 32000, 2048).tolist()
    owner = Sequence("a", 0, ids, SamplingParams(), seed=0)
    assert bm.allocate(owner, len(ids))

    def lookup():
        return bm.find_cached_prefix(Sequence("b", 0, ids, SamplingParams(), seed=0))

    assert len(benchmark(lookup)) == 127
