"""Replay: a few training lines of files trained before, mixed into each run, so old skills are rehearsed.

The sources are the run manifest's (core/manifest.py: the files the daemon finished, in
``queue/done``, with their hashes and line counts); this module reads no spool and hashes nothing
the manifest describes. A run of N new lines gets about ``N * f / (1 - f)`` replayed lines (``f`` =
``training.replay_fraction``), so that replay is ``f`` of what the run trains. Which lines: line
numbers drawn uniformly over every line of every source by a generator seeded from the run's id, so
an interrupted run, started again on the same files, replays exactly the same lines and its resume
stays exact. A drawn line is used only when ``prepare`` trained on it: it parses, and it is not held
out by the held-out rule (data/heldout.py), so a held-out example is never replayed into training.
Sources with the same content as one of the run's files are left out (the run trains them
anyway); JSON array files too.

The drawn lines are copied, raw, into one JSONL file that ``prepare`` reads after the run's files
(tokenized into the same store, never held out, no report of its own). Memory stays flat: the draws
are ``O(replayed lines)``, and the chosen files are streamed once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ultimate_trainer.core.config import Config
from ultimate_trainer.core.manifest import Manifest, digest
from ultimate_trainer.data.errors import BadLine
from ultimate_trainer.data.formats import Example, decode_line, parse_record
from ultimate_trainer.data.jsonarray import is_array
from ultimate_trainer.data.heldout import HELD_OUT, TRAIN, HeldOut
from ultimate_trainer.data.prepare import iter_lines

log = logging.getLogger(__name__)

OVERDRAW = 2  # lines drawn per line wanted: some land on held-out or bad lines


@dataclass
class Replay:
    """What was replayed: the raw-line file for ``prepare``, and which files the lines came from."""

    path: Path
    lines: int
    wanted: int
    sources: dict[str, int] = field(default_factory=dict)  # done file name -> lines replayed from it


def replay_count(new_lines: int, fraction: float) -> int:
    """Replayed lines for a run of ``new_lines``, so that they are ``fraction`` of the whole."""
    if fraction <= 0 or new_lines <= 0:
        return 0
    return math.ceil(new_lines * fraction / (1.0 - fraction))


def _sources(manifest: Manifest) -> list[tuple[Path, int]]:
    """(file, line count) of every replayable source, by name: not a JSON array, not one of the run's files."""
    run_shas = set(manifest.sha256s)
    out = []
    for src in manifest.replay:
        if src.sha256 in run_shas:
            continue
        try:
            with open(src.path, "rb") as f:
                if is_array(f):
                    continue
            lines = src.lines if src.lines is not None else digest(src.path).lines
        except OSError as e:
            log.warning("replay: %s: cannot read (%s); left out", src.path.name, e.strerror or e)
            continue
        if lines:
            out.append((src.path, lines))
    return out


def split_lines(path: Path, cfg: Config, all_heldout: bool = False) -> Iterator[tuple[int, bytes, Example, bool]]:
    """``(line number, raw bytes, example, held out)`` for each parsable line of a JSONL file, held out by
    the held-out rule (data/heldout.py) as ``prepare`` held it out when it trained the file.

    Until the file's first trained line, the lines are kept back: a file that has none trains its
    held-out lines instead (the rule's tiny files). ``all_heldout``: the eval file.
    """
    d = cfg.data
    rule = HeldOut(d, set(), all_heldout=all_heldout)
    waiting: list[tuple[int, bytes, Example, str]] | None = []  # None once a line is trained
    with open(path, "rb") as f:
        for lineno, raw, _ in iter_lines(f, d.max_line_bytes):
            if raw is None or not raw.strip():
                continue
            try:
                ex = parse_record(decode_line(raw, d.max_line_bytes), d.system_prompt)
            except BadLine:
                continue
            ex.source, ex.line = f"{path.name}:{lineno}", lineno
            decision = rule.decide(raw, ex)
            if waiting is not None and decision != TRAIN:
                waiting.append((lineno, raw, ex, decision))
                continue
            if waiting is not None:
                yield from ((n, r, e, True) for n, r, e, _ in waiting)
                waiting = None
            yield lineno, raw, ex, decision != TRAIN
    if waiting:
        tiny = rule.tiny_file(0, sum(dec == HELD_OUT for *_, dec in waiting))
        yield from ((n, r, e, not (tiny and dec == HELD_OUT)) for n, r, e, dec in waiting)


