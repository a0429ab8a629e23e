"""Batches of token-store examples as tensors: the only module of ``data/`` that needs torch."""

from __future__ import annotations

from typing import Any

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
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.as_tensor(f["labels"], dtype=torch.long)
            attention[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attention}
