"""The divergence guard's rules, as pure functions (no torch): spikes, loss slope, stability score.

``trainer/guard.py`` applies them at every optimizer step; ``docs/TRAINING.md`` explains them.

The spike rule (``SpikeRule``) knows where a step's examples come from. A run mixes the user's
new lines with replayed earlier lines and the base's own rehearsed answers, whose losses differ
several-fold (rehearsal ~0.5 beside new lines ~3): one median and one spread over all steps would
make the spread so wide that a file of word salad passes as noise. So a step is described by the
share of its target tokens from each source, and the window's step losses are fitted as
``loss = sum(share_s * level_s)`` (robust least squares, one level per source); a step is judged
against the loss its own mix predicts, with the spread of the fit's residuals. The levels of the
shared sources and the spread come from earlier runs too (``history/guard_window.json``), so a run
is judged from its first steps; the level of this run's own files is known after
``guard.min_run_steps`` steps. Until then, a step of them is judged against what the user's files
of earlier runs cost when they were new (their levels over their first steps, kept in the window
file): more than ``guard.new_file_growth`` times that is an anomaly, so a file of word salad is
caught at its first step while a new file that is merely harder than the last passes. Whatever
the spread, a step whose loss is more than ``guard.max_growth`` times what the lowest levels of
this run predict is an anomaly (a learning rate that makes the loss climb tenfold), and from the
very first step so is a loss above
``CHANCE_MARGIN * ln(vocabulary size)``: a model that does worse than a uniform guess over its
vocabulary has been broken, whatever data it reads (a pretrained model scores ordinary text far
below that; a randomly initialised one sits at ``ln(vocabulary)``, under the margin).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
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


def culprits(events: list[dict[str, Any]], clean: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Files present in every anomalous step (or, when none is, in any of them); of those, the ones
    never in an accepted step (``clean``: files of this run's accepted steps) when there are any: a
    file of word salad beside an ordinary one shares every anomalous step with it when a step holds
    a line of each, but only the ordinary file also trained cleanly."""
    sets = [set(e.get("files") or []) for e in events]
    if not sets:
        return []
    common = set.intersection(*sets) or set.union(*sets)
    return sorted(common - set(clean) or common)


# --------------------------------------------------------------------------- the spike rule by source

USER = "user"  # this run's own files
SOURCES = (USER, "replay", "rehearsal", "earlier")  # earlier: earlier runs' own files (from their history)
HUBER = 1.5  # residuals beyond this many spreads weigh less in the fit (robust to a spike the window kept)
CHANCE_MARGIN = 1.25  # a loss above 1.25 * ln(vocabulary) is worse than guessing: broken weights
GROWTH_LEVEL_FLOOR = 0.1  # nats/token: below it a level is "memorised", and tenfold of it is not yet divergence
NEW_LEVELS_KEPT = 20  # earlier runs' new-file levels the prior is the median of


