"""The forgetting guard while training: the base-knowledge probe, its baseline and the retention figure.

``ProbeCallback`` runs after ``EvalCallback``. At the first run it scores the probe on the base
(the adapter switched off, so it is the base's score whatever the adapter holds) and writes that
baseline to ``history/probe_baseline.json``; a changed probe file gets a new baseline. Then at every
``eval.probe_every``-th evaluation (the 1st, the (1+N)th...) it scores the probe on the model being
trained, appends the result to ``history/probe.jsonl`` and sets ``training_status.json``'s
``retention`` (docs/STATUS.md): ``ratio`` = score / baseline, ``trend`` against the previous
probe, ``forgetting`` when the ratio is under ``eval.retention_warn``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_callback import TrainerControl, TrainerState

from ultimate_trainer.core import status as st
from ultimate_trainer.core.config import Config
from ultimate_trainer.core.progress import Stopped
from ultimate_trainer.core.times import now_iso
from ultimate_trainer.trainer.probe.questions import Probe
from ultimate_trainer.trainer.probe.scoring import retention, score_probe
from ultimate_trainer.trainer.reporter import StatusReporter, Throughput

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ultimate_trainer.model.scoring import AccuracyTracker

log = logging.getLogger(__name__)

TREND_MARGIN = 0.02  # a change of retention smaller than this between two probes is "stable"
LEGACY_PROBE_BOUND = 24  # eval.probe_max_new_tokens of a baseline that does not record it (before 2026-12-07)


def retention_status(records: list[dict[str, Any]], warn: float) -> dict[str, Any] | None:
    """``training_status.json``'s ``retention`` from the probe history (oldest first)."""
    scored = [r for r in records if isinstance(r.get("retention"), (int, float))]
    if not scored:
        return None
    last = scored[-1]
    ratio = float(last["retention"])
    trend = None
    if len(scored) >= 2:
        prev = float(scored[-2]["retention"])
        trend = ("falling" if ratio < prev - TREND_MARGIN or (ratio < warn and ratio < prev)
                 else "rising" if ratio > prev + TREND_MARGIN else "stable")
    return {"ratio": ratio, "score": last.get("score"), "baseline": last.get("baseline"),
            "correct": last.get("correct"), "total": last.get("total"), "global_step": last.get("global_step"),
            "trend": trend, "forgetting": ratio < warn, "warn_below": warn, "probes": len(scored)}


