"""The trainer's side of the status contract: the single writer of training_status.json and history/.

The file's fields are ``TrainingStatus``'s (core/records.py), documented there and in docs/STATUS.md.

A heartbeat thread rewrites ``training_status.json`` every ``status.interval_seconds`` so that the
monitors see a live ``updated_at`` and RSS even during a long step; every state change is written
at once. History lines are appended as they happen (docs/STATUS.md).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from ultimate_trainer.core import status as st
from ultimate_trainer.core.progress import Progress
from ultimate_trainer.core.times import now_iso
from ultimate_trainer.core.checkpoints import list_complete
from ultimate_trainer.core.records import TrainingStatus

TEXT_LIMIT = 2000
CHECKPOINTS_LISTED = 100  # the file is rewritten every few seconds: months of checkpoints stay on disk, not in it
EXAMPLE_FIELDS = ("prompt", "expected", "generated", "correct", "source")
FIELDS = frozenset(TrainingStatus.names())


def _clip(text: Any) -> Any:
    return text[:TEXT_LIMIT] if isinstance(text, str) else text


def _rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil missing or the process table unreadable: the figure is optional
        return 0


class StatusReporter:
    """Holds the live fields of ``training_status.json`` and writes them; ``live=False`` (a dry run, a rank other than 0) writes nothing.

    Callers change fields with ``update``/``set_state``, read one with ``get``, and wrap a pause
    of training in ``with reporter.phase("evaluating"):`` (or ``begin_phase``/``end_phase`` when it
    spans two callbacks, like a save), which restores the state it interrupted.
    """

    def __init__(self, status_dir: Path, checkpoints_dir: Path, interval: float, recent_limit: int,
                 live: bool = True):
        self.dir = Path(status_dir)
        self.live = live
        self.examples_history = self.dir / st.EXAMPLES_HISTORY
        self.evals_history = self.dir / st.EVALS_HISTORY
        self._resume_state: list[str] = []
        self.checkpoints_dir = Path(checkpoints_dir)
        self.interval = interval
        self.recent_limit = recent_limit
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.anomalies_before = st.count_lines(self.dir / st.ANOMALIES_HISTORY) if live else 0
        self._recent: list[dict[str, Any]] = [
            {"step": r.get("global_step"), **{k: r.get(k) for k in EXAMPLE_FIELDS}}
            for r in (st.tail_jsonl(self.dir / st.EXAMPLES_HISTORY, recent_limit) if live else [])
        ]
        status = TrainingStatus(schema_version=st.SCHEMA_VERSION, recent_examples=list(self._recent), pid=os.getpid(),
                                rss_bytes=_rss_bytes(), started_at=now_iso(), updated_at=now_iso())
        status.stability["anomalies"] = self.anomalies_before
        # The fields are TrainingStatus's (core/records.py): ``update`` refuses any other name.
        self.data: dict[str, Any] = status.to_json()
        if live:
            self.refresh_checkpoints()

    # ------------------------------------------------------------------ writing
    def write(self) -> None:
        if not self.live:
            return
        with self._lock:
            self.data["updated_at"] = now_iso()
            self.data["rss_bytes"] = _rss_bytes()
            snapshot = dict(self.data)
        try:
            st.atomic_write_json(self.dir / st.TRAINING_STATUS, snapshot)
        except OSError:  # a full disk must not kill training; the next write retries
            pass

    def update(self, **fields: Any) -> None:
        unknown = set(fields) - FIELDS
        if unknown:
            raise KeyError(f"not a training_status.json field (core/records.py TrainingStatus): {sorted(unknown)}")
        with self._lock:
            self.data.update(fields)

    def get(self, key: str) -> Any:
        with self._lock:
            return self.data.get(key)

    @property
    def state(self) -> str:
        return self.get("state")

    def set_state(self, state: str, **fields: Any) -> None:
        assert state in st.TRAINING_STATES, state
        self.update(state=state, **fields)
        self.write()

    def begin_phase(self, state: str) -> None:
        """Enter ``state`` (evaluating, saving) from whatever training was doing."""
        if self.state != state:
            self._resume_state.append(self.state)
            self.set_state(state)

    def end_phase(self, state: str) -> None:
        """Leave ``state`` for the state it interrupted."""
        if self.state == state:
            self.set_state(self._resume_state.pop() if self._resume_state else "training")

    @contextlib.contextmanager
    def phase(self, state: str) -> Iterator[None]:
        self.begin_phase(state)
        try:
            yield
        finally:
            self.end_phase(state)

    @contextlib.contextmanager
    def progress(self, phase: str, total: int, unit: str,
                 should_stop: Callable[[], bool] | None = None) -> Iterator[Progress]:
        """A long phase's ``Progress`` (core/progress.py), shown as ``progress`` in the status file while it lasts.

        ``should_stop``: the run's stop flag, asked by the phase (generation at every token)."""
        p = Progress(phase, total, unit, on_update=lambda snap: self.update(progress=snap), should_stop=should_stop)
        self.write()
        try:
            yield p
        finally:
            self.update(progress=None)
            self.write()

    def refresh_checkpoints(self) -> None:
        found = list_complete(self.checkpoints_dir)
        self.update(
            checkpoints=[{"name": c.name, "global_step": c.global_step, "created_at": c.marker.created_at}
                         for c in found[-CHECKPOINTS_LISTED:]],
            last_checkpoint=found[-1].name if found else None,
        )

    # ------------------------------------------------------------------ history
    def log_step(self, record: dict[str, Any]) -> None:
        if not self.live:  # a dry run, or a rank other than 0
            return
        st.append_jsonl(self.dir / st.STEPS_HISTORY, {"time": now_iso(), **record})

    def log_anomaly(self, event: dict[str, Any]) -> None:
        if not self.live:  # a dry run, or a rank other than 0: rank 0 records each anomaly once
            return
        st.append_jsonl(self.dir / st.ANOMALIES_HISTORY, {"time": now_iso(), **event})

    def log_evaluation(self, summary: dict[str, Any], examples: list[dict[str, Any]]) -> None:
        if not self.live:
            return
        now = now_iso()
        for ex in examples:
            st.append_jsonl(self.dir / st.EXAMPLES_HISTORY, {"time": now, **{k: _clip(v) for k, v in ex.items()}})
        st.append_jsonl(self.dir / st.EVALS_HISTORY, {"time": now, **summary})
        for ex in examples:
            self._recent.append({"step": ex.get("global_step"), **{k: _clip(ex.get(k)) for k in EXAMPLE_FIELDS}})
        self._recent = self._recent[-self.recent_limit:] if self.recent_limit else []
        self.update(recent_examples=list(self._recent))

    # ------------------------------------------------------------------ heartbeat
    def start(self) -> None:
        if not self.live:
            return

        def beat() -> None:
            while not self._stop.wait(self.interval):
                self.write()

        self._thread = threading.Thread(target=beat, name="status-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.write()


class Throughput:
    """Trained tokens per second over a sliding window of logged steps."""

    def __init__(self, window: int = 20):
        self.window = window
        self.points: list[tuple[float, int]] = []

    def exclude(self, seconds: float) -> None:
        """Leave a pause (an evaluation, a save) out of the rate: shift the earlier points forward."""
        self.points = [(t + seconds, n) for t, n in self.points]

    def add(self, tokens_seen: int) -> float | None:
        self.points.append((time.monotonic(), tokens_seen))
        self.points = self.points[-self.window:]
        if len(self.points) < 2:
            return None
        (t0, n0), (t1, n1) = self.points[0], self.points[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None
