"""Batches of token-store examples as tensors: the only module of ``data/`` that needs torch.

- ``Collator``: examples padded to the longest in the batch;
- ``PackedRows`` + ``PackedCollator``: packed rows (data/packing.py plans them), with position ids
  restarting per example and segment ids from which ``packed_inputs`` builds the block-diagonal
  attention mask the model's attention kind needs.

Given ``rehearsal_from`` (the store index of the first rehearsal line: data/prepare.py stores them
last), ``PackedRows`` and ``Ordered`` mark each token of a rehearsal line, and the collators turn the
marks into ``rehearsal_mask`` (1 on a rehearsal line's tokens), which the trainer's loss weighs
(trainer/control_rule.py ``rehearsal_weights``) and removes before the model sees the batch.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ultimate_trainer.data.encoding import IGNORE_INDEX


class Collator:
    """Pads a batch to its longest example: ``input_ids`` with the pad id (EOS when there is none),
    ``labels`` with -100, and builds ``attention_mask``."""

    def __init__(self, tokenizer: Any = None, pad_token_id: int | None = None):
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_token_id is None:
            raise ValueError("Collator: the tokenizer has neither a pad nor an EOS token")
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        n = len(features)
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        marked = "rehearsal" in features[0]
        rehearsal = torch.zeros((n, width), dtype=torch.long) if marked else None
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.as_tensor(f["labels"], dtype=torch.long)
            attention[i, :k] = 1
            if rehearsal is not None:
                rehearsal[i, :k] = torch.as_tensor(f["rehearsal"], dtype=torch.long)
        batch = {"input_ids": ids, "labels": labels, "attention_mask": attention}
        return {**batch, "rehearsal_mask": rehearsal} if rehearsal is not None else batch


class Ordered:
    """``store``'s examples in ``order``, each token of a rehearsal line marked (``rehearsal_from``)."""

    def __init__(self, store: Any, order: Sequence[int], rehearsal_from: int):
        self.store, self.order, self.rehearsal_from = store, order, rehearsal_from

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        idx = int(self.order[i])
        ex = self.store[idx]
        return {"input_ids": ex["input_ids"], "labels": ex["labels"],
                "rehearsal": _marks(idx, self.rehearsal_from, len(ex["input_ids"]))}


def _marks(index: int, rehearsal_from: int, length: int) -> list[int]:
    """One mark per token of the store's example ``index``: 1 for a rehearsal line."""
    return [int(index >= rehearsal_from)] * length


