"""Rows of training examples: padding-free (a micro-batch in one row), packed rows, or length-grouped.

A run's plan is an order of examples. Three ways to lay that order out in batches
(``training.packing``, resolved by ``layout``):

- **flat** (``flat_rows``, the default): each micro-batch's ``batch_size`` examples, in the plan's
  order, laid back to back in one row with no padding (TRL calls this ``padding_free``). A step
  trains exactly the examples it would train padded, so the number of optimizer updates and what
  each learns are unchanged; only the padding's compute is gone. The attention sees each
  example alone (model/attention.py).
- **rows** (``pack_rows``): the order is cut into windows; in each window a best-fit-decreasing
  bin packer puts examples into rows of at most ``capacity`` tokens; the window's rows are then
  shuffled with a seeded generator. Everything depends only on the order, the lengths and the
  seed, so the same run always gets the same rows and a resumed run can skip whole rows exactly.
  ``collate.PackedCollator`` lays each row out with position ids restarting at every example and a
  segment id per token, from which ``block_causal_mask`` builds the attention mask: causal inside
  an example, nothing across examples (position ids alone do not isolate examples under SDPA).
  A step is ``batch_size`` such rows, so it trains several times more examples than a padded
  step: fewer, larger updates per pass over the data (fixed-shape rows, e.g. for a GPU).
- **grouped** (``group_by_length``, ``packing: off``): the same examples, one a row, reordered inside windows so
  that each batch holds examples of similar lengths; dynamic padding then pads little.

Labels: the first token of every example is never a target in a packed row (unpacked, nothing
predicts it either), so the last token of one example never learns to predict the next one.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np


WINDOW_EXAMPLES = 2048  # examples packed together; wider packs tighter, narrower keeps the plan's order
GROUP_BATCHES = 64  # batches per length-grouping window


FLAT, ROWS, GROUPED = "flat", "rows", "grouped"


def layout(mode: str) -> str:
    """``training.packing`` resolved: ``auto`` and ``on`` are padding-free (flat), ``rows`` packs rows."""
    return {"off": GROUPED, "rows": ROWS}.get(mode, FLAT)


def flat_rows(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """The planned ``order`` cut into micro-batches of ``batch_size`` examples, one row each."""
    return [[int(i) for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]


def _best_fit_decreasing(items: list[tuple[int, int]], capacity: int) -> list[list[int]]:
    """``items`` = (length, example index); rows of example indices, longest examples placed first."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row number), sorted: the tightest fit is found by bisection
    for length, index in sorted(items, key=lambda t: -t[0]):  # stable: equal lengths keep the plan's order
        k = bisect.bisect_left(free, (length, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(index)
        if room - length > 0:
            bisect.insort(free, (room - length, r))
    return rows


def pack_rows(order: Sequence[int], lengths: np.ndarray, capacity: int, seed: int) -> list[list[int]]:
    """The planned ``order`` (indices into ``lengths``) packed into rows of at most ``capacity`` tokens.

    Deterministic. Every position of ``order`` lands in exactly one row (an example planned twice,
    e.g. over two epochs, is packed twice); an example longer than ``capacity`` gets a row of its own.
    """
    rows: list[list[int]] = []
    for w, start in enumerate(range(0, len(order), WINDOW_EXAMPLES)):
        window = [int(i) for i in order[start:start + WINDOW_EXAMPLES]]
        packed = _best_fit_decreasing([(int(lengths[i]), i) for i in window], capacity)
        rng = np.random.default_rng([seed, w])
        rows.extend(packed[j] for j in rng.permutation(len(packed)))
    return rows


def group_by_length(order: Sequence[int], lengths: np.ndarray, batch_size: int, seed: int) -> list[int]:
    """The planned ``order`` rearranged so that each run of ``batch_size`` has similar lengths.

    Only examples within the same window of ``GROUP_BATCHES`` batches trade places, so the plan
    keeps its overall order (and its epochs); the batches of a window are shuffled.
    """
    out: list[int] = []
    size = batch_size * GROUP_BATCHES
    for w, start in enumerate(range(0, len(order), size)):
        window = [int(i) for i in order[start:start + size]]
        window.sort(key=lambda i: -int(lengths[i]))
        batches = [window[k:k + batch_size] for k in range(0, len(window), batch_size)]
        rng = np.random.default_rng([seed, w])
        for j in rng.permutation(len(batches)):
            out.extend(batches[j])
    return out


def lay_out(order: Sequence[int], lengths: np.ndarray, batch_size: int, capacity: int, seed: int,
            kind: str) -> tuple[list[int], list[list[int]] | None]:
    """A run's batches for a ``layout`` kind: ``(order, rows)``, or ``(length-grouped order, None)``."""
    if kind == FLAT:
        return [int(i) for i in order], flat_rows(order, batch_size)
    if kind == ROWS:
        return [int(i) for i in order], pack_rows(order, lengths, capacity, seed)
    return group_by_length(order, lengths, batch_size, seed), None
