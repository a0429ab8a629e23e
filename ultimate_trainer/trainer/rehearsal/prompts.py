"""Rehearsal: general prompts answered by the base model itself, mixed into each run so it keeps its manners.

Replay (``data/replay.py``) only draws on files trained before, so it cannot help a first task. A
run that teaches one narrow format (the demo's booking references) soon answers *every* question in
that format, and the base-knowledge probe falls to 0. Rehearsal is self-distillation: a built-in set
of short general instructions and questions (``data/probes/rehearsal.jsonl``, none of them a probe
question; ``training.rehearsal_file`` names another), answered once by the base the run trains on
(greedy, at most ``training.rehearsal_max_new_tokens`` tokens), and those answers trained alongside
the user's files. Training on its own answers costs the model nothing it knew and anchors how it
answers everything that is not the new task.

The answers are cached in ``paths.work``/rehearsal/<key>.jsonl, written atomically; the key is the
base's path, the prompts file's SHA-256, the system prompt and the answer bound, so a consolidation
that is adopted (a new base) gets new answers, a rolled-back one its old ones again, and every other
run reuses the file. A run of N new lines gets ``ceil(N * f / (1 - f - r))`` rehearsed lines (``f`` =
``training.rehearsal_fraction``, ``r`` = ``training.replay_fraction``), so that rehearsal is ``f`` of
what the run trains; which ones is drawn by a generator seeded from the run's id (a fresh permutation
of the answered prompts, another after it when more are wanted), so a resumed run rehearses exactly
the same lines. They are written, raw, into a JSONL file that ``prepare`` reads after the run's files
(and after the replay), the way replayed lines are.

The built-in base's answers ship with the package (``probes/rehearsal.smollm2-135m-instruct.jsonl``,
generated the same way, 4-bit on a CPU), so the demo does not wait for them; they are used only where
this run would generate exactly those (``shipped_answers``). The model side (generating the answers)
is ``answers.py``'s: this module takes a ``generate`` callable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ultimate_trainer.core import status
from ultimate_trainer.core.config import BUILTIN_MODEL, Config

log = logging.getLogger(__name__)

BUILTIN = "builtin"
BUILTIN_PATH = Path(__file__).resolve().parents[2] / "data" / "probes" / "rehearsal.jsonl"
CACHE_DIR = "rehearsal"  # under paths.work
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Prompts:
    path: Path
    sha256: str
    messages: list[Messages]  # each ends with the user's turn


@dataclass
class Rehearsal:
    """What was rehearsed: the raw-line file for ``prepare``, how many lines, and whose answers."""

    path: Path
    lines: int
    wanted: int
    answers: str  # the cache file's name: which base answered
    prompts_file: str


def rehearsal_path(cfg: Config) -> Path:
    """The prompts file ``training.rehearsal_file`` names (empty or ``builtin``: the shipped set)."""
    name = cfg.training.rehearsal_file
    if not name or name == BUILTIN:
        return BUILTIN_PATH
    p = Path(name).expanduser()
    return p if p.is_absolute() else cfg.path("root") / p


def load_prompts(cfg: Config) -> Prompts | None:
    """The rehearsal prompts: JSONL of ``{"prompt": str}`` (optional ``"system"``); None when unusable (logged)."""
    path = rehearsal_path(cfg)
    try:
        data = path.read_bytes()
    except OSError as e:
        log.error("training.rehearsal_file: %s: cannot read (%s); no rehearsal this run", path, e.strerror or e)
        return None
    out: list[Messages] = []
    for n, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            prompt = rec.get("prompt") if isinstance(rec, dict) else None
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError('no "prompt" string')
            system = rec.get("system", cfg.data.system_prompt)
        except ValueError as e:
            log.warning("%s:%d: %s (rehearsal prompt skipped)", path.name, n, e)
            continue
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        out.append(msgs)
    if not out:
        log.error("training.rehearsal_file: %s has no usable prompt; no rehearsal this run", path)
        return None
    return Prompts(path, hashlib.sha256(data).hexdigest(), out)


def answer_settings(cfg: Config, prompts: Prompts) -> dict[str, object]:
    """What a base's answers depend on besides the base itself."""
    return {"prompts": prompts.sha256, "system": cfg.data.system_prompt,
            "max_new_tokens": cfg.training.rehearsal_max_new_tokens, "load_in_4bit": cfg.load_in_4bit}


