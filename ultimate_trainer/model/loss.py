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


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's summed cross-entropy (times ``weights``), and its plain sum, detached."""
    if weights is None:
        total = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
        return total, total.detach()
    ce = F.cross_entropy(head(hidden).float(), targets, reduction="none")
    return (ce * weights).sum(), ce.detach().sum()


def _normalized(total: torch.Tensor, targets: int, num_items_in_batch: Any) -> torch.Tensor:
    if num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, device=total.device, dtype=total.dtype)
    return total / max(targets, 1)


def weighted_causal_lm_loss(model: Any, inputs: dict[str, Any], token_weights: torch.Tensor,
                            num_items_in_batch: Any = None, chunked: bool = False,
                            chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, plain)``: the loss with each target token's cross-entropy times ``token_weights`` (the
    weight at the target's own position, shaped like ``labels``), and the same loss unweighted, detached.

    ``chunked``: through ``chunked_causal_lm_loss``; else through the model's own forward (which DDP and
    the other wrappers need: the chunked loss calls the model's parts), its logits then cross-entropy.
    Both are normalised like the model's loss; weights of 1 give the model's loss."""
    if chunked:
        return _chunked(model, inputs, num_items_in_batch, chunk_tokens, token_weights)
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    targets, weights = labels[:, 1:], token_weights[:, 1:].to(torch.float32)
    keep = targets != IGNORE_INDEX
    ce = F.cross_entropy(logits[keep].float(), targets[keep], reduction="none")
    n = int(keep.sum())
    return (_normalized((ce * weights[keep]).sum(), n, num_items_in_batch),
            _normalized(ce.detach().sum(), n, num_items_in_batch))


def chunked_causal_lm_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None,
                           chunk_tokens: int | None = None, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of ``model`` on ``inputs`` (``input_ids``, ``labels``, masks, ``position_ids``);
    ``token_weights`` (shaped like ``labels``): each target's cross-entropy times the weight at its position."""
    return _chunked(model, inputs, num_items_in_batch, chunk_tokens, token_weights)[0]


def _chunked(model: Any, inputs: dict[str, Any], num_items_in_batch: Any, chunk_tokens: int | None,
             token_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``chunked_causal_lm_loss`` and the same loss unweighted, detached."""
    lm = _causal_lm(model)
    head = lm.get_output_embeddings()
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    body_inputs = {k: v for k, v in inputs.items() if k in BODY_INPUTS}
    hidden = lm.get_decoder()(**body_inputs, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[:, :-1][keep], targets[keep]  # [tokens with a target, hidden], [tokens]
    weights = token_weights[:, 1:][keep].to(torch.float32) if token_weights is not None else None
    if chunk_tokens is None:
        chunk_tokens = max(64, CHUNK_ELEMENTS // head.weight.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)
    unweighted = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.shape[0], chunk_tokens):
        h, t = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        w = weights[start:start + chunk_tokens] if weights is not None else None
        if torch.is_grad_enabled():
            part = checkpoint(_chunk_loss, head, h, t, w, use_reentrant=False)
        else:
            part = _chunk_loss(head, h, t, w)
        total = total + part[0]
        unweighted = unweighted + part[1]
    plain = _normalized(unweighted, targets.shape[0], num_items_in_batch)
    if targets.shape[0] == 0:
        return total + hidden.sum() * 0.0, plain  # no target: a zero loss that still belongs to the graph
    return _normalized(total, targets.shape[0], num_items_in_batch), plain
