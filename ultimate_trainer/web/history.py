"""History for the page's charts: follow the append-only JSONL files, keep bounded downsampled series.

The page polls every two seconds and a history can grow to millions of steps, so the monitor never
re-reads a whole file per request: a :class:`JsonlFollower` reads only the bytes appended since the
last poll, and a :class:`Downsampler` folds every record into at most ``cap`` buckets (doubling the
bucket width when full), so memory and answer size stay fixed however long training runs.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import deque
from pathlib import Path
from typing import Any

from ultimate_trainer.core import status

log = logging.getLogger(__name__)

CHART_POINTS = 400          # buckets per whole-history chart
RECENT_STEPS = 200          # newest raw steps kept for the loss trend
TREND_WINDOW = 20           # steps per half of the loss-trend comparison
TREND_FLAT_FRACTION = 0.02  # relative change of mean loss below which the trend is "flat"
TREND_MIN_CHANGE = 0.01     # nats/token: a smaller change of mean loss is "flat" however large relatively
STEP_FIELDS = ("loss", "learning_rate", "grad_norm", "tokens_per_second", "stability_score")
EVAL_FIELDS = ("accuracy", "overall", "last_20", "last_50", "val_loss")
PROBE_FIELDS = ("retention", "score")  # history/probe.jsonl (trainer/probe/callback.py)


class JsonlFollower:
    """The records appended to ``path`` since the last :meth:`poll`; notices a replaced or truncated file."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.inode: int | None = None

    def poll(self) -> tuple[bool, list[dict[str, Any]]]:
        """(reset, new records): ``reset`` is True when the file was replaced and was read from the start."""
        try:
            st = os.stat(self.path)
        except OSError:
            reset = self.offset > 0
            self.offset, self.inode = 0, None
            return reset, []
        reset = False
        if st.st_ino != self.inode or st.st_size < self.offset:
            reset = self.inode is not None
            self.offset, self.inode = 0, st.st_ino
        if st.st_size == self.offset:
            return reset, []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(st.st_size - self.offset)
        end = chunk.rfind(b"\n")
        if end < 0:  # only a torn or still-being-written line: wait for its newline
            return reset, []
        self.offset += end + 1
        records = []
        for raw in chunk[: end + 1].splitlines():
            try:
                rec = status.loads(raw)
            except ValueError:
                continue  # a torn line repaired by the next append: skipped, as every reader does
            if isinstance(rec, dict):
                records.append(rec)
        return reset, records


class Downsampler:
    """At most ``cap`` buckets over a growing series; each bucket keeps the mean of every field."""

    def __init__(self, fields: tuple[str, ...], cap: int = CHART_POINTS):
        self.fields, self.cap = fields, cap
        self.width = 1
        self.count = 0
        self.buckets: list[dict[str, Any]] = []

    def add(self, rec: dict[str, Any]) -> None:
        self.count += 1
        if not self.buckets or self.buckets[-1]["n"] >= self.width:
            self.buckets.append({"n": 0, "sums": {}, "counts": {}, "global_step": None, "time": None,
                                 "skipped": 0})
        b = self.buckets[-1]
        b["n"] += 1
        b["skipped"] += 1 if rec.get("skipped") else 0  # steps whose update the guard skipped
        b["global_step"], b["time"] = rec.get("global_step"), rec.get("time")
        for f in self.fields:
            v = rec.get(f)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                b["sums"][f] = b["sums"].get(f, 0.0) + v
                b["counts"][f] = b["counts"].get(f, 0) + 1
        if len(self.buckets) > self.cap:
            self._halve()

    def _halve(self) -> None:
        merged = []
        for a, b in zip(self.buckets[0::2], self.buckets[1::2] + [None]):
            if b is None:
                merged.append(a)
                continue
            for f in self.fields:
                b["sums"][f] = a["sums"].get(f, 0.0) + b["sums"].get(f, 0.0)
                b["counts"][f] = a["counts"].get(f, 0) + b["counts"].get(f, 0)
            b["n"] += a["n"]
            b["skipped"] += a["skipped"]
            merged.append(b)
        self.buckets = merged
        self.width *= 2

    def points(self) -> list[dict[str, Any]]:
        out = []
        for b in self.buckets:
            p: dict[str, Any] = {"global_step": b["global_step"], "time": b["time"], "n": b["n"],
                                 "skipped": b["skipped"]}
            for f in self.fields:
                c = b["counts"].get(f, 0)
                p[f] = b["sums"][f] / c if c else None
            out.append(p)
        return out


