"""The training history read from ``status/history/``: accuracy over steps per skill and per file,
loss, validation loss and grad norm, and a filtered view of every scored answer.

Read on request (a button, a tab), one line at a time; a damaged line is skipped by ``iter_jsonl``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ultimate_trainer.core import status

MAX_ROWS = 500  # answers shown at once (newest first)


def _file_of(source: Any) -> str:
    s = str(source or "?")
    return s.rsplit(":", 1)[0] if ":" in s else s


def accuracy_by_group(status_dir: Path) -> list[dict[str, Any]]:
    """Rows ``{step, by (skill|file), group, accuracy, answers}``: each evaluation's accuracy per group."""
    tally: dict[tuple[int, str, str], list[int]] = {}
    for rec in status.iter_jsonl(Path(status_dir) / status.EXAMPLES_HISTORY):
        step, ok = rec.get("global_step"), rec.get("correct")
        if not isinstance(step, int) or not isinstance(ok, bool):
            continue
        f = _file_of(rec.get("source"))
        for by, group in (("file", f), ("skill", rec.get("skill") or f)):
            t = tally.setdefault((step, by, str(group)), [0, 0])
            t[0] += ok
            t[1] += 1
    return [{"step": s, "by": by, "group": g, "accuracy": round(100.0 * c / n, 1), "answers": n}
            for (s, by, g), (c, n) in sorted(tally.items())]


def series(status_dir: Path) -> list[dict[str, Any]]:
    """Rows ``{step, metric, value}`` for loss, grad_norm (steps.jsonl) and val_loss, accuracy (evals.jsonl)."""
    sd = Path(status_dir)
    last: dict[tuple[int, str], float] = {}  # a step logged twice (after a crash): the newest line wins
    for rec in status.iter_jsonl(sd / status.STEPS_HISTORY):
        for metric in ("loss", "grad_norm"):
            if isinstance(rec.get("global_step"), int) and isinstance(rec.get(metric), (int, float)):
                last[(rec["global_step"], metric)] = float(rec[metric])
    for rec in status.iter_jsonl(sd / status.EVALS_HISTORY):
        for metric in ("val_loss", "accuracy"):
            if isinstance(rec.get("global_step"), int) and isinstance(rec.get(metric), (int, float)):
                last[(rec["global_step"], metric)] = float(rec[metric])
    return [{"step": s, "metric": m, "value": v} for (s, m), v in sorted(last.items())]


def answers(status_dir: Path, verdict: str = "all", file: str = "", skill: str = "",
            step_min: int | None = None, step_max: int | None = None) -> list[dict[str, Any]]:
    """Scored answers, newest first, filtered by right/wrong, file, skill and step range."""
    out = []
    for rec in status.iter_jsonl(Path(status_dir) / status.EXAMPLES_HISTORY):
        step, ok = rec.get("global_step"), rec.get("correct")
        if not isinstance(step, int) or not isinstance(ok, bool):
            continue
        f = _file_of(rec.get("source"))
        sk = rec.get("skill") or f
        if (verdict == "right" and not ok) or (verdict == "wrong" and ok) or (file and f != file) \
                or (skill and sk != skill) or (step_min is not None and step < step_min) \
                or (step_max is not None and step > step_max):
            continue
        out.append({"step": step, "correct": "right" if ok else "wrong", "file": f, "skill": sk,
                    "prompt": str(rec.get("prompt", "")), "expected": str(rec.get("expected", "")),
                    "generated": str(rec.get("generated", "")), "source": str(rec.get("source", ""))})
    out.reverse()
    return out[:MAX_ROWS]


def groups(status_dir: Path) -> tuple[list[str], list[str]]:
    """The file names and skills that occur in the scored answers (for the filters)."""
    files, skills = set(), set()
    for rec in status.iter_jsonl(Path(status_dir) / status.EXAMPLES_HISTORY):
        f = _file_of(rec.get("source"))
        files.add(f)
        skills.add(str(rec.get("skill") or f))
    return sorted(files), sorted(skills)
