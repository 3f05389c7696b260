"""`cupyllm serve` as a real process for the tests: launched on an ephemeral port, found ready through its
log line, stopped with SIGTERM. Used by the CPU server tests and tests/gpu/test_serve_gpu.py."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY = re.compile(r"ready in [\d.]+ s: serving .* on http://127\.0\.0\.1:(\d+)")


def wait_until(predicate, timeout: float, what: str):
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def launch_server(args: list[str], log_path, env: dict | None = None,
                  timeout: float = 60) -> tuple[subprocess.Popen, int]:
    """`python -m api.cli serve --host 127.0.0.1 --port 0 ARGS`, its output in `log_path`: (process, port)
    once its ready line names the port it bound. Fails the test with the log's end if it exits first."""
    cmd = [sys.executable, "-m", "api.cli", "serve", "--host", "127.0.0.1", "--port", "0", *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def ready_port():
        text = Path(log_path).read_text(encoding="utf-8", errors="replace")
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{text[-4000:]}")
        found = READY.search(text)
        return found and int(found.group(1))
    return proc, wait_until(ready_port, timeout, "the server to start")


def stop_process(proc: subprocess.Popen, timeout: float) -> bool:
    """SIGTERM, then SIGKILL after `timeout` seconds; whether it exited by itself in time."""
    proc.terminate()
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False
