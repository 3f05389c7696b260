"""Tensor parallelism across processes (issue #15), on the numpy backend: one process per rank, rank 0 in the
caller's process. What a GPU run will keep: the worker loop, the step broadcast through shared memory (no
pickling on the hot path), failure handling; what it will swap: the collectives (NCCL, ops/cuda/nccl.py, for
SharedGroup) and the backend.

Every step, rank 0 writes one command into a shared int32 buffer (the step's ids, positions and attention
metadata packed, or the rows to compute logits of), all ranks meet at a barrier, and each runs the same model
code on its shard; the collectives inside meet at the same barrier. Each wait has a timeout, and rank 0 checks
its workers are alive before it waits: a rank that dies makes the others raise RankFailedError (naming the rank
and its exit code) instead of hanging, and close() leaves no process behind. A worker whose rank 0 disappeared
exits at its next wait.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import time
from multiprocessing import shared_memory

import numpy as np

from engine.config import ModelConfig
from engine.parallel import TensorParallel, sharded_fetch
from ops.metadata import AttentionMetadata

FORWARD, LOGITS, STOP = 1, 2, 3
STARTUP_TIMEOUT = 300.0  # seconds for every rank to load its shard


class RankFailedError(RuntimeError):
    """A tensor-parallel rank stopped; the ranks left cannot go on (every collective needs all of them)."""


class SharedGroup:
    """A Communicator over processes: slots of float32 [world, capacity] in shared memory, and a barrier made of
    one counter per rank in shared memory (a rank waits until every counter reaches its own). Not
    multiprocessing.Barrier: its Condition waits for every sleeper to acknowledge a wake-up, so a rank killed while
    waiting would hang the others. Here a dead rank is a counter that stops moving: the waits time out, rank 0
    names it (check), and its abort word sends the workers home. Loads and stores of aligned int64 and the store
    order of x86 make the counters safe; this is the CPU test harness, NCCL takes over on GPUs."""

    def __init__(self, world: int, rank: int, slots: np.ndarray, counters: np.ndarray, timeout: float, check=None):
        self.world, self.rank, self.slots, self.counters, self.timeout = world, rank, slots, counters, timeout
        self.check = check  # rank 0: raises RankFailedError if a worker is gone
        self.generation = int(counters[rank])

    def abort(self) -> None:
        self.counters[self.world] = 1

    def wait(self, timeout: float | None = None) -> None:
        """Until every rank has come this far; `timeout` (default the group's) bounds it, inf waits for ever (a
        worker idle between steps), the checks still running."""
        self.generation += 1
        self.counters[self.rank] = self.generation
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        spins = 0
        while int(self.counters[:self.world].min()) < self.generation:
            if self.counters[self.world]:
                raise RankFailedError(f"rank {self.rank}: the tensor-parallel group was aborted (a rank stopped)")
            spins += 1
            if spins > 1000:  # past a short spin, yield the core and look after the other ranks
                time.sleep(0.0002)
                if self.check is not None:
                    self.check()
                if time.monotonic() > deadline:
                    self.abort()
                    raise RankFailedError(f"rank {self.rank}: a tensor-parallel rank did not reach the step's "
                                          f"collective within {limit:.0f} s")

    def _put(self, x: np.ndarray) -> None:
        if x.size > self.slots.shape[1]:
            raise ValueError(f"a collective of {x.size} values exceeds the shared slots of {self.slots.shape[1]}")
        self.slots[self.rank, :x.size] = x.ravel()
        self.wait()

    def all_reduce(self, x: np.ndarray) -> None:
        self._put(x)
        x[...] = self.slots[:, :x.size].sum(axis=0).reshape(x.shape)  # rank order: the same bits on every rank
        self.wait()

    def all_gather(self, x: np.ndarray) -> np.ndarray:
        self._put(x)
        out = np.concatenate([self.slots[r, :x.size].reshape(x.shape) for r in range(self.world)], axis=-1)
        self.wait()
        return out


class _Shared:
    """The shared memory of one tensor-parallel group: the collectives' slots, the command buffer, and the
    barrier's counters (one per rank, then the abort word)."""

    def __init__(self, world: int, capacity: int, command_words: int, names: tuple[str, ...] | None = None):
        sizes = (world * capacity * 4, command_words * 4, (world + 1) * 8)
        if names is None:
            self.blocks = [shared_memory.SharedMemory(create=True, size=n) for n in sizes]
        else:  # a worker attaches; rank 0 owns the memory and unlinks it (spawned workers share its tracker)
            self.blocks = [shared_memory.SharedMemory(name=name) for name in names]
        self.names = tuple(b.name for b in self.blocks)
        self.slots = np.ndarray((world, capacity), np.float32, self.blocks[0].buf)
        self.command = np.ndarray((command_words,), np.int32, self.blocks[1].buf)
        self.counters = np.ndarray((world + 1,), np.int64, self.blocks[2].buf)
        if names is None:
            self.counters[:] = 0

    def close(self, unlink: bool) -> None:
        del self.slots, self.command, self.counters
        for b in self.blocks:
            b.close()
            if unlink:
                b.unlink()


