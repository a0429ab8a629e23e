"""The consolidation gate: a merged candidate replaces the base only when it kept what the base knew.

Before ``consolidate`` adopts a merge, the current base (the adapter switched off) and the candidate
(the adapter merged) answer the same questions, greedily:

- held-out prompts: up to ``consolidation.max_prompts`` evaluable held-out examples of
  ``data.eval_file`` and of the trained files in ``queue/done/`` (newest first, in turn), held out
  by ``prepare``'s rule, so never trained on; scored with ``eval.matcher``;
- the base-knowledge probe (``eval.probe_file``); retention = probe score / the baseline of
  ``history/probe_baseline.json`` (the original base's score; the current base's when there is none).

The candidate is refused when its held-out accuracy is more than ``consolidation.max_accuracy_drop``
points below the base's, or its retention more than ``consolidation.max_retention_drop`` below the
base's, and on that measure it answered more than ``consolidation.noise_answers`` fewer questions
right than the base. That floor is there because the sets are small: with the built-in probe
(24 questions, 18 of them right), one answer is 0.056 of retention, more than the 0.05 margin, and
the same base answers one question more or less between precisions and kernels (docs/PERFORMANCE.md).
A measure with nothing to ask (no held-out prompt, no probe) does not block.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ultimate_trainer.core import status as st
from ultimate_trainer.core.config import Config
from ultimate_trainer.data.probe import Probe, load_probe
from ultimate_trainer.data.replay import done_files, heldout_examples
from ultimate_trainer.model.probe import retention, score_examples, score_probe

log = logging.getLogger(__name__)


@dataclass
class GateInputs:
    probe: Probe | None
    examples: list[Any]  # formats.Example
    baseline: float | None  # the original base's probe score, when recorded
    sources: list[str] = field(default_factory=list)


def gate_inputs(cfg: Config) -> GateInputs:
    files: list[Path] = []
    if cfg.data.eval_file:
        p = Path(cfg.data.eval_file)
        files.append(p if p.is_absolute() else cfg.path("root") / p)
    files += done_files(cfg.path("queue") / "done")
    probe = load_probe(cfg)
    stored = st.read_json(cfg.path("status") / st.PROBE_BASELINE) or {}
    baseline = stored.get("score") if probe and stored.get("sha256") == probe.sha256 else None
    examples = heldout_examples(files, cfg, cfg.consolidation.max_prompts)
    return GateInputs(probe, examples, baseline if isinstance(baseline, (int, float)) else None,
                      sorted({e.source.rsplit(":", 1)[0] for e in examples}))


def score_model(model: Any, tokenizer: Any, cfg: Config, inputs: GateInputs, progress: Any = None) -> dict[str, Any]:
    """``heldout`` (accuracy percent) and ``probe`` (score 0-1) of ``model``, each None when not asked.

    ``progress`` (core/progress.py): counts the prompts of both and may stop them (``Stopped``)."""
    ev = cfg.eval
    out: dict[str, Any] = {"heldout": None, "probe": None}
    if inputs.examples:
        out["heldout"] = score_examples(model, tokenizer, inputs.examples, ev.matcher, ev.max_new_tokens,
                                        ev.batch_size, progress)
    if inputs.probe:
        out["probe"] = score_probe(model, tokenizer, inputs.probe, ev.probe_max_new_tokens, ev.batch_size, progress)
    return out


def _answers_lost(base: dict[str, Any], candidate: dict[str, Any], measure: str) -> float:
    """How many fewer answers the candidate got right on ``measure``; unbounded when a count is missing."""
    right_b = (base.get(measure) or {}).get("correct")
    right_c = (candidate.get(measure) or {}).get("correct")
    return right_b - right_c if isinstance(right_b, int) and isinstance(right_c, int) else float("inf")


def decide(cfg: Config, inputs: GateInputs, base: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    """The gate's record for the manifest: both sets of figures, ``adopted`` and, when refused, ``reason``."""
    c = cfg.consolidation
    reasons = []
    acc_b = (base.get("heldout") or {}).get("accuracy")
    acc_c = (candidate.get("heldout") or {}).get("accuracy")
    if acc_b is not None and acc_c is not None and acc_b - acc_c > c.max_accuracy_drop \
            and _answers_lost(base, candidate, "heldout") > c.noise_answers:
        reasons.append(f"held-out accuracy fell from {acc_b}% to {acc_c}% (more than "
                       f"consolidation.max_accuracy_drop={c.max_accuracy_drop} points)")
    score_b = (base.get("probe") or {}).get("score")
    score_c = (candidate.get("probe") or {}).get("score")
    baseline = inputs.baseline if inputs.baseline else score_b
    ret_b, ret_c = retention(score_b, baseline), retention(score_c, baseline)
    if ret_b is not None and ret_c is not None and ret_b - ret_c > c.max_retention_drop \
            and _answers_lost(base, candidate, "probe") > c.noise_answers:
        reasons.append(f"retention fell from {ret_b:.2f} to {ret_c:.2f} (more than "
                       f"consolidation.max_retention_drop={c.max_retention_drop})")
    return {"adopted": not reasons, "reason": "; ".join(reasons) or None,
            "base": {"accuracy": acc_b, "retention": ret_b, **base},
            "candidate": {"accuracy": acc_c, "retention": ret_c, **candidate},
            "probe_baseline": baseline, "heldout_prompts": len(inputs.examples), "heldout_files": inputs.sources,
            "max_accuracy_drop": c.max_accuracy_drop, "max_retention_drop": c.max_retention_drop,
            "noise_answers": c.noise_answers}
