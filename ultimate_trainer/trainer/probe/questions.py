"""The base-knowledge probe: general questions with checkable answers, to measure what training forgets.

A probe file is JSONL in any evaluable training format (docs/DATA.md), most simply
``{"prompt": "What is the capital of France?", "completion": "Paris", "metadata": {"matcher": "contains"}}``;
``metadata.matcher`` picks the matcher of that question (``model/scoring.py``; default ``contains``,
since a base model answers in a sentence). ``eval.probe_file`` = ``builtin`` is the shipped set
``data/probes/general.jsonl``: questions the built-in SmolLM2-135M-Instruct answers right
(``bench/pick_probe.py`` chose them). A bad line is reported as ``file:line: reason`` and skipped.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ultimate_trainer.core.config import Config
from ultimate_trainer.data.errors import BadLine
from ultimate_trainer.data.formats import decode_line, parse_record

log = logging.getLogger(__name__)

BUILTIN = "builtin"
BUILTIN_PATH = Path(__file__).resolve().parents[2] / "data" / "probes" / "general.jsonl"
DEFAULT_MATCHER = "contains"
MATCHERS = ("exact", "normalized", "contains", "numeric")  # model/scoring.py's, which data/ cannot import


@dataclass(frozen=True)
class ProbeItem:
    prompt_messages: list[dict[str, Any]]
    expected: str
    matcher: str
    source: str  # file:line


@dataclass(frozen=True)
class Probe:
    path: Path
    sha256: str  # of the file: a baseline belongs to one probe
    items: list[ProbeItem]


def probe_path(cfg: Config) -> Path | None:
    """The probe file ``eval.probe_file`` names, or None when the probe is off."""
    name = cfg.eval.probe_file
    if not name:
        return None
    if name == BUILTIN:
        return BUILTIN_PATH
    p = Path(name).expanduser()
    return p if p.is_absolute() else cfg.path("root") / p


def load_probe(cfg: Config) -> Probe | None:
    """The probe's questions; None when it is off, missing or has no usable question (logged)."""
    path = probe_path(cfg)
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError as e:
        log.error("eval.probe_file: %s: cannot read (%s); no probe this run", path, e.strerror or e)
        return None
    items = []
    for n, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            value = decode_line(raw, len(raw) + 1)
            ex = parse_record(value, cfg.data.system_prompt)
            if not ex.evaluable:
                raise BadLine("no answer to compare (the last turn must be the assistant's)")
            matcher = ((ex.metadata or {}).get("matcher") or DEFAULT_MATCHER)
            if matcher not in MATCHERS:
                raise BadLine(f"metadata.matcher {matcher!r} is not one of {', '.join(MATCHERS)}")
        except BadLine as e:
            log.warning("%s:%d: %s (probe question skipped)", path.name, n, e)
            continue
        items.append(ProbeItem(ex.prompt_messages, ex.expected, matcher, f"{path.name}:{n}"))
    if not items:
        log.error("eval.probe_file: %s has no usable question; no probe this run", path)
        return None
    return Probe(path, hashlib.sha256(data).hexdigest(), items)