def _pack(ids, positions, meta: AttentionMetadata) -> np.ndarray:
    tables = np.asarray(meta.block_tables, np.int32)
    head = [FORWARD, len(ids), len(meta.seq_lens), tables.shape[1], meta.max_query_len, meta.max_seq_len]
    return np.concatenate([np.array(head, np.int32), ids, positions, meta.query_start_loc, meta.seq_lens,
                           tables.ravel(), meta.slot_mapping]).astype(np.int32)


def _unpack(words: np.ndarray):
    t, b, width, max_q, max_s = (int(v) for v in words[1:6])
    at = 6
    parts = []
    for n in (t, t, b + 1, b, b * width, t):
        parts.append(words[at:at + n].copy())
        at += n
    ids, positions, qsl, seq_lens, tables, slots = parts
    return ids, positions, AttentionMetadata(qsl, seq_lens, tables.reshape(b, width), slots, max_q, max_s)


def _rank_model(path: str, tp: TensorParallel, max_positions: int, num_blocks: int, block_size: int):
    from engine.loader import CheckpointWeights
    from engine.model_runner import _paged_cache
    from engine.models.llama import LlamaModel
    from ops.backend import NumpyBackend

    c = ModelConfig.from_pretrained(path)
    backend = NumpyBackend()
    model = LlamaModel(tp.rank_config(c), backend, max_positions, tp)
    weights = CheckpointWeights(path)
    with backend.weight_loader(weights) as fetch:
        model.load_weights(sharded_fetch(fetch, c, tp, np.asarray))
    weights.close()
    _, caches = _paged_cache(backend, model.config, num_blocks, block_size)
    return model, caches


def _worker(rank: int, world: int, path: str, names, capacity: int, command_words: int, timeout: float,
            max_positions: int, num_blocks: int, block_size: int) -> None:
    shared = _Shared(world, capacity, command_words, names)
    parent = os.getppid()

    def check():  # rank 0's process is gone (its pid was reparented away): nobody will ever command again
        if os.getppid() != parent:
            raise RankFailedError(f"rank {rank}: rank 0 (pid {parent}) is gone")
    tp = TensorParallel(rank, world, SharedGroup(world, rank, shared.slots, shared.counters, timeout, check))
    hidden = None
    try:
        model, caches = _rank_model(path, tp, max_positions, num_blocks, block_size)
        tp.comm.wait(timeout=STARTUP_TIMEOUT)  # loaded: TPGroup() returns once every rank is
        while True:
            tp.comm.wait(timeout=math.inf)  # the next command is written (a server may idle for hours)
            words = shared.command
            op = int(words[0])
            if op == STOP:
                return
            if op == FORWARD:
                ids, positions, meta = _unpack(words)
                tp.comm.wait()  # every rank has read it: rank 0 may write the next
                hidden = model.forward(ids, positions, meta, caches)
            elif op == LOGITS:
                rows = words[2:2 + int(words[1])].copy()
                tp.comm.wait()
                model.compute_logits(hidden[rows])
    except RankFailedError:
        return  # rank 0 or another worker is gone: exit, leave nothing behind
    finally:
        shared.close(unlink=False)


