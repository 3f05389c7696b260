"""Tensor parallelism across processes (issue #15): one process per rank, rank 0 in the caller's process (the
engine's, where the scheduler runs), ranks 1.. spawned. The same for both backends: the worker loop, the step
commands through shared memory (no pickling on the hot path), failure handling. What differs: the collectives
(SharedGroup's shared-memory slots on the numpy backend, NCCL on CUDA, ops/cuda/nccl.py) and, on CUDA, each
worker's GPU (device = rank).

Every step, rank 0 writes one command into a shared int32 buffer (the step's ids, positions and attention
metadata packed, or the rows to compute logits of), all ranks meet at a barrier, and each runs the same model
code on its shard; on the numpy backend the collectives inside meet at the same barrier. Each wait has a timeout,
rank 0 checks its workers are alive while it waits, and a watcher thread on rank 0 notices a dead worker at once
even while the engine idles: a rank that dies makes the others raise RankFailedError (naming the rank and its exit
code) instead of hanging, and close() leaves no process behind. A worker whose rank 0 disappeared exits at its
next wait.

What a rank builds is a picklable spec with build(tp) -> an object whose run(op, words) executes one command:
ModelRank here (a checkpoint's model alone: TPGroup, the low-level tests), engine/tp_runner.RunnerRank for the
engine (a whole ModelRunner on the rank's shard).
"""
from __future__ import annotations

import atexit
import math
import multiprocessing as mp
import os
import signal
import threading
import time
from multiprocessing import connection, shared_memory

import numpy as np

from engine.config import ModelConfig
from engine.errors import FatalEngineError
from engine.parallel import TensorParallel, sharded_fetch
from ops.metadata import AttentionMetadata

FORWARD, LOGITS, STOP, REPLAY = 1, 2, 3, 4  # REPLAY: a decode graph's step (CUDA), packed as FORWARD
STARTUP_TIMEOUT = 300.0  # seconds for every rank to load its shard (and, on CUDA, capture its graphs)


class RankFailedError(FatalEngineError):
    """A tensor-parallel rank stopped; the ranks left cannot go on (every collective needs all of them)."""


class SharedGroup:
    """A barrier over processes, and on the numpy backend their Communicator: slots of float32 [world, capacity]
    in shared memory, and one counter per rank (a rank waits until every counter reaches its own). Not
    multiprocessing.Barrier: its Condition waits for every sleeper to acknowledge a wake-up, so a rank killed while
    waiting would hang the others. Here a dead rank is a counter that stops moving: the waits time out, rank 0
    names it (check), and its abort word sends the workers home. Loads and stores of aligned int64 and the store
    order of x86 make the counters safe."""

    def __init__(self, world: int, rank: int, slots: np.ndarray, counters: np.ndarray, timeout: float, check=None):
        self.world, self.rank, self.slots, self.counters, self.timeout = world, rank, slots, counters, timeout
        self.check = check  # rank 0: raises RankFailedError if a worker is gone
        self.generation = int(counters[rank])

    def abort(self) -> None:
        self.counters[self.world] = 1

    def _aborted(self) -> None:
        if self.check is not None:  # rank 0: name the rank that stopped, once its process is seen to be gone
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                self.check()
                time.sleep(0.01)
        raise RankFailedError(f"rank {self.rank}: the tensor-parallel group was aborted (a rank stopped)")

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
                self._aborted()
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


def command_words(max_tokens: int, max_seqs: int, max_blocks: int) -> int:
    """The command buffer a step of up to these sizes needs (pack_step's layout)."""
    return 7 + 4 * max_tokens + 2 * max_seqs + 1 + max_seqs * max_blocks


def pack_step(op: int, ids, positions, meta: AttentionMetadata) -> np.ndarray:
    """[words, op, T, B, width, max_query_len, max_seq_len, ids, positions, query_start_loc, seq_lens, block
    tables, slots] as int32: one copy into shared memory, read back by unpack_step."""
    tables = np.asarray(meta.block_tables, np.int32)
    parts = [np.asarray(a, np.int32).ravel() for a in (ids, positions, meta.query_start_loc, meta.seq_lens, tables,
                                                       meta.slot_mapping)]
    head = [0, op, len(ids), len(meta.seq_lens), tables.shape[1], meta.max_query_len, meta.max_seq_len]
    words = np.concatenate([np.array(head, np.int32), *parts])
    words[0] = len(words)
    return words


def unpack_step(words: np.ndarray):
    t, b, width, max_q, max_s = (int(v) for v in words[2:7])
    at, parts = 7, []
    for n in (t, t, b + 1, b, b * width, t):
        parts.append(words[at:at + n])
        at += n
    ids, positions, qsl, seq_lens, tables, slots = parts
    return ids, positions, AttentionMetadata(qsl, seq_lens, tables.reshape(b, width), slots, max_q, max_s)


