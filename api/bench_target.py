"""The server under a `bench-serve` load: launching it and timing its cold start, reading its memory
(/proc for CPU RSS, nvidia-smi for GPU), and making prompts of an exact token count with its /tokenize.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import tempfile
import time

PROBE_PROMPT = "The lighthouse keeper woke before the gulls"
WORDS_PER_TOKEN = 0.75  # English text in a 30k-150k vocabulary; used only when the server cannot count


class BenchError(Exception):
    """A load test that cannot go on: the message says why."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


async def get_json(session, url: str, headers: dict | None = None, body: dict | None = None):
    method = session.post if body is not None else session.get
    async with method(url, json=body, headers=headers or {}) as resp:
        if resp.status != 200:
            raise BenchError(f"{url}: HTTP {resp.status}: {(await resp.text())[:300]}")
        return await resp.json(content_type=None)


async def first_model(session, base_url: str, headers: dict) -> str:
    data = (await get_json(session, base_url.rstrip("/") + "/v1/models", headers)).get("data") or []
    if not data:
        raise BenchError(f"{base_url}/v1/models lists no model; pass --model")
    return data[0]["id"]


# ---------------------------------------------------------------------------------------------------- prompts

class PromptMaker:
    """Random prompts of exactly n tokens as the server counts them (chat template included for chat):
    random words from a built-in text, tokenized and cut by the server's /tokenize and /detokenize.
    Without those routes, n * WORDS_PER_TOKEN words, and the report says the length is approximate."""

    def __init__(self, session, base_url: str, headers: dict, model: str, endpoint: str, seed: int):
        import numpy as np

        from engine.demo import CORPUS_PATH

        self.session, self.base, self.headers, self.model = session, base_url.rstrip("/"), headers, model
        self.chat = endpoint.endswith("chat/completions")
        self.rng = np.random.default_rng(seed)
        with open(CORPUS_PATH, encoding="utf-8") as f:
            self.words = [w for w in f.read().split() if w.isascii()]  # a cut never splits a character
        self.exact = True
        self.note = "prompt lengths made exact with the server's /tokenize and /detokenize"

    async def _tokens(self, text: str, full: bool) -> list[int]:
        """Token ids of `text`: as the server will count the prompt (full), or the bare text."""
        if full and self.chat:
            body = {"model": self.model, "messages": [{"role": "user", "content": text}],
                    "add_generation_prompt": True}
        else:
            body = {"model": self.model, "prompt": text, "add_special_tokens": full}
        return (await get_json(self.session, self.base + "/tokenize", self.headers, body))["tokens"]

    async def setup(self) -> None:
        import aiohttp

        try:
            self.overhead = len(await self._tokens("hello", True)) - len(await self._tokens("hello", False))
            await get_json(self.session, self.base + "/detokenize", self.headers, {"model": self.model, "tokens": [0]})
        except (BenchError, aiohttp.ClientError, KeyError, TypeError, OSError, ValueError) as e:
            self.exact = False
            self.note = (f"the server cannot tokenize ({str(e)[:120]}): prompt lengths are approximate, "
                         f"{WORDS_PER_TOKEN} words per token")

    async def count(self, text: str) -> int | None:
        return len(await self._tokens(text, True)) if self.exact else None

    def _words(self, n: int) -> str:
        return " ".join(self.rng.choice(self.words, n))

    async def make(self, n: int) -> tuple[str, int | None]:
        if not self.exact:
            return self._words(max(1, round(n * WORDS_PER_TOKEN))), None
        best = None
        for _ in range(3):  # fresh words when a draw does not converge
            text, count = await self._cut(n)
            if best is None or abs(count - n) < abs(best[1] - n):
                best = (text, count)
            if count == n:
                break
        return best

    async def _cut(self, n: int) -> tuple[str, int]:
        ids: list[int] = []
        while len(ids) < n + 16:  # enough bare tokens to cut from
            ids += await self._tokens(" " + self._words(n + 16) if ids else self._words(n + 16), False)
        keep, best = max(1, n - self.overhead), None
        for _ in range(6):  # a cut may merge or split tokens: adjust until the server counts n
            text = (await get_json(self.session, self.base + "/detokenize", self.headers,
                                   {"model": self.model, "tokens": ids[:keep]}))["prompt"]
            count = len(await self._tokens(text, True))
            if best is None or abs(count - n) < abs(best[1] - n):
                best = (text, count)
            if count == n or keep == 1 and count > n:
                break
            keep = min(len(ids), max(1, keep + n - count))
        return best

    async def make_many(self, n: int, k: int) -> list[tuple[str, int | None]]:
        gate = asyncio.Semaphore(8)

        async def one():
            async with gate:
                return await self.make(n)
        return list(await asyncio.gather(*(one() for _ in range(k))))

    def report(self, lens: list[int | None]) -> dict:
        known = [n for n in lens if n is not None]
        return {"input_len_exact": self.exact and bool(known), "input_len_note": self.note,
                "prompt_len_min": min(known) if known else None, "prompt_len_max": max(known) if known else None}