def cache_path(cfg: Config, base_path: str, prompts: Prompts) -> Path:
    """Where the answers of ``base_path`` to ``prompts`` are kept."""
    key = {"base": str(base_path), **answer_settings(cfg, prompts)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cfg.path("work") / CACHE_DIR / f"{digest}.jsonl"


def shipped_answers(cfg: Config, prompts: Prompts) -> Path | None:
    """The built-in base's answers shipped with the package (``probes/rehearsal.<model>.jsonl``, made by
    ``bench/forgetting.py``'s first rehearsing run), when they are the ones this run would generate:
    the same prompts, system prompt, bound and 4-bit setting (the sidecar ``.json`` records them).
    The caller says whether its base is the built-in one (not a consolidation of it)."""
    answers = BUILTIN_PATH.with_name(f"rehearsal.{BUILTIN_MODEL}.jsonl")
    try:
        made_with = json.loads(answers.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    return answers if made_with == answer_settings(cfg, prompts) and answers.is_file() else None


def complete_sentences(answer: str, truncated: bool) -> str:
    """``answer`` as trained: stripped, and when generation hit its bound, cut after its last full sentence
    ("" when it has none), so the model is never taught to stop mid-sentence."""
    answer = answer.strip()
    if not truncated:
        return answer
    ends = list(_SENTENCE_END.finditer(answer))
    return answer[:ends[-1].end()].strip() if ends else ""


def cached_lines(cfg: Config, base_path: str, prompts: Prompts,
                 generate: Callable[[list[Messages]], list[tuple[str, bool]]],
                 shipped: Path | None = None) -> tuple[Path, list[bytes]]:
    """The cache file and its raw training lines, one per answered prompt; generated (and cached) when missing.

    ``generate`` answers every prompt with ``(text, hit the token bound)``; an empty answer (after
    ``complete_sentences``) is left out. ``shipped`` (``shipped_answers``), when given, stands in for
    the generation. The cache is written atomically, so a crash leaves the old file or none, never
    half of one.
    """
    path = cache_path(cfg, base_path, prompts)
    try:
        return path, [line for line in path.read_bytes().splitlines() if line.strip()]
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("rehearsal: %s: cannot read (%s); answering again", path, e.strerror or e)
    if shipped is not None:
        lines = [line for line in shipped.read_bytes().splitlines() if line.strip()]
        status.atomic_write_text(path, "".join(line.decode() + "\n" for line in lines))
        log.info("rehearsal: the built-in base's %d shipped answers (%s), cached in %s", len(lines), shipped.name, path)
        return path, lines
    log.info("rehearsal: the base answers %d general prompts once (cached in %s)", len(prompts.messages), path)
    answers = generate(prompts.messages)
    lines = []
    for msgs, (text, truncated) in zip(prompts.messages, answers):
        answer = complete_sentences(text, truncated)
        if answer:
            lines.append(json.dumps({"messages": [*msgs, {"role": "assistant", "content": answer}]},
                                    ensure_ascii=False).encode())
    status.atomic_write_text(path, "".join(line.decode() + "\n" for line in lines))
    log.info("rehearsal: %d of %d answers kept", len(lines), len(prompts.messages))
    return path, lines


def rehearsal_count(new_lines: int, cfg: Config) -> int:
    """Rehearsed lines for a run of ``new_lines``, so that they are ``rehearsal_fraction`` of the whole."""
    f, r = cfg.training.rehearsal_fraction, cfg.training.replay_fraction
    if f <= 0 or new_lines <= 0:
        return 0
    return math.ceil(new_lines * f / max(1.0 - f - r, 1e-6))


def draw(n_lines: int, wanted: int, run_id: str, seed: int) -> list[int]:
    """Indices of the ``wanted`` lines, from ``n_lines``: permutations seeded by the run's id, one after another."""
    if n_lines <= 0 or wanted <= 0:
        return []
    rng = np.random.default_rng([seed, int(run_id, 16) % (2**32), 0x5EED])  # not replay's stream
    out: list[int] = []
    while len(out) < wanted:
        out.extend(rng.permutation(n_lines).tolist())
    return out[:wanted]


def write_rehearsal(lines: list[bytes], answers: Path, prompts: Prompts, new_lines: int, run_id: str,
                    cfg: Config, out: Path) -> Rehearsal | None:
    """The run's rehearsal, drawn from the answered ``lines`` into the JSONL ``out``; None when there is none."""
    wanted = rehearsal_count(new_lines, cfg)
    picked = draw(len(lines), wanted, run_id, cfg.training.seed)
    if not picked:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        for i in picked:
            f.write(lines[i] + b"\n")
    log.info("rehearsal: %d line(s) of the base's own answers (%.0f%% of the run)", len(picked),
             100 * cfg.training.rehearsal_fraction)
    return Rehearsal(out, len(picked), wanted, answers.name, prompts.path.name)
