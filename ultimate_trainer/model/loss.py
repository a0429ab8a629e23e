"""The causal-LM loss without ``batch x length x vocabulary`` logits.

A causal LM's forward ends with ``lm_head`` over every position, then cross-entropy over the
positions that have a label. The logits are the largest tensor of a step: Qwen2.5's 152k-token
vocabulary makes them ~1.25 GB in fp32 for one 2,048-token row, and autograd keeps them (and
their softmax) until backward. Here the model's body runs as usual; then only the positions whose
next token is a target go through ``lm_head`` and cross-entropy, a chunk of tokens at a time, each
chunk under activation checkpointing, so at most one chunk's logits exist at any moment, in
forward and in backward. Prompt tokens (label -100) never reach ``lm_head`` at all.

The result equals the model's own loss (sum of per-token cross-entropy over targets, divided by
``num_items_in_batch`` when the Trainer gives it, else the mean), gradients included.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 26  # logits elements per chunk (256 MB in fp32) whatever the vocabulary
# Architectures whose logits are exactly lm_head(last hidden state): no soft-capping, no scaling,
# no auxiliary loss. Others keep the model's own loss.
SUPPORTED = {"llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "olmo2", "smollm3"}


# What the decoder body takes; the ``cu_seq_lens``/``max_length`` keywords reach the attention (padding-free rows).
BODY_INPUTS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds",
               "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _causal_lm(model: Any) -> Any:
    """The ``*ForCausalLM`` module under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_chunked_loss(model: Any) -> bool:
    lm = _causal_lm(model)
    config = getattr(lm, "config", None)
    return (getattr(config, "model_type", None) in SUPPORTED and hasattr(lm, "get_decoder")
            and lm.get_output_embeddings() is not None)


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_causal_lm_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None,
                           chunk_tokens: int | None = None) -> torch.Tensor:
    """The loss of ``model`` on ``inputs`` (``input_ids``, ``labels``, masks, ``position_ids``)."""
    lm = _causal_lm(model)
    head = lm.get_output_embeddings()
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    body_inputs = {k: v for k, v in inputs.items() if k in BODY_INPUTS}
    hidden = lm.get_decoder()(**body_inputs, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[:, :-1][keep], targets[keep]  # [tokens with a target, hidden], [tokens]
    if chunk_tokens is None:
        chunk_tokens = max(64, CHUNK_ELEMENTS // head.weight.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.shape[0], chunk_tokens):
        h, t = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, h, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, t)
    if targets.shape[0] == 0:
        return total + hidden.sum() * 0.0  # no target: a zero loss that still belongs to the graph
    if num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, device=total.device, dtype=total.dtype)
    return total / targets.shape[0]
