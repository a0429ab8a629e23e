"""Replay: a few training lines of files trained before, mixed into each run, so old skills are rehearsed.

Files the daemon finished are kept in ``queue/done/``. A run of N new examples gets about
``N * f / (1 - f)`` replayed lines (``f`` = ``training.replay_fraction``), so that replay is ``f`` of
what the run trains. Which lines: line numbers drawn uniformly over every line of every done file by
a generator seeded from the run's id (``seed``), so an interrupted run, started again on the same
files, replays exactly the same lines and its resume stays exact. A drawn line is used only when
``prepare`` trained on it: it parses, and it is not held out by prepare's rule (SHA-1 of the raw line
under ``data.heldout_fraction``, the first ``data.heldout_max_per_file`` of a file, and copies of
those), so a held-out example is never replayed into training. Done files with the same content
as one of the run's files are left out (the run trains them anyway); JSON array files too.

The drawn lines are copied, raw, into one JSONL file that ``prepare`` reads after the run's files
(tokenized into the same store, never held out, no report of its own). Memory stays flat: line
counts come from the files' reports when there are some (else one streaming pass), the draws are
``O(replayed lines)``, and the chosen files are streamed once.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ultimate_trainer.core import status
from ultimate_trainer.core.config import Config
from ultimate_trainer.data.errors import BadLine
from ultimate_trainer.data.formats import Example, decode_line, parse_record
from ultimate_trainer.data.jsonarray import is_array
from ultimate_trainer.data.prepare import content_key, is_heldout, iter_lines

log = logging.getLogger(__name__)

OVERDRAW = 2  # lines drawn per line wanted: some land on held-out or bad lines
DONE_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclass
class Replay:
    """What was replayed: the raw-line file for ``prepare``, and which files the lines came from."""

    path: Path
    lines: int
    wanted: int
    sources: dict[str, int] = field(default_factory=dict)  # done file name -> lines replayed from it


def digest(path: Path) -> tuple[str, int]:
    """(SHA-256 of the file's bytes, number of lines), one streaming pass; a last line without newline counts."""
    h, lines, last = hashlib.sha256(), 0, b"\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            lines += block.count(b"\n")
            last = block[-1:]
    return h.hexdigest(), lines + (last != b"\n")


def replay_count(new_lines: int, fraction: float) -> int:
    """Replayed lines for a run of ``new_lines``, so that they are ``fraction`` of the whole."""
    if fraction <= 0 or new_lines <= 0:
        return 0
    return math.ceil(new_lines * fraction / (1.0 - fraction))


def _done_files(done_dir: Path, exclude_sha: set[str], status_dir: Path | None) -> list[tuple[Path, int]]:
    """(file, line count) of every replayable done file, by name."""
    out = []
    try:
        names = sorted(p for p in done_dir.iterdir() if p.is_file() and p.suffix.lower() in DONE_SUFFIXES)
    except OSError:
        return out
    for p in names:
        try:
            with open(p, "rb") as f:
                if is_array(f):
                    continue
            rep = status.read_json(status.report_path(status_dir, p.name)) if status_dir else None
            if rep and isinstance(rep.get("sha256"), str) and isinstance(rep.get("lines"), int) \
                    and rep.get("unit", "line") == "line" and rep.get("size_bytes") == p.stat().st_size:
                sha, lines = rep["sha256"], rep["lines"]
            else:
                sha, lines = digest(p)
        except OSError as e:
            log.warning("replay: %s: cannot read (%s); left out", p.name, e.strerror or e)
            continue
        if sha not in exclude_sha and lines > 0:
            out.append((p, lines))
    return out


def split_lines(path: Path, cfg: Config) -> Iterator[tuple[int, bytes, Example, bool]]:
    """``(line number, raw bytes, example, held out)`` for each parsable line of a JSONL file, held out as
    ``prepare`` holds it out (its SHA-1 share, the first ``data.heldout_max_per_file``, and copies)."""
    d = cfg.data
    held, held_keys = 0, set()
    with open(path, "rb") as f:
        for lineno, raw, _ in iter_lines(f, d.max_line_bytes):
            if raw is None or not raw.strip():
                continue
            try:
                ex = parse_record(decode_line(raw, d.max_line_bytes), d.system_prompt)
            except BadLine:
                continue
            ex.source, ex.line = f"{path.name}:{lineno}", lineno
            key = content_key(ex)
            if key in held_keys:
                yield lineno, raw, ex, True  # a copy of a held-out example is not trained either
            elif held < d.heldout_max_per_file and is_heldout(raw, d.heldout_fraction):
                held += 1
                held_keys.add(key)
                yield lineno, raw, ex, True
            else:
                yield lineno, raw, ex, False


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


def heldout_examples(files: list[Path], cfg: Config, limit: int) -> list[Example]:
    """Up to ``limit`` evaluable held-out examples of ``files``, taken in turn from each (for the merge gate)."""
    per_file: list[list[Example]] = []
    for p in files:
        got: list[Example] = []
        try:
            for _, _, ex, heldout in split_lines(Path(p), cfg):
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


def done_files(done_dir: Path) -> list[Path]:
    """The JSONL files in ``queue/done/``, newest first."""
    try:
        found = [p for p in done_dir.iterdir() if p.is_file() and p.suffix.lower() in DONE_SUFFIXES]
    except OSError:
        return []
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name), reverse=True)


def digest_files(files: list[Path]) -> tuple[list[str], int]:
    """(SHA-256 of each readable file, their lines in all): what the run's replay and rehearsal are sized by."""
    shas, total = [], 0
    for p in files:
        try:
            sha, lines = digest(Path(p))
        except OSError:
            continue  # prepare reports the unreadable file
        shas.append(sha)
        total += lines
    return shas, total


def write_replay(new_files: list[Path], cfg: Config, done_dir: Path, out: Path, seed: Callable[[list[str]], str],
                 status_dir: Path | None = None, digests: tuple[list[str], int] | None = None) -> Replay | None:
    """Draw the run's replay from ``done_dir`` into the JSONL ``out``; None when there is nothing to replay.

    ``seed`` turns the SHA-256s of the run's files into the run's id (hex), which seeds the draw;
    ``digests`` is ``digest_files(new_files)`` when the caller has it already.
    """
    fraction = cfg.training.replay_fraction
    if fraction <= 0 or not done_dir.is_dir():
        return None
    new_sha, new_lines = digests if digests is not None else digest_files(new_files)
    wanted = replay_count(new_lines, fraction)
    done = _done_files(done_dir, set(new_sha), status_dir)
    total = sum(n for _, n in done)
    if not wanted or not total:
        return None
    rng = np.random.default_rng([cfg.training.seed, int(seed(new_sha), 16) % (2**32)])
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
