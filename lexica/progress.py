"""One progress reporter for long work: counts, rate, ETA, printed every few seconds."""

from __future__ import annotations

import sys
import time
from collections import deque

RATE_WINDOW_SECONDS = 30.0


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


class Progress:
    """Prints ``label`` progress lines at most every ``interval`` seconds (and on ``final``)."""

    def __init__(self, label: str, total_units: float, unit: str, interval: float = 5.0, stream=None):
        self.label = label
        self.total_units = total_units
        self.unit = unit
        self.interval = interval
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self._last_print = 0.0
        # Recent (time, units, tokens) samples: rates and ETA follow the current speed, not one
        # diluted by start-up (cluster start, model load).
        self._samples: deque = deque()

    def update(self, done_units: float, tokens: int, extra: str = "", final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last_print < self.interval:
            return
        self._last_print = now
        elapsed = now - self.started
        self._samples.append((now, done_units, tokens))
        while len(self._samples) > 2 and now - self._samples[1][0] > RATE_WINDOW_SECONDS:
            self._samples.popleft()
        first_time, first_units, first_tokens = self._samples[0]
        span = max(now - first_time, 1e-9)
        if final or len(self._samples) < 2:  # the closing line reports the whole run's average
            rate = tokens / max(elapsed, 1e-9)
        else:
            rate = (tokens - first_tokens) / span
        unit_rate = (done_units - first_units) / span if len(self._samples) > 1 else 0.0
        remaining = self.total_units - done_units
        eta_text = duration(remaining / unit_rate) if unit_rate > 0 else ("0m00s" if remaining <= 0 else "?")
        line = (f"[{self.label}] {self.unit} {human(done_units)}/{human(self.total_units)} "
                f"tokens {human(tokens)}  {human(rate)} tok/s  elapsed {duration(elapsed)}  ETA {eta_text}")
        if extra:
            line += f"  | {extra}"
        print(line, file=self.stream, flush=True)