class PackedRows:
    """``rows[r]`` of a TokenStore as one item: the examples' tokens back to back, with their lengths."""

    def __init__(self, store: Any, rows: Sequence[Sequence[int]], rehearsal_from: int | None = None):
        self.store, self.rows, self.rehearsal_from = store, rows, rehearsal_from

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, r: int) -> dict[str, list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        seq_lens: list[int] = []
        marks: list[int] = []
        for i in self.rows[r]:
            ex = self.store[int(i)]
            ids.extend(ex["input_ids"])
            labels.append(IGNORE_INDEX)  # nothing before it predicts an example's first token
            labels.extend(ex["labels"][1:])
            seq_lens.append(len(ex["input_ids"]))
            if self.rehearsal_from is not None:
                marks.extend(_marks(int(i), self.rehearsal_from, len(ex["input_ids"])))
        item = {"input_ids": ids, "labels": labels, "seq_lens": seq_lens}
        return {**item, "rehearsal": marks} if self.rehearsal_from is not None else item


class PackedCollator(Collator):
    """Pads packed rows to the longest; adds ``position_ids`` (restarting per example) and
    ``segment_ids`` (1, 2, ... per example, 0 on padding). ``attention_mask`` stays 2D (1 = a real
    token) so token counts are right; ``packed_inputs`` turns it into the block-diagonal mask."""

    def __init__(self, pad_token_id: int):
        super().__init__(pad_token_id=pad_token_id)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(features)
        n, width = batch["input_ids"].shape
        positions = torch.zeros((n, width), dtype=torch.long)
        segments = torch.zeros((n, width), dtype=torch.long)
        for b, f in enumerate(features):
            start = 0
            for s, length in enumerate(f["seq_lens"], start=1):
                positions[b, start:start + length] = torch.arange(length)
                segments[b, start:start + length] = s
                start += length
            positions[b, start:] = torch.arange(width - start)  # padding: its own harmless positions
        return {**batch, "position_ids": positions, "segment_ids": segments}


def marked_only(batch: dict[str, Any], mask: torch.Tensor) -> dict[str, Any] | None:
    """The examples of a collated ``batch`` that ``mask`` marks (whole examples: the rehearsal lines), alone,
    as a batch of the same kind; None when none is marked. Their targets, in order, are the marked targets
    of ``batch``, so a pass over it (the rehearsal's teacher, model/loss.py) costs their tokens only.

    Packed rows and padding-free rows (``segment_ids``): the marked tokens of every row, one padding-free
    row, each example its own segment, positions unchanged. Padded rows (one example each): the marked
    rows, cut to the longest of them (padding is on the right)."""
    marked = mask.bool()
    if not bool(marked.any()):
        return None
    if "segment_ids" in batch:
        segments = batch["segment_ids"]
        key = torch.arange(segments.shape[0], device=segments.device)[:, None] * (int(segments.max()) + 1) + segments
        key = key[marked]
        renumbered = torch.cumsum(torch.cat([key.new_ones(1), (key[1:] != key[:-1]).long()]), 0)
        out = {k: batch[k][marked][None] for k in ("input_ids", "labels", "position_ids")}
        return {**out, "attention_mask": torch.ones_like(out["input_ids"]), "segment_ids": renumbered[None]}
    rows = marked.any(dim=1)
    width = int(batch["attention_mask"][rows].sum(dim=1).max())
    return {k: v[rows][:, :width] for k, v in batch.items()
            if k in ("input_ids", "labels", "attention_mask", "position_ids")}


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[batch, 1, length, length]`` boolean mask (True = may attend): causal within a segment.

    Padding (segment 0) attends causally to padding only, so no row of the mask is empty (an empty
    row gives NaN in SDPA, which would reach the gradients through 0 * NaN).
    """
    n = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(n, n, dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal)[:, None, :, :]


def boundaries(segments: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A single unpadded row's example boundaries ``[0, end_1, end_2, ...]`` (int32) and longest example."""
    _, lengths = torch.unique_consecutive(segments[0], return_counts=True)
    edges = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=segments.device)
    edges[1:] = torch.cumsum(lengths, 0)
    return edges, int(lengths.max())


def packed_inputs(inputs: dict[str, Any], attn_implementation: str | None,
                  dtype: torch.dtype = torch.float32, takes_boundaries: bool = False) -> dict[str, Any]:
    """Model inputs for a packed batch (unchanged for an unpacked one), for the model's attention kind.

    - ``takes_boundaries`` (FlashAttention varlen, model/attention.py's ``segmented_sdpa``) and one
      row without padding (a padding-free micro-batch): the examples' boundaries as
      ``cu_seq_lens_q/k`` and ``max_length_q/k``, the keywords transformers hands to the attention;
      no 4D mask. FlashAttention gets no mask at all (a 2D mask would make it unpad the row as one
      sequence); ``segmented_sdpa`` keeps the 2D mask of ones, so transformers builds none.
    - FlashAttention, several rows: no mask; transformers finds the examples from the restarting
      ``position_ids``.
    - SDPA / flex / others: the 4D boolean block-diagonal mask.
    - eager: the same mask as an additive float mask (eager adds the mask to the scores).
    """
    if "segment_ids" not in inputs:
        return inputs
    inputs = dict(inputs)
    segments = inputs.pop("segment_ids")
    flash = bool(attn_implementation) and "flash" in attn_implementation
    if takes_boundaries and segments.shape[0] == 1 and bool((segments > 0).all()):
        edges, longest = boundaries(segments)
        inputs.update(cu_seq_lens_q=edges, cu_seq_lens_k=edges, max_length_q=longest, max_length_k=longest)
        if flash:
            inputs.pop("attention_mask", None)
        return inputs
    if flash:
        inputs.pop("attention_mask", None)
        return inputs
    mask = block_causal_mask(segments)
    if attn_implementation == "eager":
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    inputs["attention_mask"] = mask
    return inputs
