"""One JSONL line -> one ``Example``: format detection, validation and normalisation to chat messages.

Every problem with a line raises ``BadLine`` with a short, specific reason; the reader in ``data.py``
turns it into a ``file:line: reason`` entry of the file's report and goes on with the next line.

Formats (detected per line, first match wins, extra keys are ignored):

============== ==================================================== ==============================
fmt            shape                                                becomes
============== ==================================================== ==============================
chat           ``{"messages": [{"role", "content"}, ...]}``         the messages as they are
sharegpt       ``{"conversations": [{"from", "value"}, ...]}``      human/user->user, gpt/assistant/
                                                                    model->assistant, system->system
prompt_response ``{"prompt", "response"}`` or ``{"prompt",           user prompt, assistant answer
               "completion"}``
alpaca         ``{"instruction", "input", "output"}``               user = instruction (+ blank line
                                                                    + input), assistant = output
text           ``{"text"}``                                         no roles: trained on as plain text
============== ==================================================== ==============================
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

FORMATS = ("chat", "sharegpt", "prompt_response", "alpaca", "text")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}


class BadLine(ValueError):
    """A line that cannot be used; ``str(exc)`` is the one-line reason shown in the report."""


@dataclass
class Example:
    """One usable training or evaluation example.

    ``messages`` are normalised chat turns (roles system/user/assistant, a system turn first). For the
    ``text`` format ``messages`` is a single ``{"role": "text", "content": ...}`` entry: no chat
    template is applied to it.
    """

    messages: list[dict[str, str]]
    fmt: str
    metadata: dict[str, Any] | None = None
    source: str = ""
    line: int = 0
    heldout: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    skill: str | None = None  # metadata.skill: accuracy is also broken down by it

    def __post_init__(self) -> None:
        if self.skill is None and self.metadata:
            skill = self.metadata.get("skill")
            self.skill = (skill.strip() or None) if isinstance(skill, str) else None

    @property
    def is_text(self) -> bool:
        return self.fmt == "text"

    def _last_assistant(self) -> int:
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i]["role"] == "assistant":
                return i
        raise ValueError(f"{self.source}: example has no assistant turn")

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """Everything before the last assistant turn: what the model is asked at evaluation."""
        return self.messages[: self._last_assistant()]

    @property
    def expected(self) -> str:
        """The last assistant turn: the answer an evaluation compares against."""
        return self.messages[self._last_assistant()]["content"]

    @property
    def prompt_text(self) -> str:
        """The last user turn, for display in reports and the monitor."""
        for m in reversed(self.prompt_messages):
            if m["role"] == "user":
                return m["content"]
        return ""


def _keys(obj: dict) -> str:
    keys = sorted(str(k) for k in obj)
    shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
    return shown or "none"


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadLine(f"{what} is not a string (got {type(value).__name__})")
    return value


def _from_chat(obj: dict) -> list[dict[str, str]]:
    msgs = obj["messages"]
    if not isinstance(msgs, list):
        raise BadLine(f"messages is not a list (got {type(msgs).__name__})")
    out = []
    for i, m in enumerate(msgs, 1):
        if not isinstance(m, dict):
            raise BadLine(f"message {i} is not an object")
        role = m.get("role")
        if role not in ROLES:
            raise BadLine(f"message {i}: unknown role {json.dumps(role)[:40]}")
        out.append({"role": role, "content": _text(m.get("content"), f"message {i} content")})
    return out


def _from_sharegpt(obj: dict) -> list[dict[str, str]]:
    turns = obj["conversations"]
    if not isinstance(turns, list):
        raise BadLine(f"conversations is not a list (got {type(turns).__name__})")
    out = []
    for i, t in enumerate(turns, 1):
        if not isinstance(t, dict):
            raise BadLine(f"turn {i} is not an object")
        who = t.get("from")
        role = SHAREGPT_ROLES.get(who.lower()) if isinstance(who, str) else None
        if role is None:
            raise BadLine(f"turn {i}: unknown speaker {json.dumps(who)[:40]}")
        out.append({"role": role, "content": _text(t.get("value"), f"turn {i} value")})
    return out


def _from_prompt_response(obj: dict) -> list[dict[str, str]]:
    answer_key = "response" if "response" in obj else "completion"
    return [
        {"role": "user", "content": _text(obj["prompt"], "prompt")},
        {"role": "assistant", "content": _text(obj[answer_key], answer_key)},
    ]


def _from_alpaca(obj: dict) -> list[dict[str, str]]:
    instruction = _text(obj["instruction"], "instruction")
    extra = obj.get("input")
    extra = "" if extra is None else _text(extra, "input")
    user = instruction + ("\n\n" + extra if extra.strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": _text(obj["output"], "output")}]


def detect_format(obj: dict) -> str:
    """The format name of a parsed line; BadLine when no known shape fits."""
    if "messages" in obj:
        return "chat"
    if "conversations" in obj:
        return "sharegpt"
    if "prompt" in obj and ("response" in obj or "completion" in obj):
        return "prompt_response"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "text" in obj:
        return "text"
    raise BadLine(f"unknown shape (keys: {_keys(obj)})")


def _check_turns(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last < 0:
        raise BadLine("no assistant turn")
    for i, m in enumerate(messages[: last + 1], 1):
        if m["role"] == "assistant" and not m["content"].strip():
            raise BadLine("empty assistant turn" + (f" (message {i})" if i != last + 1 else ""))
    if not any(m["role"] == "user" for m in messages[:last]):
        raise BadLine("no user turn before the assistant turn")
    # Turns after the last answer teach nothing (they would be masked): drop them.
    return messages[: last + 1]


def parse_line(raw: bytes, system_prompt: str, max_line_bytes: int | None = None) -> Example:
    """Parse one raw JSONL line (without caring about its newline) into an Example, or raise BadLine."""
    if max_line_bytes is not None and len(raw) > max_line_bytes:
        raise BadLine(f"line longer than {max_line_bytes} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine(f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadLine(f"invalid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise BadLine("invalid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise BadLine(f"not a JSON object (got {type(obj).__name__})")
    fmt = detect_format(obj)
    metadata = obj.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise BadLine(f"metadata is not an object (got {type(metadata).__name__})")
    if fmt == "text":
        content = _text(obj["text"], "text")
        if not content.strip():
            raise BadLine("empty text")
        return Example([{"role": "text", "content": content}], fmt, metadata)
    messages = {
        "chat": _from_chat,
        "sharegpt": _from_sharegpt,
        "prompt_response": _from_prompt_response,
        "alpaca": _from_alpaca,
    }[fmt](obj)
    messages = _check_turns(messages)
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return Example(messages, fmt, metadata)
