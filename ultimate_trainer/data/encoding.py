"""Examples -> token ids and labels, with the loss only on what the source format says is trained.

The conversation is rendered with the tokenizer's own chat template (tool definitions passed as its
``tools``; ``chat_template.tool_support`` says whether it renders them). Each trained turn's character
span is found by rendering prefixes: for an assistant turn ``messages[:i]`` with the generation
prompt ends where the answer starts, ``messages[:i+1]`` ends where it stops (its end-of-turn token,
e.g. ``<|im_end|>``, included, trailing whitespace after it not). Both renders must be prefixes of the
full rendering, or the template is not prefix-stable and the spans would be wrong: that is a
``TemplateError``. Which turns are trained is ``Example.target``: assistant turns by default, OpenAI
``weight`` and Axolotl ``train`` per turn, and Axolotl ``train_detail`` character ranges, placed where
the turn's text sits in the rendering. The full text is then tokenized once (a whole chunk per
tokenizer call) with character offsets, and a token is trained on (label = its id) when it starts
inside a trained span; every other token gets label -100.

``text`` examples have no template and no roles: their text plus the EOS token is trained on whole.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from ultimate_trainer.data.chat_template import render as render_chat, tool_support
from ultimate_trainer.data.formats import BadLine, Example

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class TemplateError(RuntimeError):
    """The tokenizer's chat template cannot be used to locate assistant turns."""


def _span(tokenizer: Any, example: Example, full: str, i: int) -> tuple[int, int]:
    """Where turn ``i`` sits in ``full``: for an assistant turn, from just after its header; for any other
    turn, from the end of the previous turn; to its end-of-turn token included."""
    msgs, tools = example.messages, example.tools
    if msgs[i]["role"] == "assistant":
        start_text = render_chat(tokenizer, msgs[:i], True, tools)
    else:
        start_text = render_chat(tokenizer, msgs[:i], False, tools) if i else ""
    end_text = full if i + 1 == len(msgs) else render_chat(tokenizer, msgs[: i + 1], False, tools)
    if not full.startswith(start_text) or not full.startswith(end_text) or len(end_text) < len(start_text):
        raise TemplateError(
            f"{example.source or 'example'}: the chat template is not prefix-stable (rendering the first "
            f"{i} messages is not a prefix of the whole conversation), so assistant turns cannot be located"
        )
    return len(start_text), max(len(end_text.rstrip()), len(start_text))


def render(tokenizer: Any, example: Example) -> tuple[str, list[tuple[int, int]]]:
    """The text to tokenize and the character spans that carry the loss."""
    if example.is_text:
        return example.messages[0]["content"], [(0, len(example.messages[0]["content"]))]
    if getattr(tokenizer, "chat_template", None) is None:
        raise TemplateError("the tokenizer has no chat template; only {\"text\"} examples can be used with it")
    if example.uses_tools:
        lacks = tool_support(tokenizer)
        if lacks:
            raise BadLine(f"{_tool_use(example)}, but the model's chat template has no tool support ({lacks})")
    msgs = example.messages
    full = render_chat(tokenizer, msgs, False, example.tools)
    spans = []
    for i, m in enumerate(msgs):
        target = example.target(i)
        if not target:
            continue
        start, end = _span(tokenizer, example, full, i)
        if target is True and m["role"] == "assistant":
            spans.append((start, end))
            continue
        # A trained non-assistant turn (Axolotl's train: true) or character ranges (train_detail): place
        # the turn's own text inside its rendering, so the role header stays untrained.
        content = m["content"]
        at = full.find(content, start, end) if content else -1
        if at < 0:
            raise BadLine(f"a trained {m['role']} turn ({content[:30]!r}) does not appear verbatim in the chat "
                          f"template's rendering, so its trained part cannot be placed")
        if target is True:
            spans.append((at, end))
            continue
        spans.extend((at + a, at + b) for a, b in target)
        if target and target[-1][1] == len(content):
            spans.append((at + len(content), end))  # the last character is trained: so is the end of turn
    return full, spans


def _tool_use(example: Example) -> str:
    if example.tools:
        return "the line defines tools"
    for i, m in enumerate(example.messages, 1):
        if m.get("tool_calls"):
            return f"message {i} is a tool call"
        if m["role"] == "tool":
            return f"message {i} is a tool result"
    return "the line uses tools"


def _mask_from_offsets(offsets: Sequence[Sequence[int]], spans: list[tuple[int, int]]) -> np.ndarray:
    starts = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(offsets))
    ends = np.fromiter((o[1] for o in offsets), dtype=np.int64, count=len(offsets))
    mask = np.zeros(len(offsets), dtype=bool)
    for a, b in spans:
        mask |= (starts >= a) & (starts < b) & (ends > starts)
    return mask


def _finish(
    ids: list[int], mask: np.ndarray, max_len: int, overlong: str
) -> tuple[list[int], list[int]]:
    if len(ids) > max_len:
        if overlong == "skip":
            raise BadLine(f"over-long: {len(ids)} tokens > max_seq_length {max_len}")
        ids, mask = ids[:max_len], mask[:max_len]
    if not mask.any():
        raise BadLine(
            f"over-long: no assistant token within max_seq_length {max_len}" if len(mask) == max_len
            else "no assistant token after tokenization"
        )
    labels = np.where(mask, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()
    return list(ids), labels


def encode_batch(
    tokenizer: Any, examples: Sequence[Example], max_len: int, overlong: str
) -> list[tuple[list[int], list[int]] | BadLine]:
    """Encode many examples with one tokenizer call; a failing example yields its BadLine in place."""
    results: list[Any] = [None] * len(examples)
    texts, spans, where = [], [], []
    for i, ex in enumerate(examples):
        try:
            text, sp = render(tokenizer, ex)
        except BadLine as e:
            results[i] = e
            continue
        texts.append(text)
        spans.append(sp)
        where.append(i)
    if texts:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        eos = tokenizer.eos_token_id
        for j, i in enumerate(where):
            ids = list(enc["input_ids"][j])
            mask = _mask_from_offsets(enc["offset_mapping"][j], spans[j])
            if examples[i].is_text and eos is not None:
                # So a model trained on raw text also learns where a document stops.
                ids.append(eos)
                mask = np.append(mask, True)
            try:
                results[i] = _finish(ids, mask, max_len, overlong)
            except BadLine as e:
                results[i] = e
    return results


def encode(tokenizer: Any, example: Example, max_len: int, overlong: str) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one example; labels are -100 except on assistant tokens."""
    (result,) = encode_batch(tokenizer, [example], max_len, overlong)
    if isinstance(result, BadLine):
        raise result
    return result
