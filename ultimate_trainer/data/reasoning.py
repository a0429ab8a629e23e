"""Reasoning traces: how an assistant turn's reasoning reaches the text that is trained, per base.

Sources write reasoning many ways (``reasoning_content`` as DeepSeek-R1, Qwen3 and OpenAI-style
exports do, ``thinking``, ``reasoning``, reasoning/thinking content parts, an answer that starts with
``<think>...</think>``); data/turns.py reads them all into the message's ``reasoning_content``.

What the model sees depends on its chat template, decided once per template by a probe (an
assistant turn carrying a probe reasoning under each field name in turn):

- the template renders one of the fields (``reasoning_content`` for Qwen3-style templates,
  ``thinking`` for others): the reasoning is handed to it under that field, so it is rendered
  exactly as the model was trained to see it;
- it renders none (the built-in SmolLM2's ChatML, Qwen2.5's): one convention, the reasoning as a
  ``<think>`` block before the answer, ``"<think>\\n" + reasoning + "\\n</think>\\n\\n" + answer``, as the
  turn's content.

Either way the reasoning is trained with the answer unless the source marks it otherwise (a
reasoning part with ``"train": false``); ``convention()`` names the choice, recorded in each file's
report (``reasoning.rendered_as``) and in ``train.py --dry-run``'s summary. A template that leaves a
trained turn's reasoning out of its rendering (one that strips ``<think>`` blocks from answers, as
DeepSeek-R1's does) makes that line bad (``check_rendered``): an answer is never trained without its
reasoning silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ultimate_trainer.data.chat_template import render
from ultimate_trainer.data.errors import BadLine
from ultimate_trainer.data.formats import Example
from ultimate_trainer.data.turns import REASONING_FIELDS

THINK_OPEN = "<think>\n"
THINK_CLOSE = "\n</think>\n\n"
_PROBE_R, _PROBE_A = "probe reasoning 3a7d1e", "probe answer 6c1e0b"
_fields: dict[str, str | None] = {}  # chat template text -> the field it renders reasoning from, or None


def template_field(tokenizer: Any) -> str | None:
    """The message field the tokenizer's chat template renders reasoning from, or None when it renders none."""
    template = getattr(tokenizer, "chat_template", None)
    key = template if isinstance(template, str) else repr(template)
    if key not in _fields:
        _fields[key] = None
        for name in REASONING_FIELDS:
            msgs = [{"role": "user", "content": "probe question"},
                    {"role": "assistant", "content": _PROBE_A, name: _PROBE_R}]
            try:
                out = render(tokenizer, msgs, False)
            except BadLine:
                continue
            if _PROBE_R in out and _PROBE_A in out:
                _fields[key] = name
                break
    return _fields[key]


def convention(tokenizer: Any) -> str:
    """How reasoning is rendered for this tokenizer, in words (recorded in reports and the dry run)."""
    name = template_field(tokenizer)
    if name is not None:
        return f"by the model's chat template (its {name} field)"
    return ("as a <think> block before the answer (\"<think>\\n\" + reasoning + \"\\n</think>\\n\\n\" + answer): "
            "the model's chat template renders no reasoning")


def for_template(tokenizer: Any, example: Example) -> Example:
    """The example as it is rendered for this tokenizer: reasoning under the template's field, or folded
    into the content with the ``<think>`` convention (the targets moved to match)."""
    if example.is_text or not example.has_reasoning:
        return example
    name = template_field(tokenizer)
    messages, targets = [], []
    for i, m in enumerate(example.messages):
        target = example.target(i)
        r = m.get("reasoning_content")
        if not r:
            messages.append(m)
            targets.append(target)
            continue
        rest = {k: v for k, v in m.items() if k != "reasoning_content"}
        if name is not None:
            rest[name] = r
            messages.append(rest)
            targets.append(target)
            continue
        block = THINK_OPEN + r + THINK_CLOSE
        content = rest["content"]
        rest["content"] = block + content
        messages.append(rest)
        reasoning_on = i not in example.reasoning_off
        if isinstance(target, list):
            moved = [(a + len(block), b + len(block)) for a, b in target]
            targets.append(([(0, len(block))] if reasoning_on else []) + moved)
        elif (target if target is not None else m["role"] == "assistant") and not reasoning_on:
            targets.append([(len(block), len(block) + len(content))] if content else [])
        else:
            targets.append(target)
    texts = {i: m["reasoning_content"] for i, m in enumerate(example.messages) if m.get("reasoning_content")}
    extra = dict(example.extra, reasoning_field=name, reasoning_texts=texts)
    return dataclasses.replace(example, messages=messages, targets=targets, extra=extra)


def left_out(i: int) -> str:
    return (f"message {i + 1}'s reasoning is not in the model's chat template's rendering of it (the template "
            f"leaves it out), so the answer would be trained without it")


def check_rendered(example: Example, full: str) -> None:
    """BadLine when a trained turn's reasoning is not in the rendering (a template that strips ``<think>``
    blocks from answers, DeepSeek-R1's for one): never train the answer without its reasoning silently."""
    for i, text in example.extra.get("reasoning_texts", {}).items():
        if example.target(i) and text.strip() not in full:
            raise BadLine(left_out(i))
