"""Rendering through the tokenizer's chat template, and whether that template supports tools.

Tool support is read from the template itself: a probe conversation with one tool definition, one
tool call and one tool result is rendered, and each of the three must show up in the text. Templates
written for tools (Qwen2.5's, for one) render all three; a template without tool support (the
built-in SmolLM2's ChatML) drops the definitions and the call, which would train the model on a
conversation that is not the one in the file: such lines are skipped with a reason instead.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError as JinjaError

from ultimate_trainer.data.errors import BadLine

_PROBE_TOOL = "probe_tool_d41d8c"
_PROBE_CALL = "probe_call_8f00b2"
_PROBE_RESULT = "probe_result_04e980"
_support: dict[str, str | None] = {}  # chat template text -> None (supported) or what it lacks


def render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool,
           tools: list[dict[str, Any]] | None = None) -> str:
    kwargs = {"tools": tools} if tools else {}
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                            **kwargs)
    except (JinjaError, TypeError, KeyError, IndexError) as e:
        # The template refuses this conversation (raise_exception in the template, a role it does not know).
        raise BadLine(f"the model's chat template cannot render this conversation: {e}") from None
    if not isinstance(out, str):  # some versions hand back a list for a single conversation
        out = out[0]
    return out


def tool_support(tokenizer: Any) -> str | None:
    """None when the template renders tool definitions, calls and results; else what it leaves out."""
    template = getattr(tokenizer, "chat_template", None)
    key = template if isinstance(template, str) else repr(template)
    if key in _support:
        return _support[key]
    tools = [{"type": "function", "function": {"name": _PROBE_TOOL, "description": "probe",
                                               "parameters": {"type": "object", "properties": {}}}}]
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "",
             "tool_calls": [{"type": "function", "function": {"name": _PROBE_CALL, "arguments": {}}}]},
            {"role": "tool", "content": _PROBE_RESULT},
            {"role": "assistant", "content": "a"}]
    try:
        rendered = render(tokenizer, msgs, False, tools)
    except BadLine as e:
        _support[key] = f"it fails on tool turns ({e})"
        return _support[key]
    lacks = [what for what, probe in (("tool definitions", _PROBE_TOOL), ("tool calls", _PROBE_CALL),
                                      ("tool results", _PROBE_RESULT)) if probe not in rendered]
    _support[key] = f"it does not render {', '.join(lacks)}" if lacks else None
    return _support[key]


# ---------------------------------------------------------------- rendering without Jinja, where it is exact
#
# Most chat templates (ChatML: SmolLM2's, Qwen2.5's) render a plain conversation as fixed text around
# each message's content: a lead before the first message (which may hold a default system prompt),
# a gap between two messages that depends only on their two roles, and a tail after the last one.
# ``Concatenation`` learns those pieces from probe conversations, checks them on longer probes whose
# contents have leading/trailing whitespace, reasoning tags and template syntax (a template that
# trims, rewrites or branches on content fails them), and then renders by joining strings, several
# times faster than the Jinja template. encoding.render still compares it with the template on the
# first conversations and one in ``VERIFY_EVERY`` after, and drops it for good on a difference.

_FAST_ROLES = ("system", "user", "assistant")
_TRICKY = ("  padded answer \n", "<think>\nreasoning\n</think>\n\nanswer", "{{ braces }} {% raw %} <|im_end|>",
           "\ttabbed\n\n", "ünïcødé ✓ 中文")


class Concatenation:
    """A template's fixed pieces around message contents (see above); ``None`` from ``learn`` when it has none."""

    def __init__(self, lead: dict[str, str], gap: dict[tuple[str, str], str], tail: dict[str, str]):
        self.lead, self.gap, self.tail = lead, gap, tail
        self.rendered = 0
        self.trusted = True

    def render(self, messages: list[dict[str, Any]]) -> str | None:
        """The template's rendering (no generation prompt), or None for a conversation it does not cover."""
        parts = []
        prev = None
        for m in messages:
            role, content = m.get("role"), m.get("content")
            if len(m) != 2 or not isinstance(content, str) or not content:
                return None  # tool calls, names, empty turns: the template's own business
            piece = self.lead.get(role) if prev is None else self.gap.get((prev, role))
            if piece is None:
                return None
            parts.append(piece)
            parts.append(content)
            prev = role
        tail = self.tail.get(prev) if prev is not None else None
        if tail is None:
            return None
        parts.append(tail)
        return "".join(parts)

    @classmethod
    def learn(cls, tokenizer: Any) -> "Concatenation | None":
        lead: dict[str, str] = {}
        gap: dict[tuple[str, str], str] = {}
        tail: dict[str, str] = {}
        n = 0

        def probe(roles: tuple[str, ...]) -> bool:
            nonlocal n
            contents = []
            for _ in roles:
                n += 1
                contents.append(f"probe{n:03d}c7e1")
            try:
                out = render(tokenizer, [{"role": r, "content": c} for r, c in zip(roles, contents)], False)
            except BadLine:
                return True  # a conversation the template refuses: that role order stays unlearnt
            pieces, cursor = [], 0
            for c in contents:
                at = out.find(c, cursor)
                if at < 0:
                    return False
                pieces.append(out[cursor:at])
                cursor = at + len(c)
            pieces.append(out[cursor:])
            found = [(lead, roles[0], pieces[0]), (tail, roles[-1], pieces[-1])]
            found += [(gap, (a, b), p) for a, b, p in zip(roles, roles[1:], pieces[1:-1])]
            for table, key, piece in found:
                if table.setdefault(key, piece) != piece:  # type: ignore[attr-defined]
                    return False  # the same roles rendered two ways: the pieces depend on more than roles
            return True

        for first in _FAST_ROLES:
            if not probe((first,)):
                return None
            for second in _FAST_ROLES:
                if not probe((first, second)):
                    return None
        if not gap or not lead or not tail:
            return None
        shape = cls(lead, gap, tail)
        checks = [("system", "user", "assistant", "user", "assistant"), ("user", "assistant", "user", "assistant"),
                  ("user", "assistant"), ("system", "user", "assistant", "user", "assistant", "user", "assistant")]
        for roles in checks:
            msgs = [{"role": r, "content": _TRICKY[i % len(_TRICKY)]} for i, r in enumerate(roles)]
            predicted = shape.render(msgs)
            if predicted is None:
                continue  # an order the template refuses, or one not learnt
            try:
                if render(tokenizer, msgs, False) != predicted:
                    return None
            except BadLine:
                return None
        return shape


_concatenations: dict[str, Concatenation | None] = {}  # chat template text -> its pieces, None: Jinja only


def concatenation(tokenizer: Any) -> Concatenation | None:
    """The template's fixed pieces when it has them and they have not been caught wrong; else None."""
    template = getattr(tokenizer, "chat_template", None)
    key = template if isinstance(template, str) else repr(template)
    if key not in _concatenations:
        _concatenations[key] = None
        _concatenations[key] = Concatenation.learn(tokenizer)
    shape = _concatenations[key]
    return shape if shape is not None and shape.trusted else None
