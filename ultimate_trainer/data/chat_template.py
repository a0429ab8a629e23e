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
