"""Training metrics for Prometheus, read from the status files at scrape time (no torch, no trainer code).

A custom collector for ``prometheus_client``: each scrape of ``/metrics`` on the stats API reads
``training_status.json`` and ``daemon_status.json`` once and turns their figures into gauges, so a
user's Prometheus/Grafana can alert on a stalled, diverging or forgetting trainer. A figure that is
not known yet (no step logged, no evaluation, no daemon) is simply absent from the output. The
metric names and meanings are listed in docs/MONITORING.md.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ultimate_trainer.core import status as st
from ultimate_trainer.core.records import TrainingStatus
from ultimate_trainer.core.times import epoch_seconds

TRAINING_STATES = st.TRAINING_STATES
ACCURACY_WINDOWS = ("overall", "last_20", "last_50")
CONTROLLER_KINDS = ("step_down", "step_back", "hold")  # trainer/control_rule.py's (web imports no trainer code)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class TrainingCollector:
    """Gauges over ``status_dir``'s training and daemon status files, built at each scrape."""

    def __init__(self, status_dir: Path, clock: Callable[[], float] = time.time):
        self.status_dir, self.clock = Path(status_dir), clock

    def collect(self) -> Iterator[Metric]:
        ts = TrainingStatus.read(self.status_dir / st.TRAINING_STATUS)  # None: no trainer has written one yet
        ds = st.read_json(self.status_dir / st.DAEMON_STATUS) or {}
        now = self.clock()

        def gauge(name: str, doc: str, value: Any) -> Iterator[Metric]:
            v = _num(value)
            if v is not None:
                yield GaugeMetricFamily(name, doc, value=v)

        if ts is not None:
            yield from self._training(ts, now, gauge)

        cons = ds.get("consolidation") if isinstance(ds.get("consolidation"), dict) else {}
        kept = cons.get("retention_since_original") if isinstance(cons.get("retention_since_original"), dict) else {}
        yield from gauge("ut_consolidation_retention_since_original_ratio", "Probe retention of the adopted base "
                         "against the original base, as the consolidation gate measured it (1 = nothing lost).",
                         kept.get("ratio"))
        yield from gauge("ut_consolidation_best_retention_ratio", "Best probe retention of any adopted base "
                         "against the original base (a floor of the gate).", kept.get("best"))

        if ds:
            queue = GaugeMetricFamily("ut_queue_files", "Files in the daemon's queue, by state.", labels=["state"])
            items = ds.get("queue") if isinstance(ds.get("queue"), list) else []
            for s in ("waiting", "training"):
                queue.add_metric([s], float(sum(1 for q in items if isinstance(q, dict) and q.get("state") == s)))
            failed = _num(ds.get("failed_files"))
            if failed is None and isinstance(ds.get("failed"), list):
                failed = float(len(ds["failed"]))
            if failed is not None:
                queue.add_metric(["failed"], failed)
            if _num(ds.get("done_files")) is not None:
                queue.add_metric(["done"], _num(ds.get("done_files")))
            yield queue

    def _training(self, ts: TrainingStatus, now: float,
                  gauge: Callable[[str, str, Any], Iterator[Metric]]) -> Iterator[Metric]:
        state = GaugeMetricFamily("ut_training_state", "1 for the trainer's current state.", labels=["state"])
        for s in TRAINING_STATES:
            state.add_metric([s], 1.0 if ts.state == s else 0.0)
        yield state
        yield from gauge("ut_training_status_age_seconds", "Seconds since training_status.json was written.",
                         _age(ts.updated_at, now))
        yield from gauge("ut_training_global_step", "Optimizer steps since the first run.", ts.global_step)
        yield from gauge("ut_training_run_step", "Optimizer steps done in the current run.", ts.run_step)
        yield from gauge("ut_training_run_total_steps", "Optimizer steps of the current run.", ts.run_total_steps)
        yield from gauge("ut_training_loss", "Training loss of the last logged step.", ts.loss)
        yield from gauge("ut_training_val_loss", "Held-out loss at the last evaluation.", ts.val_loss)
        yield from gauge("ut_training_learning_rate", "Learning rate of the last step.", ts.learning_rate)
        yield from gauge("ut_training_grad_norm", "Gradient norm before clipping, last step.", ts.grad_norm)
        yield from gauge("ut_training_tokens_per_second", "Trained tokens per second.", ts.tokens_per_second)

        fam = GaugeMetricFamily("ut_training_accuracy_percent", "Held-out accuracy, percent.", labels=["window"])
        for w in ACCURACY_WINDOWS:
            if _num(ts.accuracy.get(w)) is not None:
                fam.add_metric([w], _num(ts.accuracy.get(w)))
        if fam.samples:
            yield fam
        yield from gauge("ut_training_retention_ratio", "Base-knowledge probe score / its baseline (1 = nothing "
                         "forgotten).", (ts.retention or {}).get("ratio"))

        ctl = ts.controller if isinstance(ts.controller, dict) else {}
        if ctl:
            yield from gauge("ut_controller_enabled", "1 when the retention-aware controller is on.",
                             float(bool(ctl.get("enabled"))))
            yield from gauge("ut_controller_lr_scale", "The retention-aware controller's scale on training.learning_rate "
                             "(1 = the configured rate).", ctl.get("lr_scale"))
            yield from gauge("ut_controller_rehearsal_fraction", "Rehearsal share the current run drew at its start.",
                             ctl.get("rehearsal_fraction"))
            yield from gauge("ut_controller_next_rehearsal_fraction", "The controller's rehearsal share now: the "
                             "current run's rehearsal lines are weighted to it, the next run draws it.",
                             ctl.get("next_rehearsal_fraction"))
            yield from gauge("ut_controller_rehearsal_weight", "A rehearsal token's loss weight in the current run "
                             "(1 = unweighted).", ctl.get("rehearsal_weight"))
            decisions = ctl.get("decisions") if isinstance(ctl.get("decisions"), dict) else {}
            fam = CounterMetricFamily("ut_controller_decisions", "The retention-aware controller's decisions, all "
                                      "runs, by kind (step_down, step_back, hold).", labels=["kind"])
            for kind in sorted(set(CONTROLLER_KINDS) | set(decisions)):
                if _num(decisions.get(kind, 0)) is not None:
                    fam.add_metric([str(kind)], _num(decisions.get(kind, 0)))
            yield fam

        stab = ts.stability
        yield from gauge("ut_training_loss_slope", "Least-squares slope of the step loss per step.",
                         stab.get("loss_slope"))
        yield from gauge("ut_training_stability_score", "Stability score, 0-100 (docs/TRAINING.md).", stab.get("score"))
        if _num(stab.get("anomalies")) is not None:
            yield CounterMetricFamily("ut_training_anomalies", "Steps the divergence guard skipped, all runs.",
                                      value=_num(stab.get("anomalies")))

        last = ts.checkpoints[-1] if ts.checkpoints and isinstance(ts.checkpoints[-1], dict) else {}
        yield from gauge("ut_checkpoint_last_step", "Global step of the newest complete checkpoint.",
                         last.get("global_step"))
        yield from gauge("ut_checkpoint_last_age_seconds", "Seconds since the newest complete checkpoint was written.",
                         _age(last.get("created_at"), now))



def _age(iso_time: Any, now: float) -> float | None:
    then = epoch_seconds(iso_time)
    return None if then is None else max(0.0, now - then)
