"""Side-by-side evaluation of models on one evaluation set, cached on disk per (model, set).

Evaluation sets:

- ``heldout``: the held-out examples training recorded in ``status/history/examples.jsonl`` (each
  asked again as training asked it: the configured system prompt, then its last user turn);
- ``eval_file``: the configured ``data.eval_file``;
- an uploaded JSONL in any accepted format (docs/DATA.md). A bad line is skipped and listed as
  ``file:line: reason``; it never stops the evaluation.

Answers are greedy and scored with ``eval.matcher``, exactly as during training. Each example is
grouped by file (``source`` without the line) and by skill (``metadata.skill``, else the file).
Results live in ``<paths.work>/workbench/evals/<model fingerprint>-<set id>.json`` (written
atomically; training never reads or writes there), so the same comparison is instant the second time.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ultimate_trainer.core import status
from ultimate_trainer.core.config import Config
from ultimate_trainer.data.formats import BadLine, parse_line
from ultimate_trainer.model.scoring import score
from ultimate_trainer.workbench.models import ModelPool, resolve

log = logging.getLogger(__name__)

MAX_ITEMS = 500        # examples per evaluation set: a bound on how long one comparison can take
MAX_BAD_SHOWN = 20


@dataclass
class EvalSet:
    name: str
    items: list[dict[str, Any]]  # messages, expected, source, skill
    bad: list[str] = field(default_factory=list)

    @property
    def set_id(self) -> str:
        keyed = [[i["messages"], i["expected"]] for i in self.items]
        return hashlib.sha256(json.dumps(keyed, ensure_ascii=False).encode()).hexdigest()[:16]


def _file_of(source: str) -> str:
    return source.rsplit(":", 1)[0] if ":" in source else source or "?"


def heldout_set(cfg: Config, status_dir: Path) -> EvalSet:
    """The distinct held-out examples that training scored (newest wording of each prompt)."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in status.iter_jsonl(status_dir / status.EXAMPLES_HISTORY):
        prompt, expected = rec.get("prompt"), rec.get("expected")
        if not isinstance(prompt, str) or not isinstance(expected, str):
            continue
        source = str(rec.get("source") or "?")
        messages = ([{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else [])
        messages.append({"role": "user", "content": prompt})
        seen[(source, prompt)] = {"messages": messages, "expected": expected, "source": source,
                                  "skill": rec.get("skill") or None}
    return EvalSet("held-out examples recorded by training", list(seen.values())[:MAX_ITEMS])


def read_set(path: Path, cfg: Config, name: str | None = None) -> EvalSet:
    """An evaluation set from a JSONL file in any accepted format; bad lines listed, never fatal."""
    shown = name or path.name
    out = EvalSet(shown, [])
    try:
        f = open(path, "rb")
    except OSError as e:
        out.bad.append(f"{shown}: cannot read: {e.strerror or e}")
        return out
    with f:
        for lineno, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\r\n")
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            try:
                ex = parse_line(raw, cfg.data.system_prompt, cfg.data.max_line_bytes)
                if ex.is_text:
                    raise BadLine("plain text has no answer to compare against")
                out.items.append({"messages": ex.prompt_messages, "expected": ex.expected,
                                  "source": f"{shown}:{lineno}", "skill": ex.skill})
            except BadLine as e:
                out.bad.append(f"{shown}:{lineno}: {e}")
            if len(out.items) >= MAX_ITEMS:
                out.bad.append(f"{shown}: only the first {MAX_ITEMS} examples are used")
                break
    return out


def eval_file_set(cfg: Config) -> EvalSet:
    if not cfg.data.eval_file:
        return EvalSet("data.eval_file", [], ["data.eval_file is not set in the config"])
    path = Path(cfg.data.eval_file)
    return read_set(path if path.is_absolute() else cfg.path("root") / path, cfg)


def cache_dir(cfg: Config) -> Path:
    return cfg.path("work") / "workbench" / "evals"


def evaluate_model(cfg: Config, pool: ModelPool, key: str, evalset: EvalSet) -> dict[str, Any]:
    """One model's scored answers on ``evalset``: from the cache, or generated and then cached."""
    spec = resolve(cfg, key)
    ev = cfg.eval
    cache = cache_dir(cfg) / f"{spec.fingerprint}-{evalset.set_id}-{ev.matcher}-{ev.max_new_tokens}.json"
    cached = status.read_json(cache)
    if cached is not None and len(cached.get("answers", [])) == len(evalset.items):
        return {**cached, "cached": True}
    loaded, answers = pool.answers(key, [i["messages"] for i in evalset.items], ev.max_new_tokens, ev.batch_size)
    result = {"model": spec.key, "label": spec.label, "set": evalset.name, "matcher": ev.matcher,
              "device": loaded.where, "answers": answers,
              "correct": [score(ev.matcher, a, i["expected"]) for a, i in zip(answers, evalset.items)]}
    status.atomic_write_json(cache, result)
    return {**result, "cached": False}


def _pct(correct: list[bool]) -> float | None:
    return round(100.0 * sum(correct) / len(correct), 1) if correct else None


def compare(evalset: EvalSet, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy per model, per file and per skill, and the answers that changed between consecutive models."""
    items = evalset.items
    overall = [{"model": r["model"], "correct": sum(r["correct"]), "total": len(items),
                "accuracy": _pct(r["correct"]), "device": r.get("device"), "cached": r.get("cached")}
               for r in results]
    groups: dict[str, dict[str, list[int]]] = {"file": {}, "skill": {}}
    for n, item in enumerate(items):
        f = _file_of(item["source"])
        groups["file"].setdefault(f, []).append(n)
        groups["skill"].setdefault(item.get("skill") or f, []).append(n)
    breakdown = []
    for kind, by in groups.items():
        for name, idx in sorted(by.items()):
            row: dict[str, Any] = {"by": kind, "group": name, "examples": len(idx)}
            for r in results:
                row[r["model"]] = _pct([r["correct"][i] for i in idx])
            breakdown.append(row)
    changed = []
    for before, after in zip(results, results[1:]):
        for n, item in enumerate(items):
            a, b = before["correct"][n], after["correct"][n]
            if a != b:
                changed.append({"change": "fixed" if b else "broken", "from": before["model"], "to": after["model"],
                                "source": item["source"], "skill": item.get("skill") or _file_of(item["source"]),
                                "prompt": item["messages"][-1]["content"], "expected": item["expected"],
                                "before": before["answers"][n], "after": after["answers"][n]})
    return {"overall": overall, "breakdown": breakdown, "changed": changed}
