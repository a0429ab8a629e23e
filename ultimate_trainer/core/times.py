"""Time in the status files: one format for every ``*_at`` field, one parser for every reader.

Every ``*_at`` field is local time with its UTC offset at second precision
(``2026-11-26T06:16:53+0000``). Readers accept any ISO 8601 string Python can parse.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

ISO_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


def now_iso() -> str:
    """Now, as every ``*_at`` field holds it."""
    return time.strftime(ISO_FORMAT)


def iso(d: dt.datetime | None) -> str | None:
    """``d`` in the ``*_at`` format (local time), or None."""
    return None if d is None else d.astimezone().strftime(ISO_FORMAT)


def parse_iso(s: Any) -> dt.datetime | None:
    """An aware local datetime from an ISO 8601 string; None for anything else."""
    if not isinstance(s, str):
        return None
    try:
        d = dt.datetime.fromisoformat(s)
    except ValueError:
        try:
            d = dt.datetime.strptime(s, ISO_FORMAT)
        except ValueError:
            return None
    return d.astimezone()


def epoch_seconds(s: Any) -> float | None:
    """Seconds since the epoch of an ISO 8601 string, or None."""
    d = parse_iso(s)
    return None if d is None else d.timestamp()
