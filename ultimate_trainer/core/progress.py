"""Progress of a long phase that is not a training step: done/total, rate, ETA, and the way out of it.

The phases it serves (the base answering the rehearsal prompts, the probe baseline, an evaluation,
the merge's gate and its layers) each take seconds to tens of minutes. ``Progress`` counts what
is done, logs a line with the ETA at most every ``log_every`` seconds, hands a snapshot (the
``progress`` object of ``training_status.json``, docs/STATUS.md) to ``on_update``, and answers
``stopped()`` from the caller's stop flag so that the work can end within seconds of a SIGTERM:
generation checks it at every token (model/scoring.py), loops between items. ``check()`` raises
``Stopped`` at a point where nothing is half-written.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from ultimate_trainer.core.times import now_iso

log = logging.getLogger(__name__)


class Stopped(Exception):
    """A stop arrived during a long phase; the phase ended early and wrote nothing half-done."""


class Progress:
    """``done`` of ``total`` ``unit`` of ``phase``; see the module docstring."""

    def __init__(self, phase: str, total: int, unit: str, *, on_update: Callable[[dict[str, Any]], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, log_every: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, logger: logging.Logger | None = None):
        self.phase, self.total, self.unit = phase, max(0, int(total)), unit
        self.on_update, self.should_stop, self.log_every = on_update, should_stop, log_every
        self.clock, self.log = clock, logger or log
        self.done = 0
        self.started_at = now_iso()
        self._t0 = clock()
        self._logged = self._t0
        self.log.info("%s: %d %s to do", phase, self.total, unit)
        self._emit()

    @property
    def elapsed(self) -> float:
        return self.clock() - self._t0

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the rate so far; None until something is done."""
        if self.done <= 0 or self.total <= 0:
            return None
        return max(0.0, self.elapsed * (self.total - self.done) / self.done)

    def snapshot(self) -> dict[str, Any]:
        eta = self.eta_seconds
        return {"phase": self.phase, "done": self.done, "total": self.total, "unit": self.unit,
                "elapsed_seconds": round(self.elapsed, 1), "eta_seconds": None if eta is None else round(eta, 1),
                "started_at": self.started_at}

    def advance(self, n: int = 1) -> None:
        """``n`` more done: update the snapshot, log every ``log_every`` seconds (and at the end)."""
        self.done = min(self.total, self.done + n) if self.total else self.done + n
        now = self.clock()
        if now - self._logged >= self.log_every or self.done >= self.total:
            self._logged = now
            eta = self.eta_seconds
            self.log.info("%s: %d/%d %s, %s elapsed%s", self.phase, self.done, self.total, self.unit,
                          _duration(self.elapsed), "" if eta is None or self.done >= self.total
                          else f", about {_duration(eta)} left")
        self._emit()

    def stopped(self) -> bool:
        return bool(self.should_stop and self.should_stop())

    def check(self) -> None:
        """Raise ``Stopped`` when a stop was asked for."""
        if self.stopped():
            raise Stopped(f"{self.phase} stopped at {self.done}/{self.total} {self.unit}")

    def _emit(self) -> None:
        if self.on_update is not None:
            self.on_update(self.snapshot())


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
