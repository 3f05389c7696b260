"""With CUPYLLM_SPEED_PROBE=<file> (set by perf/check_regression.py), time perf/speed_probe's workload right
before and after every benchmark and write {test node id: [seconds before, seconds after]} to that file."""
from __future__ import annotations

import json
import os

import pytest

_PATH = os.environ.get("CUPYLLM_SPEED_PROBE")
_PROBES: dict[str, list[float]] = {}

if _PATH:
    from speed_probe import probe

    @pytest.fixture(autouse=True)
    def _speed_probe(request):
        before = probe()
        yield
        _PROBES[request.node.nodeid] = [before, probe()]

    def pytest_sessionfinish(session):
        with open(_PATH, "w") as f:
            json.dump(_PROBES, f)