class TPGroup:
    """Rank 0 of a `world`-rank tensor-parallel model in this process, ranks 1.. as worker processes.

    forward() and compute_logits() are the model's, run on every rank; close() stops the workers (also after a
    failure). A dead worker turns the next call into RankFailedError."""

    def __init__(self, path: str, world: int, max_positions: int = 2048, num_blocks: int = 64, block_size: int = 16,
                 capacity: int = 1 << 20, command_words: int = 1 << 16, timeout: float = 30.0):
        TensorParallel(0, world, None).check(ModelConfig.from_pretrained(path))  # before any process starts
        ctx = mp.get_context("spawn")  # no fork of a process that may hold threads (the server's, pytest's)
        self.shared = _Shared(world, capacity, command_words)
        self.workers = [ctx.Process(target=_worker, name=f"cupyllm-tp-rank{r}", daemon=True,
                                    args=(r, world, path, self.shared.names, capacity, command_words,
                                          timeout, max_positions, num_blocks, block_size))
                        for r in range(1, world)]
        for w in self.workers:
            w.start()
        comm = SharedGroup(world, 0, self.shared.slots, self.shared.counters, timeout, check=self._check_workers)
        self.tp = TensorParallel(0, world, comm)
        self.closed = False
        try:
            self.model, self.caches = _rank_model(path, self.tp, max_positions, num_blocks, block_size)
            self.tp.comm.wait(timeout=STARTUP_TIMEOUT)  # every worker has loaded its shard
        except BaseException:
            self.close()
            raise

    def _check_workers(self) -> None:
        for rank, w in enumerate(self.workers, 1):
            if not w.is_alive():
                self.tp.comm.abort()  # the other workers stop waiting and exit
                raise RankFailedError(f"tensor-parallel rank {rank} (pid {w.pid}) stopped with exit code "
                                      f"{w.exitcode}; the model cannot run without it")

    def _command(self, words: np.ndarray) -> None:
        if len(words) > len(self.shared.command):
            raise ValueError(f"a step of {len(words)} words exceeds the command buffer of {len(self.shared.command)}")
        self.shared.command[:len(words)] = words
        self.tp.comm.wait()  # the workers read it
        self.tp.comm.wait()  # and have: the buffer is free again

    def forward(self, ids: np.ndarray, positions: np.ndarray, meta: AttentionMetadata):
        self._command(_pack(np.asarray(ids, np.int32), np.asarray(positions, np.int32), meta))
        self.hidden = self.model.forward(ids, positions, meta, self.caches)
        return self.hidden

    def compute_logits(self, rows: np.ndarray) -> np.ndarray:
        """Logits of the last forward's rows `rows`, the whole vocabulary."""
        rows = np.asarray(rows, np.int32)
        self._command(np.concatenate([np.array([LOGITS, len(rows)], np.int32), rows]))
        return self.model.compute_logits(self.hidden[rows])

    def close(self, timeout: float = 10.0) -> None:
        """Stop every worker: STOP when they can hear it, else terminate, then kill; free the shared memory."""
        if self.closed:
            return
        self.closed = True
        if all(w.is_alive() for w in self.workers):
            try:
                self.shared.command[0] = STOP
                self.tp.comm.wait()
            except RankFailedError:
                pass
        for w in self.workers:
            w.join(timeout)
            if w.is_alive():
                w.terminate()
                w.join(timeout)
            if w.is_alive():
                w.kill()
                w.join()
        self.shared.close(unlink=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
