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

import contextlib
import logging
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

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
                weights: torch.Tensor | None = None, distill: torch.Tensor | None = None,
                teacher_hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's summed loss and its plain summed cross-entropy, detached.

    Each target's loss is its cross-entropy, or where ``distill`` marks it, the KL divergence from the
    teacher's next-token distribution (``head`` over ``teacher_hidden``, no gradient); times ``weights``."""
    logits = head(hidden).float()
    if weights is None and distill is None:
        total = F.cross_entropy(logits, targets, reduction="sum")
        return total, total.detach()
    ce = F.cross_entropy(logits, targets, reduction="none")
    per = ce if distill is None else torch.where(distill, _teacher_kl(head, logits, teacher_hidden, distill), ce)
    if weights is not None:
        per = per * weights
    return per.sum(), ce.detach().sum()


def _teacher_kl(head: torch.nn.Module, logits: torch.Tensor, teacher_hidden: torch.Tensor,
                distill: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) at each row of ``logits`` (0 where ``distill`` is False): the teacher's
    logits are ``head`` over its hidden states at the marked rows (``teacher_hidden``, one per marked row),
    computed without gradient."""
    kl = logits.new_zeros(logits.shape[0])
    if not bool(distill.any()):
        return kl
    with torch.no_grad():
        teacher = F.log_softmax(head(teacher_hidden).float(), dim=-1)
    return kl.index_put((distill.nonzero(as_tuple=True)[0],), distillation_kl(logits[distill], teacher))


def distillation_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per row, over the vocabulary: the forward KL of knowledge distillation,
    zero exactly when the student's next-token distribution is the teacher's."""
    return F.kl_div(F.log_softmax(student_logits.float(), dim=-1), teacher_logprobs, log_target=True,
                    reduction="none").sum(-1)


def _normalized(total: torch.Tensor, targets: int, num_items_in_batch: Any) -> torch.Tensor:
    if num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, device=total.device, dtype=total.dtype)
    return total / max(targets, 1)


def has_teacher(model: Any) -> bool:
    """Whether ``model`` has an adapter to switch off, which makes it its own base: the teacher of the
    rehearsal's distillation."""
    return hasattr(getattr(model, "module", model), "disable_adapter")  # under DDP the module's


@contextlib.contextmanager
def teacher(model: Any) -> Iterator[None]:
    """Within it ``model`` is its own base (``has_teacher``: its adapter off), without gradient."""
    if not has_teacher(model):
        raise ValueError(f"{type(model).__name__} has no adapter to switch off: no base to distil from")
    with torch.no_grad(), getattr(model, "module", model).disable_adapter():
        yield


