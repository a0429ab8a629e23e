"""One record (a JSONL line or a JSON array item) -> one ``Example``: shape detection and normalisation.

Every problem with a record raises ``BadLine`` with a short, specific reason; ``prepare`` turns it into
a ``file:line: reason`` entry of the file's report and goes on with the next record.

Shapes (detected per record, first match wins, extra keys are ignored; docs/DATA.md has the table
by source tool, with what carries the loss):

=============== ============================================================ ================================
fmt             shape                                                        becomes
=============== ============================================================ ================================
chat            ``{"messages": [{"role", "content"}, ...], "tools"}``        the messages (OpenAI, TRL, Axolotl)
sharegpt        ``{"conversations": [{"from", "value"}, ...], "system",      the turns, ``system`` first
                "tools"}``
preference      ``{"prompt"?, "chosen", "rejected"}`` (DPO, ORPO)            SFT on prompt + ``chosen``
prompt_response ``{"prompt", "completion" | "response"}`` (strings or        prompt turns (never trained),
                message lists; KTO adds ``label``)                           then the completion
alpaca          ``{"instruction", "input", "output", "system", "history"}``  system, history pairs, then
                                                                             instruction (+ input) / output
text            ``{"text"}``                                                 no roles: trained as plain text
=============== ============================================================ ================================

Any record may carry a top-level ``system`` string (used when no system turn is given) and
``metadata`` (an object; ``metadata.skill`` is kept as ``Example.skill``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from ultimate_trainer.data.errors import BadLine
from ultimate_trainer.data.turns import (
    MEDIA_PLACEHOLDER, TEMPLATE_PLACEHOLDER, Target, content_text, media_field, text, tools_list, turn,
)

__all__ = ["BadLine", "Example", "FORMATS", "decode_line", "detect_format", "parse_line", "parse_record"]

log = logging.getLogger(__name__)

FORMATS = ("chat", "sharegpt", "preference", "prompt_response", "alpaca", "text")
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Example:
    """One usable training or evaluation example.

    ``messages`` are normalised chat turns (see ``turns``), a system turn first when there is one. For
    the ``text`` format ``messages`` is a single ``{"role": "text", "content": ...}`` entry: no chat
    template is applied to it. ``targets`` (one per message, or empty for "assistant turns only")
    says what carries the loss; ``tools`` are the tool definitions handed to the chat template.
    """

    messages: list[dict[str, Any]]
    fmt: str
    metadata: dict[str, Any] | None = None
    source: str = ""
    line: int = 0
    heldout: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None
    targets: list[Target] = field(default_factory=list)
    skill: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def is_text(self) -> bool:
        return self.fmt == "text"

    def target(self, i: int) -> bool | list[tuple[int, int]]:
        """What of message ``i`` is trained: True (all of it, with its end-of-turn), False, or ranges."""
        t = self.targets[i] if i < len(self.targets) else None
        return self.messages[i]["role"] == "assistant" if t is None else t

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in self.messages)

    @property
    def evaluable(self) -> bool:
        """Usable as an evaluation prompt: a plain, fully trained final answer in a conversation without tools."""
        if self.is_text or self.uses_tools or not self.messages:
            return False
        last = self.messages[-1]
        return last["role"] == "assistant" and self.target(len(self.messages) - 1) is True \
            and bool(last["content"].strip())

    def _last_assistant(self) -> int:
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i]["role"] == "assistant":
                return i
        raise ValueError(f"{self.source}: example has no assistant turn")

    @property
    def prompt_messages(self) -> list[dict[str, Any]]:
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


Turns = tuple[list[dict[str, Any]], list[Target]]


def _keys(obj: dict) -> str:
    keys = sorted(str(k) for k in obj)
    shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
    return shown or "none"


def _turn_list(value: Any, name: str, what: str, role_key: str, content_key: str,
               trained: bool | None = None) -> Turns:
    """A list of turns; ``trained=False`` forces every target off (a prompt), None keeps the source's flags."""
    if not isinstance(value, list):
        raise BadLine(f"{name} is not a list (got {type(value).__name__})")
    msgs, targets = [], []
    for i, t in enumerate(value, 1):
        m, tg = turn(t, f"{what} {i}", role_key, content_key)
        msgs.append(m)
        targets.append(False if trained is False else tg)
    return msgs, targets


