"""Progress for a terminal and for a log file: a tqdm bar, or one plain line every N seconds.

tqdm redraws its bar with carriage returns several times a second: right in a terminal, but a
log file (`make demo > log 2>&1`, a cluster job's stdout) fills with frames. `progress_bar`
gives tqdm when its stream is a terminal and otherwise `PlainProgress`: the same numbers
(tqdm's own formatting, no bar) as one line every `SIMPO_PROGRESS_SECONDS` (default 30) and
at the end. Both have the methods the code uses: iteration, update, set_postfix, close.

Environment: SIMPO_PROGRESS = auto (default) | bar | plain | off; SIMPO_PROGRESS_SECONDS
(seconds between plain lines); SIMPO_PROGRESS_STEPS (also a line every N steps; 0 = off).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

from tqdm import tqdm

MODES = ("auto", "bar", "plain", "off")
# tqdm's bar_format fields without the bar itself
WITH_TOTAL = "{percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
NO_TOTAL = "{n_fmt} [{elapsed}, {rate_fmt}{postfix}]"


def _env_number(name: str, default: float) -> float:
    text = os.environ.get(name, "")
    try:
        value = float(text) if text else default
    except ValueError:
        raise ValueError(f"environment: {name}={text!r}: expected a number >= 0") from None
    if value < 0:
        raise ValueError(f"environment: {name}={text!r}: expected a number >= 0")
    return value


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class PlainProgress:
    """tqdm's numbers as plain lines: one every `seconds` (and every `steps` updates if > 0),
    and one at close. Never a carriage return."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        file: IO[str] | None = None,
        seconds: float = 30.0,
        steps: int = 0,
        clock: Any = time.monotonic,
    ) -> None:
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.initial = self.last_n = initial
        self.file, self.seconds, self.steps, self.clock = file or sys.stderr, seconds, steps, clock
        self.start = self.last = clock()
        self.postfix, self.closed = "", False

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        due_steps = self.steps > 0 and self.n - self.last_n >= self.steps
        if now - self.last >= self.seconds or due_steps:
            self._print(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def line(self, now: float | None = None) -> str:
        """The current state, formatted by tqdm (rate: average since the start)."""
        elapsed = (self.clock() if now is None else now) - self.start
        fmt = ("{desc}: " if self.desc else "") + (WITH_TOTAL if self.total else NO_TOTAL)
        return tqdm.format_meter(
            self.n, self.total, elapsed, prefix=self.desc, unit=self.unit, initial=self.initial,
            postfix=self.postfix or None, bar_format=fmt,
        )  # fmt: skip

    def _print(self, now: float) -> None:
        self.file.write(self.line(now) + "\n")
        self.file.flush()
        self.last, self.last_n = now, self.n

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n != self.last_n or self.n == self.initial:  # not already on the last line
                self._print(self.clock())


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    disable: bool = False,
    file: IO[str] | None = None,
) -> tqdm | PlainProgress:
    """A tqdm bar on a terminal, plain lines elsewhere (see the module docstring)."""
    stream = file or sys.stderr
    mode = os.environ.get("SIMPO_PROGRESS", "auto") or "auto"
    if mode not in MODES:
        raise ValueError(f"environment: SIMPO_PROGRESS={mode!r}: expected one of {MODES}")
    if disable or mode == "off":
        return tqdm(iterable, total=total, disable=True)
    if mode == "bar" or (mode == "auto" and _is_terminal(stream)):
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=stream)
    return PlainProgress(
        iterable, total, desc, unit, initial, stream,
        seconds=_env_number("SIMPO_PROGRESS_SECONDS", 30.0),
        steps=int(_env_number("SIMPO_PROGRESS_STEPS", 0)),
    )  # fmt: skip