def pack_rows(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.int32)
    return np.concatenate([np.array([2 + len(rows), LOGITS], np.int32), rows])


class ModelRank:
    """A rank's spec for TPGroup: the checkpoint's model on the numpy backend, its shard, a paged KV cache."""

    def __init__(self, path: str, max_positions: int, num_blocks: int, block_size: int):
        self.path, self.max_positions, self.num_blocks, self.block_size = path, max_positions, num_blocks, block_size

    def build(self, tp: TensorParallel) -> "ModelRank":
        from engine.loader import CheckpointWeights
        from engine.memory import paged_cache
        from engine.models.llama import LlamaModel
        from ops.backend import NumpyBackend

        c = ModelConfig.from_pretrained(self.path)
        backend = NumpyBackend()
        self.model = LlamaModel(tp.rank_config(c), backend, self.max_positions, tp)
        weights = CheckpointWeights(self.path)
        with backend.weight_loader(weights) as fetch:
            self.model.load_weights(sharded_fetch(fetch, c, tp, np.asarray))
        weights.close()
        _, self.caches = paged_cache(backend, self.model.config, self.num_blocks, self.block_size)
        return self

    def run(self, op: int, words: np.ndarray):
        if op == FORWARD:
            self.hidden = self.model.forward(*unpack_step(words), self.caches)
            return self.hidden
        if op == LOGITS:
            return self.model.compute_logits(self.hidden[words[2:]])
        raise ValueError(f"unknown tensor-parallel command {op}")


def _worker(rank: int, world: int, names, capacity: int, words: int, timeout: float, spec, nccl_uid) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off, before NCCL loads
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 decides
    shared = _Shared(world, capacity, words, names)
    parent = os.getppid()

    def check():  # rank 0's process is gone (its pid was reparented away): nobody will ever command again
        if os.getppid() != parent:
            raise RankFailedError(f"rank {rank}: rank 0 (pid {parent}) is gone")
    channel = SharedGroup(world, rank, shared.slots, shared.counters, STARTUP_TIMEOUT, check)
    try:
        comm = channel
        if nccl_uid is not None:  # CUDA: this rank's GPU, then its NCCL communicator (rank 0 made the id)
            import cupy

            from ops.cuda.nccl import NcclGroup
            cupy.cuda.Device(rank).use()
            comm = NcclGroup(world, rank, nccl_uid)
        state = spec.build(TensorParallel(rank, world, comm))
        channel.wait()  # loaded: RankGroup.ready() returns once every rank is
        channel.timeout = timeout
        while True:
            channel.wait(timeout=math.inf)  # the next command is written (a server may idle for hours)
            op = int(shared.command[1])
            if op == STOP:
                return
            command = shared.command[:int(shared.command[0])].copy()
            channel.wait()  # every rank has read it: rank 0 may write the next
            state.run(op, command)
    except RankFailedError:
        return  # rank 0 or another worker is gone: exit, leave nothing behind
    except BaseException:
        channel.abort()  # rank 0 stops waiting for this rank; the traceback goes to stderr
        raise
    finally:
        shared.close(unlink=False)


