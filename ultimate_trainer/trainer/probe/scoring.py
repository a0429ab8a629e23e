"""Scoring a model on the base-knowledge probe (``questions.py``) and on held-out examples.

Both are greedy, batched generation with short answers (``scoring.generate_answers``), scored with
each question's matcher. Retention is a probe score divided by the baseline's: the score of the
original base before any training (docs/TRAINING.md, "Forgetting guard").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ultimate_trainer.trainer.probe.questions import Probe
from ultimate_trainer.model.scoring import generate_answers, score

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def score_probe(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, probe: Probe, max_new_tokens: int, batch_size: int,
                progress: Any = None) -> dict[str, Any]:
    """``correct``, ``total``, ``score`` (0-1) and the ``missed`` questions (``file:line``) of one pass.

    ``progress``: as ``generate_answers`` takes it (counted and stoppable)."""
    answers = generate_answers(model, tokenizer, [q.prompt_messages for q in probe.items], max_new_tokens, batch_size,
                               progress)
    missed = [q.source for q, a in zip(probe.items, answers) if not score(q.matcher, a, q.expected)]
    total = len(probe.items)
    return {"correct": total - len(missed), "total": total, "score": round((total - len(missed)) / total, 4),
            "missed": missed}


def score_examples(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[Any], matcher: str, max_new_tokens: int,
                   batch_size: int, progress: Any = None) -> dict[str, Any]:
    """Held-out accuracy (percent) of ``examples`` (``formats.Example``) under ``matcher``, and per file.

    ``by_file`` maps each example's file (its ``source`` less the line) to ``[correct, total]``, so a
    gate that asks several tasks' files shows which one a candidate lost."""
    answers = generate_answers(model, tokenizer, [e.prompt_messages for e in examples], max_new_tokens, batch_size,
                               progress)
    by_file: dict[str, list[int]] = {}
    for e, a in zip(examples, answers):
        tally = by_file.setdefault(e.source.rsplit(":", 1)[0], [0, 0])
        tally[0] += bool(score(matcher, a, e.expected))
        tally[1] += 1
    correct = sum(c for c, _ in by_file.values())
    return {"correct": correct, "total": len(examples), "by_file": by_file,
            "accuracy": round(100.0 * correct / len(examples), 2) if examples else None}


def retention(score_now: float | None, baseline: float | None) -> float | None:
    """Probe score / baseline score; None when either is unknown or the baseline is 0."""
    if score_now is None or not baseline:
        return None
    return round(score_now / baseline, 4)
