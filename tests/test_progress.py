"""engine.progress: the weight-loading progress line on a terminal and in logs, driven by a fake clock."""
from __future__ import annotations

import io
import logging

from engine.progress import Progress


class FakeClock:
    def __init__(self):
        self.now = 100.0  # not zero: elapsed time must be measured from construction

    def __call__(self) -> float:
        return self.now


def _terminal(total: int, clock: FakeClock) -> tuple[Progress, io.StringIO]:
    out = io.StringIO()
    return Progress(total, stream=out, tty=True, clock=clock), out


def test_terminal_line_is_redrawn_at_most_ten_times_a_second():
    clock = FakeClock()
    progress, out = _terminal(10_000, clock)
    drawn = []
    for step in range(100):  # an update every 10 ms for one second
        clock.now += 0.01
        before = out.getvalue().count("\r")
        progress.update(100)
        drawn.append(out.getvalue().count("\r") > before)
    assert drawn[0], "the first update draws at once"
    assert 9 <= sum(drawn) <= 11
    redraw_steps = [i for i, d in enumerate(drawn) if d]
    assert min(b - a for a, b in zip(redraw_steps, redraw_steps[1:])) >= 9  # >= 0.1 s apart (float steps)
    assert "\n" not in out.getvalue()


def test_terminal_line_text():
    clock = FakeClock()
    progress, out = _terminal(15_200_000_000, clock)
    clock.now += 2.4
    progress.update(7_200_000_000)
    assert out.getvalue() == "\rloading weights  47% 7.2/15.2 GB  3.0 GB/s"


def test_terminal_finish_overwrites_the_line_and_ends_it():
    clock = FakeClock()
    progress, out = _terminal(15_230_000_000, clock)
    clock.now += 0.5
    progress.update(1_000_000_000)
    clock.now += 4.4
    progress.update(14_230_000_000)
    progress.finish()
    progress.finish()  # a second finish prints nothing more
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1
    last = text.rstrip("\n").split("\r")[-1]
    assert last == "loaded 15.23 GB of weights in 4.9 s (3.1 GB/s)"


def test_terminal_shorter_line_blanks_the_rest_of_the_longer_one():
    clock = FakeClock()
    progress, out = _terminal(10**15, clock)
    clock.now += 1.0
    progress.update(10**6)  # "loading weights   0% 0.0/1000000.0 GB  0.0 GB/s"
    progress.finish()  # "loaded 0.00 GB of weights in 1.0 s (0.0 GB/s)", two characters shorter
    bar, summary = out.getvalue().rstrip("\n").split("\r")[1:]
    assert len(summary) == len(bar) == 47
    assert summary == "loaded 0.00 GB of weights in 1.0 s (0.0 GB/s)  "


def test_log_lines_at_quarters_and_the_final_line(caplog):
    clock = FakeClock()
    progress = Progress(15_230_000_000, stream=io.StringIO(), tty=False, clock=clock,
                        logger=logging.getLogger("test.progress"))
    caplog.set_level(logging.INFO, logger="test.progress")
    seen = []
    for fraction in (0.10, 0.20, 0.30, 0.40, 0.80, 0.90, 1.00):  # 0.40 -> 0.80 passes 50% and 75% at once
        clock.now += 0.7
        progress.update(round(15_230_000_000 * fraction) - progress.done)
        seen.append(len(caplog.records))
    assert seen == [0, 0, 1, 1, 2, 2, 2]
    assert [r.getMessage().split("%")[0].split()[-1] for r in caplog.records] == ["30", "80"]
    progress.finish()
    assert caplog.records[-1].getMessage() == "loaded 15.23 GB of weights in 4.9 s (3.1 GB/s)"
    assert len(caplog.records) == 3


def test_nothing_written_to_the_stream_when_not_a_terminal(caplog):
    out = io.StringIO()
    progress = Progress(1000, stream=out, tty=False, clock=FakeClock())
    progress.update(1000)
    progress.finish()
    assert out.getvalue() == ""


def test_close_after_failure_ends_the_line_without_a_summary():
    clock = FakeClock()
    progress, out = _terminal(1000, clock)
    progress.update(10)
    progress.close()
    progress.finish()  # ignored once closed
    assert out.getvalue().endswith("\n") and "loaded" not in out.getvalue()


def test_empty_checkpoint_does_not_divide_by_zero():
    clock = FakeClock()
    progress, out = _terminal(0, clock)
    progress.finish()
    assert out.getvalue().split("\r")[-1].strip() == "loaded 0.00 GB of weights in 0.0 s (0.0 GB/s)"
