"""One progress reporter for long work: a live bar on a terminal, periodic lines in a log.

On a terminal (stderr is a TTY) each stage shows one tqdm bar: done/total, rate, elapsed, ETA and
the stage's own figures (tokens/s, FVU, ...). Anywhere else (a log file, a Ray job's output, CI)
it prints a line every ``interval`` seconds instead, which reads well in a log.
``LEXICA_PROGRESS=lines`` (or ``bar``) overrides the choice.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections import deque

RATE_WINDOW_SECONDS = 30.0
PROGRESS_ENV = "LEXICA_PROGRESS"


def human(number: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(number) >= size:
            return f"{number / size:.2f}{unit}"
    return f"{number:.0f}"


def duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def live_bars(stream) -> bool:
    """Whether progress on ``stream`` is a live bar (a terminal) rather than log lines."""
    choice = os.environ.get(PROGRESS_ENV, "")
    if choice in ("bar", "lines"):
        return choice == "bar"
    return bool(getattr(stream, "isatty", lambda: False)())


class Progress:
    """Reports ``label`` progress: ``update(done_units, tokens, extra, final)`` as often as you like.
    ``total_units`` None: the total is not known (a stream); no ETA is shown."""

    def __init__(self, label: str, total_units: float | None, unit: str, interval: float = 5.0, stream=None):
        self.label = label
        self.total_units = total_units
        self.unit = unit
        self.interval = interval
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self._last_print = 0.0
        self._closed = False
        # Recent (time, units, tokens) samples: rates and ETA follow the current speed, not one
        # diluted by start-up (cluster start, model load).
        self._samples: deque = deque()  # (time, tokens)
        self._units: deque = deque()  # done units at the same times (line mode's ETA)
        self._bar = None
        if live_bars(self.stream):
            from tqdm.auto import tqdm

            # The width is read once, with a fallback: a terminal that reports no size (a pty
            # without a window, e.g. under `script`) would otherwise get an empty bar.
            size = shutil.get_terminal_size((100, 24))
            self._bar = tqdm(total=total_units, desc=label, unit=f" {unit}", file=self.stream, ncols=size.columns,
                             nrows=size.lines, mininterval=0.5, smoothing=0.1, leave=True)

    def update(self, done_units: float, tokens: int, extra: str = "", final: bool = False) -> None:
        if self._closed:
            return
        now = time.monotonic()
        if self._bar is not None:
            self._update_bar(now, done_units, tokens, extra, final)
            return
        if not final and now - self._last_print < self.interval:
            return
        self._last_print = now
        print(self._line(now, done_units, tokens, extra, final), file=self.stream, flush=True)
        self._closed = final

    def _token_rate(self, now: float, tokens: int, final: bool) -> float:
        """Tokens per second over the last ``RATE_WINDOW_SECONDS`` (the whole run's at the end)."""
        self._samples.append((now, tokens))
        while len(self._samples) > 2 and now - self._samples[1][0] > RATE_WINDOW_SECONDS:
            self._samples.popleft()
        first_time, first_tokens = self._samples[0]
        if final or len(self._samples) < 2:
            return tokens / max(now - self.started, 1e-9)
        return (tokens - first_tokens) / max(now - first_time, 1e-9)

    def _update_bar(self, now: float, done_units: float, tokens: int, extra: str, final: bool) -> None:
        bar = self._bar
        brief = extra.split(" | ")[0]  # a bar stays one line: the first part of the details only
        bar.set_postfix_str(f"{human(self._token_rate(now, tokens, final))} tok/s" + (f"  {brief}" if brief else ""),
                            refresh=False)
        bar.update(done_units - bar.n)  # tqdm's own rate and ETA follow the units
        if final:
            bar.close()
            self._closed = True

    def _line(self, now: float, done_units: float, tokens: int, extra: str, final: bool) -> str:
        first_time = self._samples[0][0] if self._samples else now
        first_units = self._units[0] if self._units else done_units
        rate = self._token_rate(now, tokens, final)
        self._units.append(done_units)
        while len(self._units) > len(self._samples):
            self._units.popleft()
        span = max(now - first_time, 1e-9)
        unit_rate = (done_units - first_units) / span if now > first_time else 0.0
        if self.total_units is None:  # a stream of unknown length
            eta_text, total_text = ("0m00s" if final else "?"), "?"
        else:
            remaining = self.total_units - done_units
            eta_text = duration(remaining / unit_rate) if unit_rate > 0 else ("0m00s" if remaining <= 0 else "?")
            total_text = human(self.total_units)
        line = (f"[{self.label}] {self.unit} {human(done_units)}/{total_text} "
                f"tokens {human(tokens)}  {human(rate)} tok/s  elapsed {duration(now - self.started)}  ETA {eta_text}")
        return line + (f"  | {extra}" if extra else "")