class RankGroup:
    """Rank 0's side of a `world`-rank group: starts ranks 1.. (each builds `spec` on its shard), gives rank 0 its
    TensorParallel (self.tp), sends the step commands, and watches the workers.

    device "cuda": worker r uses GPU r, every rank's communicator is NCCL (the unique id goes to the workers with
    their start-up arguments) and SharedGroup carries only the commands. on_failure(error), when set, is called
    from the watcher thread when a worker dies outside close()."""

    def __init__(self, world: int, spec, device: str = "numpy", capacity: int = 1 << 20, words: int = 1 << 16,
                 timeout: float = 30.0):
        ctx = mp.get_context("spawn")  # no fork of a process that may hold threads (the server's, pytest's)
        self.world, self.timeout, self.closed, self.failure, self.on_failure = world, timeout, False, None, None
        uid = None
        if device == "cuda":
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # inherited by every worker
            from ops.cuda import nccl
            uid = nccl.unique_id()
            capacity = 1  # collectives go through NCCL
        self.shared = _Shared(world, capacity, words)
        self.workers = [ctx.Process(target=_worker, name=f"cupyllm-tp-rank{r}", daemon=True,
                                    args=(r, world, self.shared.names, capacity, words, timeout, spec, uid))
                        for r in range(1, world)]
        self._stop_r, self._stop_w = os.pipe()
        self.channel = SharedGroup(world, 0, self.shared.slots, self.shared.counters, STARTUP_TIMEOUT,
                                   check=self._check_workers)
        try:
            for w in self.workers:
                w.start()
            comm = self.channel
            if uid is not None:
                from ops.cuda.nccl import NcclGroup
                comm = NcclGroup(world, 0, uid)  # returns once every worker has joined
        except BaseException:
            self.close()
            raise
        self.tp = TensorParallel(0, world, comm)
        self._watcher = threading.Thread(target=self._watch, name="cupyllm-tp-watch", daemon=True)
        self._watcher.start()
        atexit.register(self.close)  # before multiprocessing's own exit handler, which only terminates them

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    def ready(self) -> None:
        """Wait until every worker has built its rank; from then on a step's waits use the step timeout."""
        self.channel.wait()
        self.channel.timeout = self.timeout

    def _dead_worker(self) -> RankFailedError | None:
        for rank, w in enumerate(self.workers, 1):
            if not w.is_alive():
                how = f", killed by {signal.Signals(-w.exitcode).name}" if w.exitcode and w.exitcode < 0 else ""
                return RankFailedError(f"tensor-parallel rank {rank} (pid {w.pid}) stopped with exit code "
                                       f"{w.exitcode}{how}; the model cannot run without it")
        return None

    def _check_workers(self) -> None:
        if self.failure is None:
            self.failure = self._dead_worker()
        if self.failure is not None:
            self.channel.abort()  # the other workers stop waiting and exit
            raise RankFailedError(str(self.failure))

    def _watch(self) -> None:
        """A worker's end (its sentinel) outside close(): record it, abort the group (rank 0's waits and, on CUDA,
        its NCCL calls return), tell on_failure."""
        ready = connection.wait([w.sentinel for w in self.workers] + [self._stop_r])
        if self._stop_r in ready or self.closed:
            return
        for w in self.workers:
            w.join(0.5)  # the one that ended gets its exit code
            if not w.is_alive():
                break
        self.failure = self.failure or self._dead_worker()
        if self.failure is None:
            return
        self.channel.abort()
        if self.tp.comm is not self.channel:
            self.tp.comm.abort()
        if self.on_failure is not None:
            self.on_failure(RankFailedError(str(self.failure)))

    def command(self, words: np.ndarray) -> None:
        """Every worker runs command `words` (pack_step, pack_rows); returns once they have read it."""
        if self.failure is not None:
            raise RankFailedError(str(self.failure))
        if len(words) > len(self.shared.command):
            raise ValueError(f"a step of {len(words)} words exceeds the command buffer of {len(self.shared.command)}")
        self.shared.command[:len(words)] = words
        self.channel.wait()  # the workers read it
        self.channel.wait()  # and have: the buffer is free again

    def close(self, timeout: float = 10.0) -> None:
        """Stop every worker: STOP when they can hear it, else terminate, then kill; free the shared memory."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        os.write(self._stop_w, b"x")
        if self.failure is None and all(w.is_alive() for w in self.workers):
            try:
                self.shared.command[1] = STOP
                self.channel.wait(timeout=timeout)
            except RankFailedError:
                pass
        for w in self.workers:
            if w.pid is None:  # never started
                continue
            w.join(timeout)
            if w.is_alive():
                w.terminate()
                w.join(timeout)
            if w.is_alive():
                w.kill()
                w.join()
        watcher = getattr(self, "_watcher", None)
        if watcher is not None:
            watcher.join(timeout)
        os.close(self._stop_r)
        os.close(self._stop_w)
        self.shared.close(unlink=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TPGroup(RankGroup):
    """Rank 0 of a `world`-rank tensor-parallel model of a checkpoint in this process (numpy backend), ranks 1.. as
    worker processes. forward() and compute_logits() are the model's, run on every rank."""

    def __init__(self, path: str, world: int, max_positions: int = 2048, num_blocks: int = 64, block_size: int = 16,
                 capacity: int = 1 << 20, command_words: int = 1 << 16, timeout: float = 30.0):
        TensorParallel(0, world, None).check(ModelConfig.from_pretrained(path))  # before any process starts
        spec = ModelRank(path, max_positions, num_blocks, block_size)
        super().__init__(world, spec, "numpy", capacity, command_words, timeout)
        try:
            self.rank0 = spec.build(self.tp)
            self.ready()
        except BaseException:
            self.close()
            raise

    def forward(self, ids: np.ndarray, positions: np.ndarray, meta: AttentionMetadata):
        words = pack_step(FORWARD, ids, positions, meta)
        self.command(words)
        return self.rank0.run(FORWARD, words)

    def compute_logits(self, rows: np.ndarray) -> np.ndarray:
        """Logits of the last forward's rows `rows`, the whole vocabulary."""
        words = pack_rows(rows)
        self.command(words)
        return self.rank0.run(LOGITS, words)
