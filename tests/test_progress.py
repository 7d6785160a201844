"""simpo/progress.py: a tqdm bar on a terminal, plain lines (no carriage returns) in a log file."""

from __future__ import annotations

import io

import pytest
from tqdm import tqdm

from simpo.progress import PlainProgress, progress_bar


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_every_interval_with_tqdms_numbers():
    clock, out = Clock(), io.StringIO()
    bar = PlainProgress(total=100, desc="simpo", file=out, seconds=10.0, clock=clock)
    for _ in range(100):
        clock.now += 1.0  # one step a second
        bar.update(1)
        bar.set_postfix(loss="0.6931", acc="0.50")
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 10  # at 10 s, 20 s, ... 100 s; close adds no duplicate of the last
    assert lines[0] == "simpo:  10% 10/100 [00:10<01:30,  1.00it/s, loss=0.6931, acc=0.50]"
    assert lines[-1].startswith("simpo: 100% 100/100 [01:40<00:00,")
    # the same numbers tqdm computes for a bar (its own format_meter, without the bar)
    meter = tqdm.format_meter(50, 100, 50.0, prefix="simpo", postfix="loss=0.6931, acc=0.50")
    assert "50/100 [00:50<00:50,  1.00it/s, loss=0.6931, acc=0.50]" in meter
    assert lines[4].endswith("50/100 [00:50<00:50,  1.00it/s, loss=0.6931, acc=0.50]")


def test_plain_lines_every_n_steps_and_a_final_line():
    clock, out = Clock(), io.StringIO()
    bar = PlainProgress(total=10, initial=3, file=out, seconds=1e9, steps=3, clock=clock)
    for _ in range(7):
        bar.update(1)
    bar.close()
    counts = [line.split()[1] for line in out.getvalue().splitlines()]
    assert counts == ["6/10", "9/10", "10/10"]  # resumed at 3: every 3 steps, then the end


def test_iteration_closes_with_a_final_line():
    out = io.StringIO()
    items = list(PlainProgress(range(5), desc="tokenising", unit="row", file=out, seconds=1e9))
    assert items == [0, 1, 2, 3, 4]
    assert out.getvalue().count("\n") == 1 and "tokenising: 100% 5/5" in out.getvalue()


def test_terminal_gets_tqdm_and_a_file_gets_plain_lines(monkeypatch):
    monkeypatch.delenv("SIMPO_PROGRESS", raising=False)
    assert isinstance(progress_bar(total=3, file=Terminal()), tqdm)
    assert isinstance(progress_bar(total=3, file=io.StringIO()), PlainProgress)
    monkeypatch.setenv("SIMPO_PROGRESS", "bar")
    assert isinstance(progress_bar(total=3, file=io.StringIO()), tqdm)
    monkeypatch.setenv("SIMPO_PROGRESS", "plain")
    assert isinstance(progress_bar(total=3, file=Terminal()), PlainProgress)
    monkeypatch.setenv("SIMPO_PROGRESS", "off")
    out = io.StringIO()
    bar = progress_bar(total=3, file=out)
    bar.update(3)
    bar.close()
    assert out.getvalue() == ""
    monkeypatch.setenv("SIMPO_PROGRESS", "auto")
    disabled = progress_bar(total=3, file=out, disable=True)
    disabled.update(1), disabled.set_postfix(loss="1"), disabled.close()
    assert out.getvalue() == ""


def test_environment_settings_and_their_errors(monkeypatch):
    monkeypatch.setenv("SIMPO_PROGRESS", "plain")
    monkeypatch.setenv("SIMPO_PROGRESS_SECONDS", "0")
    monkeypatch.setenv("SIMPO_PROGRESS_STEPS", "2")
    out = io.StringIO()
    bar = progress_bar(total=4, file=out, desc="x")
    assert (bar.seconds, bar.steps) == (0.0, 2)
    monkeypatch.setenv("SIMPO_PROGRESS", "fancy")
    with pytest.raises(ValueError, match=r"SIMPO_PROGRESS='fancy': expected one of"):
        progress_bar(total=1, file=out)
    monkeypatch.setenv("SIMPO_PROGRESS", "plain")
    monkeypatch.setenv("SIMPO_PROGRESS_SECONDS", "soon")
    with pytest.raises(ValueError, match=r"SIMPO_PROGRESS_SECONDS='soon': expected a number"):
        progress_bar(total=1, file=out)
