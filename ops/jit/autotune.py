"""jit.autotune: choose among configurations of a launch function (block shapes, thread counts) by timing each on
the GPU once per (GPU, function, key), on scratch copies of what it writes; choices persist on disk.

Inside a graph capture nothing can be timed: an untuned key then runs the first configuration (not remembered).
On numpy arrays the first configuration runs: the interpreter's result does not depend on it.
"""
from __future__ import annotations

import functools
import json
import os
import statistics
from pathlib import Path
from typing import Callable, Sequence

_choices: dict[str, dict] | None = None


def tune_path() -> Path:
    from ops.jit.cache import default_dir
    return Path(os.environ.get("CUPYLLM_JIT_TUNE", default_dir().parent / "jit_autotune.json"))


def _load() -> dict:
    global _choices
    if _choices is None:
        try:
            _choices = json.loads(tune_path().read_text())
        except (OSError, ValueError):
            _choices = {}
    return _choices


def _save() -> None:
    path = tune_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_choices, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def reset() -> None:
    """Forget the in-memory choices (tests; `cupyllm kernels --clear` removes the file)."""
    global _choices
    _choices = None


def autotune(configs: Sequence[dict], key: Callable, writes: Sequence[int]):
    """Decorate `launch(*arrays, **config)`. key(*arrays) -> a hashable description of the shapes that matter;
    writes: the positions of the arrays the launch writes (copied for the trials, so real data is untouched)."""
    configs = [dict(c) for c in configs]

    def wrap(launch):
        name = f"{launch.__module__}.{launch.__qualname__}"

        @functools.wraps(launch)
        def run(*arrays):
            first = arrays[0]
            if type(first).__module__.split(".")[0] != "cupy":
                return launch(*arrays, **configs[0])
            return launch(*arrays, **_choose(name, launch, configs, key(*arrays), arrays, writes))
        run.configs = configs
        return run
    return wrap


@functools.cache
def _gpu_name(device: int) -> str:
    import cupy as cp
    name = cp.cuda.runtime.getDeviceProperties(device)["name"]  # ~0.8 ms: once per device
    return name.decode() if isinstance(name, bytes) else str(name)


def _choose(name, launch, configs, key, arrays, writes) -> dict:
    import cupy as cp
    table = _load().setdefault(_gpu_name(cp.cuda.Device().id), {})
    entry_key = f"{name}|{key}"
    entry = table.get(entry_key)
    if entry is not None and entry["config"] in configs:
        return entry["config"]
    stream = cp.cuda.get_current_stream()
    if len(configs) == 1 or stream.is_capturing():
        return configs[0]
    trial = [a.copy() if i in writes else a for i, a in enumerate(arrays)]
    times = [_time(lambda c=c: launch(*trial, **c), stream) for c in configs]
    best = min(range(len(configs)), key=times.__getitem__)
    table[entry_key] = {"config": configs[best], "us": [round(t, 2) for t in times]}
    _save()
    return configs[best]


def _time(fn, stream, reps: int = 20) -> float:
    import cupy as cp
    fn()  # compiles and warms
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(reps):
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) * 1e3)
    return statistics.median(times)


def entries() -> dict:
    return _load()
