"""The divergence guard's rules, as pure functions (no torch): spikes, loss slope, stability score.

``trainer/guard.py`` applies them at every optimizer step; ``docs/TRAINING.md`` explains them.
"""

from __future__ import annotations

import statistics
from typing import Any, Sequence

MAD_TO_SIGMA = 1.4826  # MAD * this estimates the standard deviation of normally distributed values
RELATIVE_FLOOR = 0.05  # a spread below 5 % of the median counts as 5 %: a flat loss must not make noise a spike


class Diverged(Exception):
    """Too many anomalies in one run: the run stops; ``files`` are the ones to blame."""

    def __init__(self, reason: str, files: list[str]):
        super().__init__(reason)
        self.reason, self.files = reason, files


# --------------------------------------------------------------------------- the rules (pure)

def spike_threshold(history: Sequence[float], k: float, min_history: int) -> float | None:
    """The loss above which a step is a spike; None while fewer than ``min_history`` losses are known."""
    if len(history) < max(1, min_history):
        return None
    median = statistics.median(history)
    mad = statistics.median(abs(x - median) for x in history)
    return median + k * max(MAD_TO_SIGMA * mad, RELATIVE_FLOOR * abs(median))


def loss_slope(losses: Sequence[float]) -> float | None:
    """Least-squares slope of the loss per step over ``losses`` (oldest first); None below 2 points."""
    n = len(losses)
    if n < 2:
        return None
    mean_x, mean_y = (n - 1) / 2, sum(losses) / n
    sxx = sum((i - mean_x) ** 2 for i in range(n))
    return sum((i - mean_x) * (y - mean_y) for i, y in enumerate(losses)) / sxx


def stability_score(losses: Sequence[float], anomalies_in_window: int, window: int) -> float | None:
    """``100 * (1 - a / W) / (1 + d + r)`` over the last ``W`` steps, in (0, 100]; None without losses.

    ``a``: anomalies among those steps; ``d``: the loss's relative spread (1.4826 * MAD / median);
    ``r``: its relative rise (max(0, slope * n / median), how much it climbed across the window).
    100 is a flat or falling loss without noise or anomalies.
    """
    if not losses:
        return None
    median = statistics.median(losses)
    scale = abs(median) or 1.0
    spread = MAD_TO_SIGMA * statistics.median(abs(x - median) for x in losses) / scale
    slope = loss_slope(losses) or 0.0
    rise = max(0.0, slope * len(losses) / scale)
    clean = 1.0 - min(anomalies_in_window, window) / max(1, window)
    return round(100.0 * clean / (1.0 + spread + rise), 1)


def culprits(events: list[dict[str, Any]]) -> list[str]:
    """Files present in every anomalous step (or, when none is, in any of them)."""
    sets = [set(e.get("files") or []) for e in events]
    if not sets:
        return []
    common = set.intersection(*sets)
    return sorted(common or set.union(*sets))