def _trained_lines(path: Path, wanted: set[int], cfg: Config) -> dict[int, bytes]:
    """The raw bytes of those ``wanted`` line numbers that ``prepare`` trains on."""
    found: dict[int, bytes] = {}
    last = max(wanted)
    for lineno, raw, _, heldout in split_lines(path, cfg):
        if lineno > last:
            break
        if lineno in wanted and not heldout:
            found[lineno] = raw
    return found


def heldout_examples(files: list[Path], cfg: Config, limit: int, eval_file: Path | None = None) -> list[Example]:
    """Up to ``limit`` evaluable held-out examples of ``files``, taken in turn from each (for the merge gate);
    ``eval_file`` (one of ``files``) is held out whole, as a run holds it out."""
    per_file: list[list[Example]] = []
    for p in files:
        got: list[Example] = []
        try:
            for _, _, ex, heldout in split_lines(Path(p), cfg, all_heldout=eval_file is not None and p == eval_file):
                if heldout and ex.evaluable:
                    got.append(ex)
                    if len(got) >= limit:
                        break
        except OSError as e:
            log.warning("%s: cannot read (%s); no held-out examples from it", p, e.strerror or e)
        per_file.append(got)
    out: list[Example] = []
    while len(out) < limit and any(per_file):
        for q in per_file:
            if q and len(out) < limit:
                out.append(q.pop(0))
    return out


def write_replay(manifest: Manifest, cfg: Config, out: Path, run_id: str) -> Replay | None:
    """Draw the run's replay from the manifest's sources into the JSONL ``out``; None when there is nothing
    to replay. ``run_id`` (hex, core/manifest.py) seeds the draw."""
    fraction = cfg.training.replay_fraction
    if fraction <= 0 or not manifest.replay:
        return None
    wanted = replay_count(manifest.lines, fraction)
    done = _sources(manifest)
    total = sum(n for _, n in done)
    if not wanted or not total:
        return None
    rng = np.random.default_rng([cfg.training.seed, int(run_id, 16) % (2**32)])
    draws = rng.choice(total, size=min(total, OVERDRAW * wanted + 8), replace=False)
    starts = np.cumsum([0] + [n for _, n in done])
    by_file: dict[int, dict[int, int]] = {}  # file index -> {line number: draw rank}
    for rank, g in enumerate(draws.tolist()):
        i = int(np.searchsorted(starts, g, side="right")) - 1
        by_file.setdefault(i, {})[g - int(starts[i]) + 1] = rank
    picked: list[tuple[int, str, bytes]] = []
    for i, lines in sorted(by_file.items()):
        path = done[i][0]
        try:
            for lineno, raw in _trained_lines(path, set(lines), cfg).items():
                picked.append((lines[lineno], path.name, raw))
        except OSError as e:
            log.warning("replay: %s: cannot read (%s); left out", path.name, e.strerror or e)
    picked.sort()
    picked = picked[:wanted]
    if not picked:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    sources: dict[str, int] = {}
    with open(out, "wb") as f:
        for _, name, raw in picked:
            f.write(raw + b"\n")
            sources[name] = sources.get(name, 0) + 1
    log.info("replay: %d line(s) from %d earlier file(s) (%.0f%% of the run)", len(picked), len(sources),
             100 * fraction)
    return Replay(out, len(picked), wanted, dict(sorted(sources.items())))