@dataclass(frozen=True)
class Observation:
    """One accepted step: its loss and the share of its target tokens from each source (summing to 1)."""

    loss: float
    shares: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"loss": round(self.loss, 6), "shares": {k: round(v, 4) for k, v in self.shares.items() if v}}

    @classmethod
    def from_json(cls, rec: Any) -> Observation | None:
        try:
            loss = float(rec["loss"])
            shares = {str(k): float(v) for k, v in (rec.get("shares") or {USER: 1.0}).items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        return cls(loss, shares) if math.isfinite(loss) and shares else None

    def earlier(self) -> Observation:
        """As seen from a later run: its own files are that run's ``earlier`` source."""
        shares = dict(self.shares)
        if USER in shares:
            shares["earlier"] = shares.get("earlier", 0.0) + shares.pop(USER)
        return Observation(self.loss, shares)


def shares_of(tokens: dict[str, float]) -> dict[str, float]:
    """Token counts by source -> shares (``{user: 1}`` when nothing is known)."""
    total = sum(v for v in tokens.values() if v > 0)
    if total <= 0:
        return {USER: 1.0}
    return {k: v / total for k, v in tokens.items() if v > 0}


@dataclass
class Fit:
    levels: dict[str, float]  # the fitted loss of each source
    support: dict[str, float]  # steps' worth of tokens each level rests on
    spread: float  # 1.4826 * MAD of the residuals

    def predict(self, shares: dict[str, float], min_support: dict[str, float] | None = None) -> float | None:
        """The loss this mix predicts; None when a source of the step has no (well enough supported) level."""
        total = 0.0
        for k, w in shares.items():
            if w <= 0:
                continue
            need = (min_support or {}).get(k, 1.0)
            if k not in self.levels or self.support.get(k, 0.0) < need:
                return None
            total += w * self.levels[k]
        return total


def fit_levels(window: Sequence[Observation], iterations: int = 4) -> Fit | None:
    """Per-source loss levels of ``window`` by Huber-weighted least squares; None on an empty window."""
    import numpy as np

    if not window:
        return None
    names = sorted({k for o in window for k, v in o.shares.items() if v > 0})
    a = np.array([[o.shares.get(k, 0.0) for k in names] for o in window], dtype=np.float64)
    b = np.array([o.loss for o in window], dtype=np.float64)
    w = np.ones(len(b))
    mu = np.zeros(len(names))
    spread = 0.0
    for _ in range(iterations):
        sw = np.sqrt(w)[:, None]
        mu = np.linalg.lstsq(a * sw, b * sw[:, 0], rcond=None)[0]
        mu = np.maximum(mu, 0.0)
        r = b - a @ mu
        spread = MAD_TO_SIGMA * float(np.median(np.abs(r - np.median(r))))
        scale = max(spread, 1e-6)
        w = np.minimum(1.0, HUBER * scale / np.maximum(np.abs(r), 1e-12))
    support = {k: float(a[:, i].sum()) for i, k in enumerate(names)}
    return Fit({k: float(mu[i]) for i, k in enumerate(names)}, support, spread)


@dataclass
class Verdict:
    kind: str | None  # None: accepted; "loss spike", "loss spike on a new file", "loss growth", "loss above chance"
    threshold: float | None  # the loss above which this step would have been an anomaly (None: not judged)
    expected: float | None  # the loss its mix predicts


@dataclass
class SpikeRule:
    """The guard's memory across steps: the window of accepted steps and this run's lowest levels."""

    k: float
    window_size: int
    min_history: int
    min_run_steps: int
    max_growth: float
    chance: float | None = None  # ln(vocabulary size): the loss of a uniform guess
    new_file_growth: float = 3.0  # before this run's level is known: times the earlier runs' new-file level
    window: list[Observation] = field(default_factory=list)
    run_steps: float = 0.0  # this run's accepted steps' worth of its own files' tokens
    lowest: dict[str, float] = field(default_factory=dict)  # each source's lowest level seen in this run
    new_levels: list[float] = field(default_factory=list)  # earlier runs' own files' levels when they were new
    new_level: float | None = None  # this run's own files' level over its first steps, once known

    def seed(self, earlier: Sequence[Observation], new_levels: Sequence[float] = ()) -> None:
        """Earlier runs' accepted steps (their own files become the ``earlier`` source) and their
        files' levels when new (``new_level`` of each earlier run, oldest first)."""
        self.window = [o.earlier() for o in earlier][-self.window_size:]
        self.new_levels = [float(x) for x in new_levels if math.isfinite(x) and x > 0][-NEW_LEVELS_KEPT:]

    def new_file_threshold(self, shares: dict[str, float], fit: Fit | None) -> float | None:
        """Before this run's own level is known: the loss above which a step of its files is an
        anomaly, ``guard.new_file_growth`` times what the step would cost were its files as the
        earlier runs' files were when new (the other sources at their fitted levels); None without
        such a history, once the run's level is known, or for a step without the run's own tokens."""
        if not self.new_levels or shares.get(USER, 0.0) <= 0 or self.run_steps >= self.min_run_steps:
            return None
        prior = statistics.median(self.new_levels)
        levels = {**(fit.levels if fit else {}), USER: prior}
        support = {**(fit.support if fit else {}), USER: math.inf}
        expected = Fit(levels, support, 0.0).predict(shares)
        if expected is None:  # a source without a level yet: judge the run's own share alone
            expected = shares[USER] * prior
        return self.new_file_growth * max(expected, GROWTH_LEVEL_FLOOR)

    def judge(self, loss: float, shares: dict[str, float]) -> Verdict:
        """Whether a finite step loss with these shares is a spike (or a growth), against the window."""
        verdict = Verdict(None, None, None)
        if self.chance:
            verdict.threshold = CHANCE_MARGIN * self.chance
            if loss > verdict.threshold:
                verdict.kind = "loss above chance"
        fit = fit_levels(self.window)
        new = self.new_file_threshold(shares, fit)
        if new is not None:
            verdict.threshold = new if verdict.threshold is None else min(verdict.threshold, new)
            if loss > new:
                verdict.kind = verdict.kind or "loss spike on a new file"
        if fit is None:
            return verdict
        need = {USER: float(self.min_run_steps)}
        expected = verdict.expected = fit.predict(shares, need)
        if expected is not None and len(self.window) >= max(1, self.min_history):
            spike = expected + self.k * max(fit.spread, RELATIVE_FLOOR * abs(expected))
            verdict.threshold = spike if verdict.threshold is None else min(verdict.threshold, spike)
            if loss > spike:
                verdict.kind = verdict.kind or "loss spike"
        floor = Fit(self.lowest, {k: math.inf for k in self.lowest}, 0.0).predict(shares)
        if floor is not None and self.run_steps >= self.min_run_steps:
            growth = self.max_growth * max(floor, GROWTH_LEVEL_FLOOR)
            if loss > growth:
                verdict.kind = verdict.kind or "loss growth"
                verdict.threshold = growth if verdict.threshold is None else min(verdict.threshold, growth)
        return verdict

    def accept(self, loss: float, shares: dict[str, float]) -> None:
        """Keep an accepted step; update this run's lowest levels once they are known."""
        self.window.append(Observation(loss, dict(shares)))
        del self.window[:-self.window_size]
        self.run_steps += shares.get(USER, 0.0)
        fit = fit_levels(self.window)
        if fit is None:
            return
        for k, level in fit.levels.items():
            enough = self.min_run_steps if k == USER else 1.0
            if fit.support.get(k, 0.0) >= enough and (k != USER or self.run_steps >= self.min_run_steps):
                self.lowest[k] = min(self.lowest.get(k, math.inf), level)
                if k == USER and self.new_level is None:  # the level of the run's files over its first steps
                    self.new_level = level

    @property
    def losses(self) -> list[float]:
        return [o.loss for o in self.window]
