"""Rows of training examples: packed (several examples a row, isolated) or length-grouped.

A run's plan is an order of examples. Two ways to lay that order out in batches:

- **packed** (``pack_rows``): the order is cut into windows; in each window a best-fit-decreasing
  bin packer puts examples into rows of at most ``capacity`` tokens; the window's rows are then
  shuffled with a seeded generator. Everything depends only on the order, the lengths and the
  seed, so the same run always gets the same rows and a resumed run can skip whole rows exactly.
  ``collate.PackedCollator`` lays each row out with position ids restarting at every example and a
  segment id per token, from which ``block_causal_mask`` builds the attention mask: causal inside
  an example, nothing across examples (position ids alone do not isolate examples under SDPA).
- **grouped** (``group_by_length``): the same examples, one a row, reordered inside windows so
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


def should_pack(mode: str, lengths: np.ndarray, capacity: int) -> bool:
    """``training.packing`` resolved: auto packs when an average row would hold two examples or more."""
    if mode in ("on", "off"):
        return mode == "on"
    return len(lengths) > 1 and float(np.mean(lengths)) <= capacity / 2


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
            packed: bool) -> tuple[list[int], list[list[int]] | None]:
    """A run's batches: ``(order, rows)`` packed, ``(length-grouped order, None)`` otherwise."""
    if packed:
        return [int(i) for i in order], pack_rows(order, lengths, capacity, seed)
    return group_by_length(order, lengths, batch_size, seed), None
