"""The held-out rule: which examples of a file are never trained on, but asked at evaluation and by the merge gate.

Defined here once; ``prepare`` applies it while it tokenizes a run's files, and ``replay`` and the
merge gate (``replay.split_lines``) read trained files back through it, so a line the run held out
is never replayed into training, and the gate's "never trained" prompts are exactly those.

The rule, for one file read in order, with ``seen`` the content keys already held out in this run
(the eval file's, earlier files'):

1. an example whose content is already held out (same messages, in any file or format, whatever the
   JSON spacing) is held out too: training on the copy would leak it;
2. else a line is held out when the SHA-1 of its raw bytes falls below ``data.heldout_fraction`` of
   the hash space, at most ``data.heldout_max_per_file`` per file (the first ones met). It depends
   only on the line itself, so the same lines are held out after a restart or when the file comes back;
3. a file whose every usable example landed in the held-out share (tiny files) is trained on
   instead: training on it matters more (``HeldOut.tiny_file``).

The eval file (``data.eval_file``) is held out whole; replayed and rehearsed lines never are (but
rule 1 still applies to them).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ultimate_trainer.core.config import DataConfig
from ultimate_trainer.data.formats import Example

TRAIN, HELD_OUT, COPY = "train", "heldout", "copy"


def is_heldout(raw: bytes, fraction: float) -> bool:
    """Deterministic per line content: the same bytes are always held out (or never)."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha1(raw).digest()[:8], "big")
    return h < fraction * 2**64


def content_key(example: Example) -> bytes:
    """Identity of an example's content (whatever its format or JSON spacing), to keep copies of a
    held-out example out of training."""
    content: Any = example.messages if not example.tools else [example.messages, example.tools]
    return hashlib.sha1(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).digest()


class HeldOut:
    """The rule applied to one file, example by example, in reading order."""

    def __init__(self, d: DataConfig, seen: set[bytes], all_heldout: bool = False, never_heldout: bool = False):
        self.d, self.seen = d, seen
        self.all_heldout, self.never_heldout = all_heldout, never_heldout
        self.chosen = 0  # held out by rule 2 (or as the eval file) in this file

    def decide(self, raw: bytes, example: Example) -> str:
        """``COPY`` (rule 1), ``HELD_OUT`` (rule 2, or the eval file) or ``TRAIN``; a held-out one joins ``seen``."""
        key = content_key(example)
        if key in self.seen:
            return COPY
        if not self.never_heldout and (self.all_heldout or (
                self.chosen < self.d.heldout_max_per_file and is_heldout(raw, self.d.heldout_fraction))):
            self.chosen += 1
            self.seen.add(key)
            return HELD_OUT
        return TRAIN

    def tiny_file(self, trained: int, held_out: int) -> bool:
        """Rule 3: nothing of the file would be trained, though some was held out: train those instead."""
        return trained == 0 and held_out > 0 and not self.all_heldout

    def release(self, example: Example) -> None:
        """A held-out example trained after all (rule 3): its copies elsewhere need not be held out."""
        self.seen.discard(content_key(example))