# ---------------------------------------------------------------------------------------------------- process

def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (vLLM runs its engine core in a child process)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


def memory_kib(pids: list[int]) -> tuple[int, int]:
    """(VmRSS, VmHWM) summed over `pids`: resident now, and each process's own peak."""
    rss = hwm = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        hwm += int(line.split()[1])
        except OSError:
            continue
    return rss, hwm


def gpu_memory_mib(pids: list[int]) -> tuple[float | None, str | None]:
    """GPU memory of `pids` from nvidia-smi; when it cannot see them (a container's own pid namespace),
    what all processes use on every GPU. (None, None) without nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return None, None
    try:
        apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10).stdout
        used = [line.split(",") for line in apps.splitlines() if line.strip()]
        mine = [float(m) for p, m in used if p.strip().isdigit() and int(p) in pids]
        if mine:
            return sum(mine), "process"
        total = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=10).stdout
        return sum(float(x) for x in total.split()), "device"
    except (OSError, ValueError, subprocess.SubprocessError):
        return None, None


class ServerProcess:
    """A server this load test started (--launch) or was pointed at (--server-pid)."""

    def __init__(self, pid: int, proc: subprocess.Popen | None = None, log_path: str | None = None,
                 command: str | None = None, started_at: float | None = None):
        self.pid, self.proc, self.log_path, self.command = pid, proc, log_path, command
        self.started_at, self.ready_at, self.first_token_at = started_at, None, None
        self.gpu_before = gpu_memory_mib([])[0] if command else None

    @classmethod
    def launch(cls, command: str, log_path: str | None) -> "ServerProcess":
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="bench-serve-", suffix=".log")
            os.close(fd)
        with open(log_path, "wb") as log:
            started_at = time.perf_counter()
            # Its own session: stop() can signal the whole group, children included.
            proc = subprocess.Popen(shlex.split(command), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        return cls(proc.pid, proc, log_path, command, started_at)

    @classmethod
    def attach(cls, pid: int) -> "ServerProcess":
        if not os.path.exists(f"/proc/{pid}"):
            raise BenchError(f"--server-pid {pid}: no such process")
        return cls(pid)

    def log_tail(self, chars: int = 3000) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-chars:]

    async def wait_ready(self, session, base_url: str, timeout: float) -> None:
        """Poll GET /health until it answers 200."""
        import aiohttp

        url, deadline = base_url.rstrip("/") + "/health", time.perf_counter() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"the server exited with status {self.proc.returncode} before answering; "
                                 f"its log ({self.log_path}) ends:\n{self.log_tail()}")
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        self.ready_at = time.perf_counter()
                        return
            except (aiohttp.ClientError, OSError):  # not listening yet, or hung up while starting
                pass
            if time.perf_counter() > deadline:
                raise BenchError(f"the server did not answer {url} within {timeout:.0f} s; log: {self.log_path}")
            await asyncio.sleep(0.02)

    def start_sampling(self) -> asyncio.Task:
        return asyncio.create_task(self._sample())

    async def _sample(self) -> list[tuple[int, float | None]]:
        """(RSS KiB, GPU MiB) every 0.25 s (GPU every second, off the event loop) until cancelled."""
        samples, pids, gpu, tick = [], process_tree(self.pid), None, 0
        self._samples, self._source = samples, None
        while True:
            if tick % 4 == 0:
                pids = process_tree(self.pid)
                gpu, self._source = await asyncio.to_thread(gpu_memory_mib, pids)
            samples.append((memory_kib(pids)[0], gpu))
            self._pids, tick = pids, tick + 1
            await asyncio.sleep(0.25)

    async def stop_sampling(self, task: asyncio.Task) -> dict:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        rss = [r for r, _ in self._samples if r]
        gpu = [g for _, g in self._samples if g is not None]
        last_rss, hwm = memory_kib(self._pids)
        gpu_peak = max(gpu) if gpu else None
        if gpu_peak is not None and self._source == "device" and self.gpu_before is not None:
            gpu_peak -= self.gpu_before  # what the server added to what was in use before it started
        return {"server_rss_mib": statistics.median(rss or [last_rss]) / 1024, "server_rss_peak_mib": hwm / 1024,
                "gpu_memory_peak_mib": gpu_peak, "gpu_memory_source": self._source if gpu else None}

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def server_report(server: ServerProcess | None, memory: dict) -> dict:
    """The server-side fields of the JSON; None where not measured."""
    launched = server is not None and server.started_at is not None
    return {"server_pid": server.pid if server else None, "server_command": server.command if server else None,
            "cold_start_ready_s": server.ready_at - server.started_at if launched and server.ready_at else None,
            "cold_start_first_token_s": (server.first_token_at - server.started_at
                                         if launched and server.first_token_at else None),
            "server_rss_mib": memory.get("server_rss_mib"), "server_rss_peak_mib": memory.get("server_rss_peak_mib"),
            "gpu_memory_peak_mib": memory.get("gpu_memory_peak_mib"),
            "gpu_memory_source": memory.get("gpu_memory_source")}