def _from_chat(obj: dict) -> Turns:
    return _turn_list(obj["messages"], "messages", "message", "role", "content")


def _from_sharegpt(obj: dict) -> Turns:
    msgs, targets = _turn_list(obj["conversations"], "conversations", "turn", "from", "value")
    chosen = obj.get("chosen")
    if isinstance(chosen, dict):  # LLaMA-Factory's preference variant: the chosen answer is one more turn
        m, tg = turn(chosen, "chosen", "from", "value")
        msgs.append(m)
        targets.append(tg)
    return msgs, targets


def _prompt_turns(value: Any, name: str) -> Turns:
    """A prompt: a string (one user turn) or a list of messages; never trained (TRL trains the completion)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}], [False]
    if isinstance(value, list):
        return _turn_list(value, name, f"{name} message", "role", "content", trained=False)
    raise BadLine(f"{name} is not a string or a list of messages (got {type(value).__name__})")


def _answer_turns(value: Any, name: str) -> Turns:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}], [None]
    if isinstance(value, list):
        return _turn_list(value, name, f"{name} message", "role", "content")
    raise BadLine(f"{name} is not a string or a list of messages (got {type(value).__name__})")


def _from_prompt_response(obj: dict) -> Turns:
    if "label" in obj:  # KTO: label false marks an undesirable completion
        if not isinstance(obj["label"], bool):
            raise BadLine(f"label is not true or false (got {json.dumps(obj['label'])[:20]})")
        if obj["label"] is False:
            raise BadLine("KTO line with label false (the completion is marked as bad): not trained on")
    answer_key = "completion" if "completion" in obj else "response"
    p_msgs, p_targets = _prompt_turns(obj["prompt"], "prompt")
    a_msgs, a_targets = _answer_turns(obj[answer_key], answer_key)
    return p_msgs + a_msgs, p_targets + a_targets


def _from_preference(obj: dict) -> Turns:
    """DPO/ORPO lines: supervised fine-tuning on the chosen answer; ``rejected`` is not used."""
    if "instruction" in obj:  # LLaMA-Factory's Alpaca preference variant
        p_msgs, p_targets = [{"role": "user", "content": _alpaca_user(obj)}], [False]
    elif "prompt" in obj:
        p_msgs, p_targets = _prompt_turns(obj["prompt"], "prompt")
    else:  # implicit prompt (TRL): chosen holds the whole conversation
        p_msgs, p_targets = [], []
    a_msgs, a_targets = _answer_turns(obj["chosen"], "chosen")
    if not p_msgs and isinstance(obj["chosen"], str):
        raise BadLine("chosen is a string but there is no prompt (keys: " + _keys(obj) + ")")
    return p_msgs + a_msgs, p_targets + a_targets


def _alpaca_user(obj: dict) -> str:
    instruction = text(obj["instruction"], "instruction")
    extra = obj.get("input")
    extra = "" if extra is None else text(extra, "input")
    return instruction + ("\n\n" + extra if extra.strip() else "")


def _from_alpaca(obj: dict) -> Turns:
    msgs: list[dict[str, Any]] = []
    history = obj.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise BadLine(f"history is not a list (got {type(history).__name__})")
        for k, pair in enumerate(history, 1):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise BadLine(f"history item {k} is not a [question, answer] pair")
            msgs.append({"role": "user", "content": text(pair[0], f"history item {k} question")})
            msgs.append({"role": "assistant", "content": text(pair[1], f"history item {k} answer")})
    msgs.append({"role": "user", "content": _alpaca_user(obj)})
    msgs.append({"role": "assistant", "content": text(obj["output"], "output")})
    return msgs, [None] * len(msgs)


def detect_format(obj: dict) -> str:
    """The format name of a parsed record; BadLine when no known shape fits."""
    if "messages" in obj:
        return "chat"
    if "conversations" in obj:
        return "sharegpt"
    if "chosen" in obj:
        return "preference"
    if "prompt" in obj and ("response" in obj or "completion" in obj):
        return "prompt_response"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "text" in obj:
        return "text"
    raise BadLine(f"unknown shape (keys: {_keys(obj)})")


def _check_turns(messages: list[dict[str, Any]], targets: list[Target]) -> Turns:
    def on(i: int) -> bool:
        t = targets[i]
        return bool(t) if t is not None else messages[i]["role"] == "assistant"

    if not any(m["role"] == "assistant" for m in messages):
        raise BadLine("no assistant turn")
    last = max((i for i in range(len(messages)) if on(i)), default=-1)
    if last < 0:
        raise BadLine("no trained turn (every assistant turn is marked weight 0 / train false)")
    for i, m in enumerate(messages[: last + 1], 1):
        if m["role"] == "assistant" and on(i - 1) and not m["content"].strip() and not m.get("tool_calls"):
            raise BadLine("empty assistant turn" + (f" (message {i})" if i != last + 1 else ""))
    if not any(m["role"] == "user" for m in messages[:last]):
        raise BadLine("no user turn before the assistant turn")
    # Turns after the last trained one teach nothing (they would be masked): drop them.
    return messages[: last + 1], targets[: last + 1]


def _scan_content(messages: list[dict[str, Any]]) -> list[str]:
    """Skip media placeholders (their media is not trained); return warnings for template placeholders.

    A warning is a short kind ("template placeholder {{name}}"): ``prepare`` counts them per file."""
    warnings = []
    for i, m in enumerate(messages, 1):
        found = MEDIA_PLACEHOLDER.search(m["content"])
        if found:
            raise BadLine(f"multimodal: message {i} ({m['role']}) has a {found.group(0)} placeholder; "
                          f"only text is trained, line skipped")
        found = TEMPLATE_PLACEHOLDER.search(m["content"])
        if found and f"template placeholder {found.group(0)}" not in warnings:
            warnings.append(f"template placeholder {found.group(0)}")
    return warnings


def decode_line(raw: bytes, max_line_bytes: int | None = None) -> Any:
    """The JSON value of one raw JSONL line (without its newline), or BadLine."""
    if max_line_bytes is not None and len(raw) > max_line_bytes:
        raise BadLine(f"line longer than {max_line_bytes} bytes")
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine(f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    try:
        return json.loads(s)
    except json.JSONDecodeError as e:
        raise BadLine(f"invalid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise BadLine("invalid JSON: nested too deeply") from None


def parse_record(obj: Any, system_prompt: str) -> Example:
    """One parsed JSON record -> Example, or BadLine."""
    if not isinstance(obj, dict):
        raise BadLine(f"not a JSON object (got {type(obj).__name__})")
    fmt = detect_format(obj)
    metadata = obj.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise BadLine(f"metadata is not an object (got {type(metadata).__name__})")
    skill = (metadata or {}).get("skill")
    skill = skill if isinstance(skill, str) and skill.strip() else None
    media = media_field(obj)
    if media:
        raise BadLine(f"multimodal: field {json.dumps(media)} is set; only text is trained, line skipped")
    if "kto_tag" in obj and obj["kto_tag"] is False:  # LLaMA-Factory's KTO flag
        raise BadLine("KTO line with kto_tag false (the answer is marked as bad): not trained on")
    if fmt == "text":
        content = text(obj["text"], "text")
        if not content.strip():
            raise BadLine("empty text")
        ex = Example([{"role": "text", "content": content}], fmt, metadata, skill=skill)
        ex.warnings = _scan_content([{"role": "text", "content": content}])
        return ex
    messages, targets = {
        "chat": _from_chat,
        "sharegpt": _from_sharegpt,
        "preference": _from_preference,
        "prompt_response": _from_prompt_response,
        "alpaca": _from_alpaca,
    }[fmt](obj)
    tools = tools_list(obj.get("tools"), "tools") if "tools" in obj else tools_list(obj.get("functions"), "functions")
    messages, targets = _check_turns(messages, targets)
    warnings = _scan_content(messages)  # before a system turn is added, so numbers match the source
    system = obj.get("system")
    if messages[0]["role"] != "system":
        own = content_text(system, "system") if system is not None else ""
        if own or system_prompt:
            messages.insert(0, {"role": "system", "content": own or system_prompt})
            targets.insert(0, False)
    return Example(messages, fmt, metadata, tools=tools, targets=targets, skill=skill, warnings=warnings)


def parse_line(raw: bytes, system_prompt: str, max_line_bytes: int | None = None) -> Example:
    """Parse one raw JSONL line (without caring about its newline) into an Example, or raise BadLine."""
    return parse_record(decode_line(raw, max_line_bytes), system_prompt)
