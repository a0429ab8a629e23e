"""A disk-backed, memory-mapped store of tokenized examples, written chunk by chunk.

Layout of a store folder:

- ``input_ids.int32``  every example's token ids, one after another
- ``loss_mask.uint8``  1 where the token carries the loss (label = its id), 0 elsewhere (label -100)
- ``offsets.int64``    end offset of each example in the two flat files (example i spans
  ``offsets[i-1]:offsets[i]``)
- ``meta.json``        written last: example count, token count; a folder without it is incomplete

Appending writes the chunk's arrays to the end of the files and forgets them, so the writer holds
one chunk at most. Reading maps the files (``np.memmap``): the OS pages in what is used.
"""

from __future__ import annotations

import logging
import shutil
from itertools import chain
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ultimate_trainer.core import status
from ultimate_trainer.data.encoding import IGNORE_INDEX

log = logging.getLogger(__name__)

IDS_FILE = "input_ids.int32"
MASK_FILE = "loss_mask.uint8"
OFFSETS_FILE = "offsets.int64"
META_FILE = "meta.json"


class TokenStoreWriter:
    """Appends encoded examples to a fresh store folder; ``close()`` marks it complete."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        self._ids = open(self.directory / IDS_FILE, "wb")
        self._mask = open(self.directory / MASK_FILE, "wb")
        self._offsets = open(self.directory / OFFSETS_FILE, "wb")
        self.examples = 0
        self.tokens = 0

    def append(self, encoded: Sequence[tuple[list[int], list[int]]]) -> None:
        if not encoded:
            return
        lengths = np.fromiter(map(len, (ids for ids, _ in encoded)), dtype=np.int64, count=len(encoded))
        total = int(lengths.sum())
        # chain() walks the lists in C: no Python frame per token
        ids = np.fromiter(chain.from_iterable(ids for ids, _ in encoded), dtype=np.int32, count=total)
        labels = np.fromiter(chain.from_iterable(labels for _, labels in encoded), dtype=np.int64, count=total)
        self._write(ids, labels != IGNORE_INDEX, lengths)

    def append_slices(self, ids: np.ndarray, mask: np.ndarray, bounds: Sequence[tuple[int, int]]) -> None:
        """Append the examples ``ids[a:b]`` (loss where ``mask[a:b]``) for each ``(a, b)`` of ``bounds``, in order."""
        if not bounds:
            return
        edges = np.asarray(bounds, dtype=np.int64)
        keep = np.zeros(len(ids) + 1, dtype=np.int64)
        np.add.at(keep, edges[:, 0], 1)
        np.add.at(keep, edges[:, 1], -1)
        keep = np.cumsum(keep[:-1]) > 0
        self._write(ids[keep], mask[keep], edges[:, 1] - edges[:, 0])

    def append_store(self, store: "TokenStore", block: int = 1 << 24) -> None:
        """Append every example of a complete store (its own order), a block of tokens at a time."""
        n, tokens = len(store._offsets), int(store._offsets[-1]) if len(store._offsets) else 0
        for a in range(0, tokens, block):
            self._ids.write(np.asarray(store._ids[a:a + block]).tobytes())
            self._mask.write(np.asarray(store._mask[a:a + block]).tobytes())
        for a in range(0, n, block):
            self._offsets.write((self.tokens + np.asarray(store._offsets[a:a + block])).astype(np.int64).tobytes())
        self.examples += n
        self.tokens += tokens

    def _write(self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> None:
        self._ids.write(ids.astype(np.int32).tobytes())
        self._mask.write(mask.astype(np.uint8).tobytes())
        self._offsets.write((self.tokens + np.cumsum(lengths)).astype(np.int64).tobytes())
        self.examples += len(lengths)
        self.tokens += len(ids)

    def abort(self) -> None:
        """Stop writing and leave the folder incomplete (``TokenStore.open`` refuses it)."""
        for f in (self._ids, self._mask, self._offsets):
            f.close()

    def close(self) -> "TokenStore":
        for f in (self._ids, self._mask, self._offsets):
            f.flush()
            f.close()
        status.atomic_write_json(
            self.directory / META_FILE, {"examples": self.examples, "tokens": self.tokens, "format": 1}
        )
        return TokenStore.open(self.directory)


def _map(path: Path, dtype: Any, count: int) -> np.ndarray:
    # np.memmap refuses empty files; an empty store is legitimate (every line held out or bad).
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


class TokenStore:
    """Read side: ``store[i] -> {"input_ids": [...], "labels": [...]}``, optionally through an index order."""

    def __init__(self, directory: Path, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray,
                 order: np.ndarray | None = None):
        self.directory = Path(directory)
        self._ids, self._mask, self._offsets = ids, mask, offsets
        self._order = order

    @classmethod
    def open(cls, directory: str | Path) -> "TokenStore":
        """Open a complete store; FileNotFoundError when it is missing or was never finished."""
        directory = Path(directory)
        meta = status.read_json(directory / META_FILE)
        if meta is None:
            raise FileNotFoundError(f"{directory}: no complete token store ({META_FILE} missing)")
        n, tokens = int(meta["examples"]), int(meta["tokens"])
        offsets = _map(directory / OFFSETS_FILE, np.int64, n)
        if n and int(offsets[-1]) != tokens:
            raise FileNotFoundError(f"{directory}: token store is inconsistent (offsets end at {offsets[-1]}, "
                                    f"meta says {tokens} tokens)")
        return cls(directory, _map(directory / IDS_FILE, np.int32, tokens),
                   _map(directory / MASK_FILE, np.uint8, tokens), offsets)

    @staticmethod
    def is_complete(directory: str | Path) -> bool:
        return status.read_json(Path(directory) / META_FILE) is not None

    def _bounds(self, i: int) -> tuple[int, int]:
        start = int(self._offsets[i - 1]) if i > 0 else 0
        return start, int(self._offsets[i])

    @property
    def lengths(self) -> np.ndarray:
        """Token count of each example (in this view's order)."""
        all_lengths = np.diff(np.asarray(self._offsets), prepend=0)
        return all_lengths if self._order is None else all_lengths[self._order]

    def __len__(self) -> int:
        return len(self._offsets) if self._order is None else len(self._order)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        j = int(self._order[i]) if self._order is not None else i
        a, b = self._bounds(j)
        ids = np.asarray(self._ids[a:b], dtype=np.int64)
        labels = np.where(np.asarray(self._mask[a:b]) != 0, ids, IGNORE_INDEX)
        return {"input_ids": ids.tolist(), "labels": labels.tolist()}

    def target_count(self, i: int) -> int:
        """How many of example ``i``'s tokens are trained (have a label), without building the example."""
        j = int(self._order[i]) if self._order is not None else int(i)
        a, b = self._bounds(j)
        return int(np.count_nonzero(np.asarray(self._mask[a:b])))

    def select(self, indices: Sequence[int] | np.ndarray) -> "TokenStore":
        """A view in the given order (e.g. a shuffled, resumed-past-N order); shares the mapped files."""
        idx = np.asarray(indices, dtype=np.int64)
        if self._order is not None:
            idx = self._order[idx]
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self._offsets)):
            raise IndexError("select: index out of range")
        return TokenStore(self.directory, self._ids, self._mask, self._offsets, idx)