def loss_trend(recent: list[dict[str, Any]], window: int = TREND_WINDOW) -> str | None:
    """``falling``/``flat``/``rising``: mean loss of the newest ``window`` steps against the ``window`` before.

    A change counts only when it is larger than ``TREND_FLAT_FRACTION`` of the older mean, than
    ``TREND_MIN_CHANGE`` and than the noise (twice the standard error of the difference of the two
    means): a converged loss jittering between 0.0005 and 0.0013 is flat, not "rising" by 50 %.
    """
    losses = [r["loss"] for r in recent if isinstance(r.get("loss"), (int, float)) and not r.get("skipped")]
    if len(losses) < 2 * window:
        return None
    older, newer = losses[-2 * window:-window], losses[-window:]
    old, new = sum(older) / window, sum(newer) / window
    if old == 0:
        return "flat"

    def var(xs: list[float], mean: float) -> float:
        return sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)

    noise = 2.0 * math.sqrt((var(older, old) + var(newer, new)) / window)
    if abs(new - old) <= max(TREND_FLAT_FRACTION * abs(old), TREND_MIN_CHANGE, noise):
        return "flat"
    return "falling" if new < old else "rising"


class History:
    """The charts' data for one status folder; thread-safe (waitress answers from several threads)."""

    def __init__(self, status_dir: str | Path, cap: int = CHART_POINTS):
        sd = Path(status_dir)
        self.cap = cap
        self._lock = threading.Lock()
        self._steps_f = JsonlFollower(sd / status.STEPS_HISTORY)
        self._evals_f = JsonlFollower(sd / status.EVALS_HISTORY)
        self._probe_f = JsonlFollower(sd / status.PROBE_HISTORY)
        self._reset_steps()
        self._reset_evals()
        self.probes = Downsampler(PROBE_FIELDS, self.cap)

    def _reset_steps(self) -> None:
        self.steps = Downsampler(STEP_FIELDS, self.cap)
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_STEPS)

    def _reset_evals(self) -> None:
        self.evals = Downsampler(EVAL_FIELDS, self.cap)
        self.last_eval: dict[str, Any] | None = None

    def refresh(self) -> None:
        with self._lock:
            reset, new = self._steps_f.poll()
            if reset:
                self._reset_steps()
            for rec in new:
                self.steps.add(rec)
                self.recent.append(rec)
            reset, new = self._evals_f.poll()
            if reset:
                self._reset_evals()
            for rec in new:
                self.evals.add(rec)
                self.last_eval = rec
            reset, new = self._probe_f.poll()
            if reset:
                self.probes = Downsampler(PROBE_FIELDS, self.cap)
            for rec in new:
                self.probes.add(rec)

    def snapshot(self) -> dict[str, Any]:
        """``steps``/``evals``: count, bucket width and points; ``loss_trend``; ``last_val_loss``."""
        self.refresh()
        with self._lock:
            recent = list(self.recent)
            return {
                "steps": {"count": self.steps.count, "per_point": self.steps.width, "points": self.steps.points()},
                "evals": {"count": self.evals.count, "per_point": self.evals.width, "points": self.evals.points()},
                "probes": {"count": self.probes.count, "per_point": self.probes.width, "points": self.probes.points()},
                "loss_trend": loss_trend(recent),
                "last_val_loss": (self.last_eval or {}).get("val_loss"),
            }

    def summary(self) -> dict[str, Any]:
        """What /api/state needs, without building the chart points."""
        self.refresh()
        with self._lock:
            return {"loss_trend": loss_trend(list(self.recent)), "last_val_loss": (self.last_eval or {}).get("val_loss"),
                    "steps": self.steps.count, "evals": self.evals.count}
