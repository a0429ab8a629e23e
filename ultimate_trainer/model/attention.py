"""Attention over padding-free batches: each example attends to itself only, at the cost of itself only.

A padding-free micro-batch is one row holding its examples back to back (data/collate.py). The row
must not let an example see another, and it should not pay for the ``length x length`` scores
across examples either. FlashAttention-2's varlen kernel does both on CUDA when ``flash_attn`` is
installed; everywhere else this module registers ``segmented_sdpa`` with transformers'
``AttentionInterface``: given the row's example boundaries (``cu_seq_lens_q``, the same keyword
the FlashAttention path reads), it runs PyTorch's own ``scaled_dot_product_attention`` once per
example with ``is_causal=True``. That is exactly the attention of the example alone (so no mask
is built), its cost is ``sum(len_i^2)`` instead of ``(sum len_i)^2``, and causal SDPA without a
mask may use the fused kernels (flash / memory-efficient on CUDA, the flash kernel on the CPU)
that keep no ``heads x length x length`` weights for the backward pass.

A sliding window (Mistral, Qwen2 when enabled) is honoured inside each example. Without
boundaries (generation, a padded batch, validation rows with a 4D mask) it is transformers' SDPA
forward, unchanged, with the mask transformers built: the model behaves as under ``sdpa``
everywhere else. Soft-capping and position biases are refused with boundaries (no model that
runs on SDPA has them).

The padding-free row keeps its 2D ``attention_mask`` of ones: transformers then sees one unpadded,
causal sequence and builds no ``length x length`` mask at all.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

SEGMENTED = "segmented_sdpa"
_registered = False


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[b, kv_heads, L, d]`` -> ``[b, kv_heads * n_rep, L, d]`` (grouped-query attention)."""
    if n_rep == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


def segmented_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; ``query`` is ``[batch, heads, length, head_dim]``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("output_attentions") or kwargs.get("position_bias") is not None:
        raise ValueError("segmented_sdpa: soft-capping, position bias and attention weights need another attention "
                         "kind; set training.packing to \"off\" for this model")
    window = kwargs.get("sliding_window")
    n_rep = query.shape[1] // key.shape[1]
    edges = [int(e) for e in bounds.tolist()]
    parts = []
    for a, b in zip(edges[:-1], edges[1:]):
        if b <= a:
            continue
        q, k, v = query[:, :, a:b], _repeat_kv(key[:, :, a:b], n_rep), _repeat_kv(value[:, :, a:b], n_rep)
        if window and b - a > window:  # causal and at most ``window`` tokens back, as transformers masks it
            i = torch.arange(b - a, device=q.device)
            band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
            parts.append(F.scaled_dot_product_attention(q, k, v, attn_mask=band, dropout_p=dropout, scale=scaling))
        else:
            parts.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling))
    out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``segmented_sdpa`` known to transformers (attention and mask interfaces); idempotent."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SEGMENTED, segmented_sdpa)
    AttentionMaskInterface.register(SEGMENTED, sdpa_mask)  # masks exactly as for sdpa when no boundaries
    _registered = True


def takes_boundaries(attn_implementation: str | None) -> bool:
    """Whether the attention kind isolates examples from ``cu_seq_lens_q`` alone (no 4D mask needed)."""
    return bool(attn_implementation) and (attn_implementation == SEGMENTED or "flash" in attn_implementation)


def use_segmented(model: Any) -> None:
    """Switch a model on PyTorch SDPA to ``segmented_sdpa`` (FlashAttention and eager stay as they are)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return
    register()
    model.set_attn_implementation(SEGMENTED)
