"""The model side of rehearsal (``prompts.py``): the base answers the general prompts, once per base.

The answers come from the base alone: the worker's loaded model with its adapter switched off when
it holds this base, else the base loaded for the purpose (4-bit when training is) and let go after.
Greedy, at most ``training.rehearsal_max_new_tokens`` tokens, in batches on the device that trains:
``eval.batch_size`` prompts at a time on the CPU, ``CUDA_BATCH_SCALE`` times as many on a GPU (a
batch of short answers is cheap there; 380 prompts one batch of 8 at a time would leave it idle).
The phase shows its progress and ETA in the log and in ``training_status.json``'s ``progress``, and
a stop (SIGTERM) ends it within a generated token, caching nothing: the next run answers again.
The built-in base (not a consolidation of it) takes its shipped answers instead, when they match.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager

from ultimate_trainer.core.config import BUILTIN_MODEL, Config
from ultimate_trainer.trainer.rehearsal.prompts import Messages, Rehearsal, cached_lines, load_prompts, shipped_answers, \
    write_rehearsal

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ultimate_trainer.core.progress import Progress
    from ultimate_trainer.trainer.session import Session

Generate = Callable[[list[Messages]], list[tuple[str, bool]]]  # prompts -> (answer, finished) each
Track = Callable[[int], ContextManager["Progress"]]  # total -> the phase's progress, as a context

log = logging.getLogger(__name__)

CUDA_BATCH_SCALE = 8  # rehearsal prompts a batch on a GPU: this many times eval.batch_size


def base_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[Messages], max_new_tokens: int,
                 batch_size: int, progress: Progress | None = None) -> list[tuple[str, bool]]:
    """``(answer, hit the token bound)`` of ``model`` (its adapter off, when it has one) to each prompt.

    ``progress`` (core/progress.py): counted per batch; a stop raises ``Stopped``."""
    from ultimate_trainer.model.scoring import generate_answers

    off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with off:
        answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, progress)
    # A stripped answer of (nearly) the bound's length ran into it; a shorter one ended on its own.
    return [(a, len(tokenizer(a, add_special_tokens=False)["input_ids"]) >= max_new_tokens - 1) for a in answers]


def batch_size_on(cfg: Config, device: str) -> int:
    """Rehearsal prompts a batch on ``device``."""
    return cfg.eval.batch_size * (CUDA_BATCH_SCALE if device == "cuda" else 1)


def _generator(cfg: Config, base_path: str, tokenizer: PreTrainedTokenizerBase, session: Session | None,
               track: Track | None = None) -> Generate:
    """``generate`` for ``cached_lines``; ``track(total)`` is a context giving the phase's ``Progress``."""
    def answer(model: PreTrainedModel, device: str, prompts: list[Messages]) -> list[tuple[str, bool]]:
        n = cfg.training.rehearsal_max_new_tokens
        with track(len(prompts)) if track else contextlib.nullcontext() as progress:
            return base_answers(model, tokenizer, prompts, n, batch_size_on(cfg, device), progress)

    def generate(prompts: list[Messages]) -> list[tuple[str, bool]]:
        if session is not None and session.model is not None:
            from ultimate_trainer.trainer.session import model_key

            if session.key == model_key(cfg, base_path):
                return answer(session.model, session.device, prompts)
        from ultimate_trainer.model.loading import load_base_model, pick_device

        device = pick_device(cfg)
        model = load_base_model(cfg, base_path, quantize=cfg.load_in_4bit, device=device)
        try:
            return answer(model, device, prompts)
        finally:
            del model
            gc.collect()
    return generate


def rehearsal_for(cfg: Config, base_path: str, tokenizer: PreTrainedTokenizerBase, new_lines: int, run_id: str,
                  out: Path, session: Session | None = None, generate: Generate | None = None,
                  track: Track | None = None) -> Rehearsal | None:
    """This run's rehearsal file (``prompts.py``); None when off or unusable (logged).

    ``generate`` replaces the base model's answers (tests). ``track(total)``: a context manager giving
    the generation's ``Progress`` (the run's status reporter's ``progress``).
    """
    if cfg.training.rehearsal_fraction <= 0 or new_lines <= 0:
        return None
    prompts = load_prompts(cfg)
    if prompts is None:
        return None
    builtin = cfg.base_model == BUILTIN_MODEL and \
        Path(base_path).resolve() == (cfg.path("model_cache") / BUILTIN_MODEL).resolve()  # not a consolidation
    answers, lines = cached_lines(cfg, base_path, prompts, generate or _generator(cfg, base_path, tokenizer, session, track),
                                  shipped_answers(cfg, prompts) if builtin else None)
    return write_rehearsal(lines, answers, prompts, new_lines, run_id, cfg, out)
