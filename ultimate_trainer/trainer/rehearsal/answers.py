"""The model side of rehearsal (``prompts.py``): the base answers the general prompts, once per base.

The answers come from the base alone: the worker's loaded model with its adapter switched off when
it holds this base, else the base loaded for the purpose (4-bit when training is) and let go after.
Greedy, at most ``training.rehearsal_max_new_tokens`` tokens, ``eval.batch_size`` prompts at a time.
The built-in base (not a consolidation of it) takes its shipped answers instead, when they match.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from pathlib import Path
from typing import Any

from ultimate_trainer.core.config import BUILTIN_MODEL, Config
from ultimate_trainer.trainer.rehearsal.prompts import Messages, Rehearsal, cached_lines, load_prompts, shipped_answers, \
    write_rehearsal

log = logging.getLogger(__name__)


def base_answers(model: Any, tokenizer: Any, prompts: list[Messages], max_new_tokens: int,
                 batch_size: int) -> list[tuple[str, bool]]:
    """``(answer, hit the token bound)`` of ``model`` (its adapter off, when it has one) to each prompt."""
    from ultimate_trainer.model.scoring import generate_answers

    off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with off:
        answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
    # A stripped answer of (nearly) the bound's length ran into it; a shorter one ended on its own.
    return [(a, len(tokenizer(a, add_special_tokens=False)["input_ids"]) >= max_new_tokens - 1) for a in answers]


def _generator(cfg: Config, base_path: str, tokenizer: Any, session: Any):
    def generate(prompts: list[Messages]) -> list[tuple[str, bool]]:
        t = cfg.training
        if session is not None and session.model is not None:
            from ultimate_trainer.trainer.session import model_key

            if session.key == model_key(cfg, base_path):
                return base_answers(session.model, tokenizer, prompts, t.rehearsal_max_new_tokens, cfg.eval.batch_size)
        from ultimate_trainer.model.loading import load_base_model, pick_device

        model = load_base_model(cfg, base_path, quantize=cfg.load_in_4bit, device=pick_device(cfg))
        try:
            return base_answers(model, tokenizer, prompts, t.rehearsal_max_new_tokens, cfg.eval.batch_size)
        finally:
            del model
            gc.collect()
    return generate


def rehearsal_for(cfg: Config, base_path: str, tokenizer: Any, new_lines: int, run_id: str, out: Path,
                  session: Any = None, generate: Any = None) -> Rehearsal | None:
    """This run's rehearsal file (``prompts.py``); None when off or unusable (logged).

    ``generate`` replaces the base model's answers (tests).
    """
    if cfg.training.rehearsal_fraction <= 0 or new_lines <= 0:
        return None
    prompts = load_prompts(cfg)
    if prompts is None:
        return None
    builtin = cfg.base_model == BUILTIN_MODEL and \
        Path(base_path).resolve() == (cfg.path("model_cache") / BUILTIN_MODEL).resolve()  # not a consolidation
    answers, lines = cached_lines(cfg, base_path, prompts, generate or _generator(cfg, base_path, tokenizer, session),
                                  shipped_answers(cfg, prompts) if builtin else None)
    return write_rehearsal(lines, answers, prompts, new_lines, run_id, cfg, out)
