"""One progress reporter for long work: counts, rate, ETA, printed every few seconds."""

from __future__ import annotations

import sys
import time


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

    def update(self, done_units: float, tokens: int, extra: str = "", final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last_print < self.interval:
            return
        self._last_print = now
        elapsed = max(now - self.started, 1e-9)
        rate = tokens / elapsed
        remaining = self.total_units - done_units
        eta = remaining * elapsed / done_units if done_units > 0 else float("nan")
        eta_text = duration(eta) if eta == eta else "?"
        line = (f"[{self.label}] {self.unit} {human(done_units)}/{human(self.total_units)} "
                f"tokens {human(tokens)}  {human(rate)} tok/s  elapsed {duration(elapsed)}  ETA {eta_text}")
        if extra:
            line += f"  | {extra}"
        print(line, file=self.stream, flush=True)
