"""Tensor parallelism across processes on the numpy backend (engine/tp_workers.py, issue #15): rank 0 here and
ranks 1.. as spawned workers, the step broadcast and the collectives through shared memory. The sharded model's
logits equal the whole model's for a prompt and decode steps (2 and 4 ranks); a worker killed mid-run makes the
next step raise RankFailedError naming it, within the timeout, and close() leaves no worker process alive."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.config import ConfigError
from engine.tp_workers import RankFailedError, TPGroup
from ops.metadata import AttentionMetadata
from tests.conftest import VOCAB
from tests.test_tensor_parallel import _models, _run

REPO = Path(__file__).resolve().parent.parent


def _steps(group: TPGroup, steps: list[list[int]]) -> list[np.ndarray]:
    out, done = [], 0
    for ids in steps:
        n = len(ids)
        positions = np.arange(done, done + n, dtype=np.int32)
        meta = AttentionMetadata(np.array([0, n], np.int32), np.array([done + n], np.int32),
                                 np.arange(8, dtype=np.int32)[None, :], positions.copy(), n, done + n)
        group.forward(np.array(ids, np.int32), positions, meta)
        out.append(group.compute_logits(np.array([n - 1])))
        done += n
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_in_processes_give_the_whole_models_logits(checkpoint, rng, world):
    path, _ = checkpoint("qwen2_untied")
    c, whole, _ = _models(path, 1)
    steps = [rng.integers(0, VOCAB, 30).tolist()] + [[int(t)] for t in rng.integers(0, VOCAB, 3)]
    want = _run(whole, c, steps)
    with TPGroup(path, world, max_positions=128, num_blocks=8, timeout=60) as group:
        got = _steps(group, steps)
        pids = [w.pid for w in group.workers]
    for step, (ours, ref) in enumerate(zip(got, want)):
        err = float(np.abs(ours - ref).max() / np.abs(ref).max())
        assert ours.shape == (1, VOCAB) and err < 1e-5, f"x{world} step {step}: relative error {err:.2e}"
    _assert_gone(pids)


def test_a_rank_that_dies_fails_the_next_step_by_name_and_leaves_no_process(checkpoint, rng):
    path, _ = checkpoint("qwen2_untied")
    group = TPGroup(path, 4, max_positions=128, num_blocks=8, timeout=5)
    pids = [w.pid for w in group.workers]
    try:
        _steps(group, [rng.integers(0, VOCAB, 10).tolist()])
        os.kill(pids[1], signal.SIGKILL)  # rank 2
        group.workers[1].join(10)
        t = time.perf_counter()
        with pytest.raises(RankFailedError, match=f"rank 2 \\(pid {pids[1]}\\) stopped with exit code -9"):
            _steps(group, [[5]])
        assert time.perf_counter() - t < 5
    finally:
        group.close()
    _assert_gone(pids)


def test_workers_exit_when_rank_0_is_killed(checkpoint):
    """No orphans: a process holding rank 0 killed with SIGKILL (no cleanup runs) leaves workers that notice and
    exit by themselves."""
    path, _ = checkpoint("qwen2_untied")
    script = ("import sys, time\n"
              "from engine.tp_workers import TPGroup\n"
              f"g = TPGroup({path!r}, 2, max_positions=128, num_blocks=8)\n"
              "print(' '.join(str(w.pid) for w in g.workers), flush=True)\n"
              "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 1
        proc.kill()
        proc.wait(10)
        _assert_gone(pids)
    finally:
        proc.kill()


def test_a_model_that_does_not_split_is_refused_before_any_process_starts(checkpoint):
    path, _ = checkpoint("qwen2_untied")  # 4 query heads
    with pytest.raises(ConfigError, match="over 3 ranks needs num_attention_heads divisible by 3; it is 4"):
        TPGroup(path, 3)


def _assert_gone(pids: list[int]) -> None:
    deadline = time.time() + 10
    while time.time() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purpose
                    if f.read().split()[2] != "Z":
                        alive.append(pid)
            except (ProcessLookupError, FileNotFoundError):
                pass
        if not alive:
            return
        time.sleep(0.1)
    raise AssertionError(f"tensor-parallel workers still alive: {alive}")
