"""The consolidation gate: a merged candidate replaces the base only when it kept what the base knew.

Before ``consolidate`` adopts a merge, the current base (the adapter switched off) and the candidate
(the adapter merged) answer the same questions, greedily:

- held-out prompts: up to ``consolidation.max_prompts`` evaluable held-out examples of
  ``data.eval_file`` and of the trained files (``queue/done/``, newest first, named by the daemon),
  taken in turn, held out by the held-out rule (data/heldout.py), so never trained on; scored with
  ``eval.matcher``;
- the base-knowledge probe (``eval.probe_file``); retention = probe score / the baseline of
  ``history/probe_baseline.json`` (the original base's score; the current base's when there is none).

The candidate is refused when its held-out accuracy is more than ``consolidation.max_accuracy_drop``
points below the base's, or its retention more than ``consolidation.max_retention_drop`` below the
base's, and on that measure it answered more than ``consolidation.noise_answers`` fewer questions
right than the base. That floor is there because the sets are small: with the built-in probe
(36 questions the base answers), one answer is 0.028 of retention and two are more than the 0.05
margin, and the same base answers one question more or less between precisions and kernels
(docs/PERFORMANCE.md).
A measure with nothing to ask (no held-out prompt, no probe) does not block.

Against the current base alone, every adopted merge may lose up to the margin plus one noisy
answer, and a month of merges compounds it. So the probe also has floors that do not move down:
the candidate's retention since the original base (the baseline) and against the best retention
of any adopted consolidation may not fall more than ``consolidation.max_total_retention_drop``
below 1 and below that best (with the same noise floor, counted against the original's and the
best one's right answers). The manifest records ``retention_since_original``, which the daemon's
status and ``/metrics`` show.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ultimate_trainer.core import status as st
from ultimate_trainer.core.config import Config
from ultimate_trainer.trainer.probe.questions import Probe, load_probe
from ultimate_trainer.data.replay import heldout_examples
from ultimate_trainer.trainer.probe.scoring import retention, score_examples, score_probe

log = logging.getLogger(__name__)


@dataclass
class GateInputs:
    probe: Probe | None
    examples: list[Any]  # formats.Example
    baseline: float | None  # the original base's probe score, when recorded
    sources: list[str] = field(default_factory=list)
    baseline_correct: int | None = None  # the original base's right answers on the probe
    best: dict[str, Any] | None = None  # the adopted consolidation with the best retention: retention, correct, path


def gate_inputs(cfg: Config, trained: list[Path]) -> GateInputs:
    """What the gate asks: ``trained`` are the files trained so far, newest first."""
    files: list[Path] = []
    eval_file = None
    if cfg.data.eval_file:
        p = Path(cfg.data.eval_file)
        eval_file = p if p.is_absolute() else cfg.path("root") / p
        files.append(eval_file)
    files += trained
    probe = load_probe(cfg)
    stored = st.read_json(cfg.path("status") / st.PROBE_BASELINE) or {}
    baseline = stored.get("score") if probe and stored.get("sha256") == probe.sha256 else None
    examples = heldout_examples(files, cfg, cfg.consolidation.max_prompts, eval_file)
    correct = stored.get("correct") if baseline is not None else None
    return GateInputs(probe, examples, baseline if isinstance(baseline, (int, float)) else None,
                      sorted({e.source.rsplit(":", 1)[0] for e in examples}),
                      correct if isinstance(correct, int) else None, best_adopted(cfg, probe))


def best_adopted(cfg: Config, probe: Probe | None) -> dict[str, Any] | None:
    """The adopted consolidation whose gate measured the best retention with this probe file, if any."""
    from ultimate_trainer.core.checkpoints import list_consolidations

    best = None
    for c in list_consolidations(cfg.path("models")):
        g = c.manifest.get("gate") or {}
        cand = g.get("candidate") or {}
        ret, probe_rec = cand.get("retention"), cand.get("probe") or {}
        if not isinstance(ret, (int, float)) or (probe and g.get("probe_sha256") not in (None, probe.sha256)):
            continue
        if best is None or ret > best["retention"]:
            best = {"retention": float(ret), "correct": probe_rec.get("correct"), "path": str(c.path)}
    return best


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
    right_c = (candidate.get("probe") or {}).get("correct")
    floors = []  # (what, its retention, its right answers): floors that never move down
    if inputs.baseline:
        floors.append(("the original base", 1.0, inputs.baseline_correct))
    if inputs.best and inputs.baseline:  # its retention is against the original's score too
        floors.append((f"the best adopted base ({Path(inputs.best['path']).name})", inputs.best["retention"],
                       inputs.best.get("correct")))
    for what, ret_f, right_f in floors:
        lost = right_f - right_c if isinstance(right_f, int) and isinstance(right_c, int) else float("inf")
        if ret_c is not None and ret_f - ret_c > c.max_total_retention_drop and lost > c.noise_answers:
            reasons.append(f"retention {ret_c:.2f} is more than consolidation.max_total_retention_drop="
                           f"{c.max_total_retention_drop} below {what}'s {ret_f:.2f}")
    return {"adopted": not reasons, "reason": "; ".join(reasons) or None,
            "base": {"accuracy": acc_b, "retention": ret_b, **base},
            "candidate": {"accuracy": acc_c, "retention": ret_c, **candidate},
            "probe_baseline": baseline, "retention_since_original": ret_c if inputs.baseline else None,
            "best_adopted": inputs.best, "probe_sha256": inputs.probe.sha256 if inputs.probe else None,
            "max_total_retention_drop": c.max_total_retention_drop, "heldout_prompts": len(inputs.examples), "heldout_files": inputs.sources,
            "max_accuracy_drop": c.max_accuracy_drop, "max_retention_drop": c.max_retention_drop,
            "noise_answers": c.noise_answers}