class ProbeCallback(TrainerCallback):
    def __init__(self, cfg: Config, reporter: StatusReporter, tokenizer: PreTrainedTokenizerBase, probe: Probe,
                 tracker: AccuracyTracker,
                 base_model: str, run_id: str, throughput: Throughput | None = None, stop: Any = None):
        self.cfg, self.reporter, self.tokenizer, self.probe = cfg, reporter, tokenizer, probe
        self.tracker, self.base_model, self.run_id, self.throughput = tracker, base_model, run_id, throughput
        self.stop = stop  # the run's StopFlag: a probe ends within a generated token of a SIGTERM (Stopped)
        self.history = reporter.dir / st.PROBE_HISTORY
        self.baseline_path = reporter.dir / st.PROBE_BASELINE
        self.baseline: dict[str, Any] | None = None
        self.seen_evaluations = tracker.evaluations
        self.model: PreTrainedModel | None = None
        self.probes = 0  # probes scored in this run (the controller decides after each)
        self.last: dict[str, Any] | None = None  # the last probe's record

    def _score(self, model: Any, phase: str = "probe") -> dict[str, Any]:
        ev = self.cfg.eval
        should_stop = self.stop.stopped if self.stop is not None else None
        with self.reporter.phase("evaluating"), \
                self.reporter.progress(phase, len(self.probe.items), "questions", should_stop) as progress:
            t0 = time.monotonic()
            result = score_probe(model, self.tokenizer, self.probe, ev.probe_max_new_tokens, ev.batch_size, progress)
            seconds = time.monotonic() - t0
            if self.throughput is not None:
                self.throughput.exclude(seconds)
        return {**result, "seconds": round(seconds, 3)}

    def ensure_baseline(self, model: Any, global_step: int) -> dict[str, Any]:
        """The stored baseline of this probe file, or the base's score now (the adapter off), stored.

        A baseline scored with another ``eval.probe_max_new_tokens`` (none recorded: 24, the bound before
        2026-12-07) is scored again while the base is still the one it was scored on: a longer bound can
        only let more answers in, and retention compares like with like. After a consolidation the base
        is another model: the original's baseline is kept (retention is against the original base)."""
        stored = st.read_json(self.baseline_path)
        bound = self.cfg.eval.probe_max_new_tokens
        if stored and stored.get("sha256") == self.probe.sha256 and isinstance(stored.get("score"), (int, float)):
            scored_with = stored.get("max_new_tokens", LEGACY_PROBE_BOUND)
            if scored_with == bound or stored.get("base_model") != self.base_model:
                return stored
            log.info("probe baseline: scored with answers of at most %s tokens, now %d: scored again", scored_with,
                     bound)
        if hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                result = self._score(model, "probe baseline")
        else:
            result = self._score(model, "probe baseline")
        baseline = {"schema_version": st.SCHEMA_VERSION, "probe_file": str(self.probe.path),
                    "sha256": self.probe.sha256, "base_model": self.base_model, "global_step": global_step,
                    "max_new_tokens": bound, **result, "created_at": now_iso()}
        st.atomic_write_json(self.baseline_path, baseline)
        log.info("probe baseline: %d/%d of %s answered right by the base", result["correct"], result["total"],
                 self.probe.path.name)
        return baseline

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, **kw: Any):
        self.model = model
        self.baseline = self.ensure_baseline(model, state.global_step)
        self.reporter.update(retention=retention_status(list(st.iter_jsonl(self.history)),
                                                        self.cfg.eval.retention_warn))
        self._maybe_probe(state.global_step)  # after EvalCallback's evaluation at the start, if it made one

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: Any = None, **kw: Any):
        self.model = model or self.model
        try:
            self._maybe_probe(state.global_step)
        except Stopped as e:  # RunCallback, next, saves the steps trained and ends the run
            log.warning("%s: not recorded", e)

    def _maybe_probe(self, global_step: int) -> None:
        n = self.tracker.evaluations
        if n == self.seen_evaluations:
            return
        self.seen_evaluations = n
        if (n - 1) % self.cfg.eval.probe_every == 0:
            self.probe_now(global_step)

    def probe_now(self, global_step: int) -> dict[str, Any]:
        assert self.baseline is not None
        result = self._score(self.model)
        ratio = retention(result["score"], self.baseline["score"])
        record = {"global_step": global_step, "run_id": self.run_id, **result,
                  "baseline": self.baseline["score"], "retention": ratio}
        st.append_jsonl(self.history, {"time": now_iso(), **record})
        self.probes, self.last = self.probes + 1, record
        status = retention_status(list(st.iter_jsonl(self.history)), self.cfg.eval.retention_warn)
        self.reporter.update(retention=status)
        self.reporter.write()
        log.info("probe at step %d: %d/%d right, retention %s%s", global_step, result["correct"], result["total"],
                 ratio, " (forgetting)" if status and status["forgetting"] else "")
        return record


def probe_callback(cfg: Config, reporter: StatusReporter, tokenizer: PreTrainedTokenizerBase, tracker: AccuracyTracker,
                   base_model: str,
                   run_id: str, throughput: Throughput | None = None, stop: Any = None) -> ProbeCallback | None:
    """The run's ProbeCallback; None when ``eval.probe_file`` is off or unusable (logged)."""
    from ultimate_trainer.trainer.probe.questions import load_probe

    probe = load_probe(cfg)
    if probe is None:
        return None
    return ProbeCallback(cfg, reporter, tokenizer, probe, tracker, base_model, run_id, throughput, stop)
