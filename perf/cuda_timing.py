"""CUDA-event timing shared by the GPU benchmarks (perf/gpu_*.py): median microseconds per launch."""
from __future__ import annotations

import statistics

import cupy as cp


def time_graph(launches, stream, reps: int) -> float:
    """Median per-launch microseconds of a graph replaying `launches` in order."""
    stream.begin_capture()
    for launch in launches:
        launch()
    graph = stream.end_capture()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    graph.launch(stream)
    stream.synchronize()
    times = []
    for _ in range(reps):
        start.record(stream)
        graph.launch(stream)
        end.record(stream)
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) * 1e3 / len(launches))
    return statistics.median(times)


def time_eager(launches, stream, reps: int) -> float:
    """Median microseconds of one eager launch, cycling through `launches`."""
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for r in range(reps):
        start.record(stream)
        launches[r % len(launches)]()
        end.record(stream)
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) * 1e3)
    return statistics.median(times)
