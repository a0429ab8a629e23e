"""History export for the page's Export button: every logged step joined with accuracy and memory.

One CSV row per logged optimizer step, carrying the newest evaluation at or before that step and
the newest memory sample at or before its time. Both exports stream, so a long history is never
held in memory as one document.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
from pathlib import Path
from typing import Any, Iterator

from ultimate_trainer.web import sampler as stats
from ultimate_trainer.core import status
from ultimate_trainer.core.times import now_iso
from ultimate_trainer.core.times import epoch_seconds

CSV_COLUMNS = (
    "time", "global_step", "run_id", "loss", "skipped", "learning_rate", "grad_norm", "tokens_per_second", "epoch",
    "eval_step", "eval_accuracy", "accuracy_overall", "accuracy_last_20", "accuracy_last_50", "accuracy_trend",
    "val_loss", "ram_percent", "ram_used_gb", "training_process_gb", "gpu_memory_used_gb", "oom_risk",
)


class _Joiner:
    """Finds the newest eval (by step) and memory sample (by time) at or before a step."""

    def __init__(self, status_dir: Path):
        evals = sorted((e for e in status.iter_jsonl(status_dir / status.EVALS_HISTORY)
                        if isinstance(e.get("global_step"), int)), key=lambda e: e["global_step"])
        self.evals, self.eval_steps = evals, [e["global_step"] for e in evals]
        mem = [(epoch_seconds(m.get("time")), m) for m in status.iter_jsonl(status_dir / stats.MEMORY_HISTORY)]
        mem = sorted((t, m) for t, m in mem if t is not None) if mem else []
        self.mem_times, self.mem = [t for t, _ in mem], [m for _, m in mem]

    def eval_at(self, step: Any) -> dict[str, Any]:
        if not isinstance(step, int):
            return {}
        i = bisect.bisect_right(self.eval_steps, step)
        return self.evals[i - 1] if i else {}

    def memory_at(self, iso: Any) -> dict[str, Any]:
        t = epoch_seconds(iso)
        if t is None:
            return {}
        i = bisect.bisect_right(self.mem_times, t)
        return self.mem[i - 1] if i else {}


def _row(step: dict[str, Any], j: _Joiner) -> dict[str, Any]:
    ev, mem = j.eval_at(step.get("global_step")), j.memory_at(step.get("time"))
    return {
        **{k: step.get(k) for k in ("time", "global_step", "run_id", "loss", "learning_rate", "grad_norm",
                                    "tokens_per_second", "epoch")},
        "skipped": bool(step.get("skipped")),  # the guard skipped the step's update (its loss may be null)
        "eval_step": ev.get("global_step"), "eval_accuracy": ev.get("accuracy"),
        "accuracy_overall": ev.get("overall"), "accuracy_last_20": ev.get("last_20"),
        "accuracy_last_50": ev.get("last_50"), "accuracy_trend": ev.get("trend"), "val_loss": ev.get("val_loss"),
        "ram_percent": mem.get("percent"), "ram_used_gb": mem.get("used_gb"),
        "training_process_gb": mem.get("training_process_gb"), "gpu_memory_used_gb": mem.get("gpu_memory_used_gb"),
        "oom_risk": mem.get("oom_risk"),
    }


def _cell(v: Any) -> Any:
    # A leading =, +, - or @ makes spreadsheets run the cell as a formula: quote text that starts so.
    if isinstance(v, str) and v[:1] in ("=", "+", "-", "@"):
        return "'" + v
    return "" if v is None else v


def iter_csv(status_dir: str | Path) -> Iterator[str]:
    sd = Path(status_dir)
    j = _Joiner(sd)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for i, step in enumerate(status.iter_jsonl(sd / status.STEPS_HISTORY)):
        row = _row(step, j)
        w.writerow([_cell(row[c]) for c in CSV_COLUMNS])
        if i % 500 == 0:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue()


def iter_json(status_dir: str | Path, current: dict[str, Any]) -> Iterator[str]:
    """``{"exported_at", "current", "steps": [rows as in the CSV], "evals": [...], "memory": [...]}``."""
    sd = Path(status_dir)
    j = _Joiner(sd)
    yield '{"schema_version": 1, "exported_at": ' + json.dumps(now_iso())
    yield ', "current": ' + status.dumps(current)
    yield ', "steps": ['
    for i, step in enumerate(status.iter_jsonl(sd / status.STEPS_HISTORY)):
        yield ("," if i else "") + status.dumps(_row(step, j))
    yield '], "evals": ' + status.dumps(j.evals)
    yield ', "memory": ' + status.dumps(j.mem) + "}\n"
