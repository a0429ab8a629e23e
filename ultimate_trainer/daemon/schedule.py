"""The daemon's arithmetic: throughput over a rolling window, queue ETA, disk level, consolidation time.

Pure functions of their inputs (no files, no processes), so each rule is tested on its own.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Any, Iterable

from ultimate_trainer.daemon.journal import RunRecord


def disk_info(path: str | Path, warn_gb: float, critical_gb: float) -> dict[str, Any]:
    """Free space where checkpoints are written, and the level the thresholds give it."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    usage = shutil.disk_usage(p)
    free_gb = usage.free / 1e9
    level = "critical" if free_gb < critical_gb else "warning" if free_gb < warn_gb else "ok"
    return {"free_gb": round(free_gb, 3), "total_gb": round(usage.total / 1e9, 3), "level": level,
            "warn_gb": warn_gb, "critical_gb": critical_gb}


def throughput(runs: Iterable[RunRecord], window_hours: float, now_ts: float) -> dict[str, Any]:
    """MB/hour and examples/hour of the runs that finished in the window, per hour of training time.

    Training time (model load included) rather than wall time: idle hours with an empty inbox say
    nothing about how fast the queue will drain.
    """
    since = now_ts - window_hours * 3600
    win = [r for r in runs if r.finished_at >= since and r.seconds > 0]
    secs = sum(r.seconds for r in win)
    if not win or secs <= 0:
        return {"mb_per_hour": None, "examples_per_hour": None, "window_hours": window_hours, "runs_in_window": len(win)}
    hours = secs / 3600
    return {"mb_per_hour": round(sum(r.bytes for r in win) / 1e6 / hours, 3),
            "examples_per_hour": round(sum(r.examples for r in win) / hours, 3),
            "window_hours": window_hours, "runs_in_window": len(win)}


def queue_eta(remaining_bytes: float, mb_per_hour: float | None) -> float | None:
    """Seconds to train ``remaining_bytes`` at the measured rate; None until a rate is known."""
    if remaining_bytes <= 0:
        return 0.0
    if not mb_per_hour:
        return None
    return remaining_bytes / 1e6 / mb_per_hour * 3600


def last_boundary(hour: int, now: dt.datetime) -> dt.datetime:
    """The most recent ``hour``:00 local time at or before ``now``."""
    b = now.replace(hour=hour, minute=0, second=0, microsecond=0)
    return b if b <= now else b - dt.timedelta(days=1)


def consolidation_due(hour: int | None, last_at: dt.datetime | None, reference: dt.datetime | None,
                      now: dt.datetime) -> bool:
    """True when an ``hour``:00 passed since the last consolidation (or since the daemon was first started).

    A boundary passed while the daemon was down counts, so a missed consolidation runs at the next start.
    """
    if hour is None:
        return False
    since = last_at or reference
    if since is None:
        return False
    return since < last_boundary(hour, now)


def next_consolidation(hour: int | None, due: bool, now: dt.datetime) -> dt.datetime | None:
    if hour is None:
        return None
    if due:
        return now
    return last_boundary(hour, now) + dt.timedelta(days=1)
