"""perf/check_regression.py: a slower machine (the speed probe ran slower beside a benchmark) is not taken for
slower code, a faster one tightens nothing, and slower code still fails."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "check_regression", Path(__file__).resolve().parent.parent / "perf" / "check_regression.py")
check_regression = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_regression)
Run, slowdowns = check_regression.Run, check_regression.slowdowns

BASE = {"a": 100e-6, "b": 10e-3}
PROBES = {"a": 1.4e-3, "b": 1.5e-3}


def test_a_slower_machine_is_divided_out():
    run = Run({"a": 170e-6, "b": 17e-3}, {"a": 2.38e-3, "b": 1.5e-3}, 0.0)  # a's probe ran 1.7x slower
    out = slowdowns(run, BASE, PROBES)
    assert out["a"] == pytest.approx(1.0)
    assert out["b"] == pytest.approx(1.7)  # same probe as its baseline: the code is 1.7x slower


def test_a_faster_moment_tightens_nothing():
    run = Run({"a": 110e-6}, {"a": 0.7e-3}, 0.0)
    assert slowdowns(run, BASE, PROBES)["a"] == pytest.approx(1.1)


def test_a_baseline_without_probes_compares_plain_medians():
    run = Run({"a": 150e-6, "new": 1.0}, {"a": 3e-3, "new": 1e-3}, 0.0)
    assert slowdowns(run, BASE, {}) == {"a": pytest.approx(1.5)}


def test_margins_come_from_the_spread_of_slowdowns():
    assert check_regression.margin_from_spread([1.0] * 10) == 0.25
    assert check_regression.margin_from_spread([1.0] * 8 + [1.3, 1.3]) == pytest.approx(0.6)