def weighted_causal_lm_loss(model: Any, inputs: dict[str, Any], token_weights: torch.Tensor | None,
                            num_items_in_batch: Any = None, chunked: bool = False,
                            chunk_tokens: int | None = None, distill_mask: torch.Tensor | None = None,
                            teacher_inputs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, plain)``: the loss with each target token's cross-entropy times ``token_weights`` (the
    weight at the target's own position, shaped like ``labels``), and the plain loss (every target's
    cross-entropy, unweighted), detached.

    ``distill_mask`` (shaped like ``labels``, 1 on the rehearsal lines): a marked target is trained
    towards the base's whole next-token distribution, not its one token: its loss is the KL divergence
    from the model with its adapter off (``teacher``), run once more without gradient, on
    ``teacher_inputs`` when given (the marked examples alone, data/collate.py ``marked_only``: their
    targets, in order, are the marked targets of ``inputs``), else on the whole batch.

    ``chunked``: through ``chunked_causal_lm_loss``; else through the model's own forward (which DDP and
    the other wrappers need: the chunked loss calls the model's parts), its logits then the loss.
    Both are normalised like the model's loss; weights of 1 and no mask give the model's loss."""
    if distill_mask is not None and not bool((distill_mask[:, 1:].bool() & (inputs["labels"][:, 1:] != IGNORE_INDEX)).any()):
        distill_mask = None  # no rehearsal target in this batch: no teacher pass
    if chunked:
        return _chunked(model, inputs, num_items_in_batch, chunk_tokens, token_weights, distill_mask, teacher_inputs)
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = logits[keep]  # [tokens with a target, vocabulary]
    ce = F.cross_entropy(logits.float(), targets[keep], reduction="none")
    per = ce
    if distill_mask is not None:
        distill = distill_mask[:, 1:].bool()[keep]
        inner = getattr(model, "module", model)  # past any DDP wrapper: the teacher has no gradient to synchronise
        lm = _causal_lm(inner)
        if supports_chunked_loss(inner):  # its body, then lm_head over the marked targets alone
            teacher_logits = lm.get_output_embeddings()(_teacher_states(model, lm.get_decoder(), inputs, labels,
                                                                        distill, teacher_inputs))
        else:
            teacher_logits = _teacher_states(model, inner, inputs, labels, distill, teacher_inputs, logits=True)
        kl = distillation_kl(logits[distill], F.log_softmax(teacher_logits.float(), dim=-1))
        per = ce.index_put((distill.nonzero(as_tuple=True)[0],), kl)
    if token_weights is not None:
        per = per * token_weights[:, 1:].to(torch.float32)[keep]
    n = int(keep.sum())
    return (_normalized(per.sum(), n, num_items_in_batch),
            _normalized(ce.detach().sum(), n, num_items_in_batch))


def _teacher_states(model: Any, part: Any, inputs: dict[str, Any], labels: torch.Tensor, distill: torch.Tensor,
                    teacher_inputs: dict[str, Any] | None, logits: bool = False) -> torch.Tensor:
    """The teacher's last hidden states (``logits``: its logits) at the marked targets, in order: ``part``
    (the decoder body, or the whole model for ``logits``) run under ``teacher(model)`` on ``teacher_inputs``
    (whose targets are the marked ones), else on ``inputs`` (``labels`` theirs), then the marked targets kept.
    Should ``teacher_inputs`` hold another number of targets than ``distill`` marks, the whole batch runs."""
    def run(batch: dict[str, Any], batch_labels: torch.Tensor) -> torch.Tensor:
        batch = {k: v for k, v in batch.items() if k != "labels" and (logits or k in BODY_INPUTS)}
        with teacher(model):
            out = part(**batch, use_cache=False)
        return (out.logits if logits else out.last_hidden_state)[:, :-1][batch_labels[:, 1:] != IGNORE_INDEX]

    wanted = int(distill.sum())
    if teacher_inputs is not None:
        states = run(teacher_inputs, teacher_inputs["labels"])
        if states.shape[0] == wanted:
            return states
        log.warning("rehearsal distillation: the rehearsal lines alone hold %d targets, the batch marks %d; the "
                    "teacher runs on the whole batch", states.shape[0], wanted)
    return run(inputs, labels)[distill]


def chunked_causal_lm_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None,
                           chunk_tokens: int | None = None, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of ``model`` on ``inputs`` (``input_ids``, ``labels``, masks, ``position_ids``);
    ``token_weights`` (shaped like ``labels``): each target's cross-entropy times the weight at its position."""
    return _chunked(model, inputs, num_items_in_batch, chunk_tokens, token_weights)[0]


def _chunked(model: Any, inputs: dict[str, Any], num_items_in_batch: Any, chunk_tokens: int | None,
             token_weights: torch.Tensor | None, distill_mask: torch.Tensor | None = None,
             teacher_inputs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``chunked_causal_lm_loss`` (with ``weighted_causal_lm_loss``'s distillation) and the plain loss."""
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
    distill = teacher_hidden = None
    if distill_mask is not None:
        distill = distill_mask[:, 1:].bool()[keep]
        teacher_hidden = _teacher_states(model, lm.get_decoder(), inputs, labels, distill, teacher_inputs)
    if chunk_tokens is None:
        chunk_tokens = max(64, CHUNK_ELEMENTS // head.weight.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)
    unweighted = hidden.new_zeros((), dtype=torch.float32)
    taught = 0  # marked targets before this chunk: where its rows of teacher_hidden start
    for start in range(0, targets.shape[0], chunk_tokens):
        part_of = slice(start, start + chunk_tokens)
        marked = None if distill is None else distill[part_of]
        n_marked = 0 if marked is None else int(marked.sum())
        args = (head, hidden[part_of], targets[part_of], None if weights is None else weights[part_of],
                marked, None if teacher_hidden is None else teacher_hidden[taught:taught + n_marked])
        taught += n_marked
        part = checkpoint(_chunk_loss, *args, use_reentrant=False) if torch.is_grad_enabled() else _chunk_loss(*args)
        total = total + part[0]
        unweighted = unweighted + part[1]
    plain = _normalized(unweighted, targets.shape[0], num_items_in_batch)
    if targets.shape[0] == 0:
        return total + hidden.sum() * 0.0, plain  # no target: a zero loss that still belongs to the graph
    return _normalized(total, targets.shape[0], num_items_in_batch), plain
