"""One turn of a conversation, from whichever shape a tool wrote it in, to a normalised chat message.

A normalised message is what Hugging Face chat templates take: ``{"role", "content"}`` with role
``system``, ``user``, ``assistant`` or ``tool``; an assistant turn may carry ``tool_calls``
(``[{"type": "function", "function": {"name", "arguments": {...}}}]``, arguments as an object, as
templates expect) and a tool turn a ``name``. Beside it, each turn has a *target*, what of it carries
the loss, read from the source format's own flags:

- ``None``: the default, trained when the turn is an assistant turn;
- ``True`` / ``False``: OpenAI's ``weight`` (1 / 0) or Axolotl's ``train``;
- a list of ``(start, end)`` character ranges of ``content`` (end exclusive): Axolotl's ``train_detail``,
  whose ``end_offset`` is inclusive.

Every problem raises ``BadLine`` naming the turn and the field.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ultimate_trainer.data.errors import BadLine

Target = bool | list[tuple[int, int]] | None

# Role names (OpenAI, TRL) and speaker names (ShareGPT as FastChat, LLaMA-Factory and Axolotl write it).
ROLE_NAMES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "chatgpt": "assistant",
    "function_call": "assistant",  # LLaMA-Factory: the assistant's tool call, value = JSON of the call
    "tool": "tool", "function": "tool", "observation": "tool",  # a tool's result
}
TEXT_PART_TYPES = ("text", "input_text", "output_text")
MEDIA_PART_TYPES = ("image", "image_url", "input_image", "audio", "input_audio", "video", "video_url", "file",
                    "input_file")
MEDIA_FIELDS = ("images", "image", "videos", "video", "audios", "audio")
MEDIA_PLACEHOLDER = re.compile(r"<(image|video|audio)>")
TEMPLATE_PLACEHOLDER = re.compile(r"\{\{\s*[A-Za-z_][\w.]*\s*\}\}")


def text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadLine(f"{what} is not a string (got {type(value).__name__})")
    return value


def content_text(value: Any, what: str, allow_none: bool = False) -> str:
    """A turn's text: a string, or a list of content parts of which only text parts may be present."""
    if value is None and allow_none:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise BadLine(f"{what} is not a string (got {type(value).__name__})")
    pieces = []
    for k, part in enumerate(value, 1):
        if isinstance(part, str):
            pieces.append(part)
            continue
        if not isinstance(part, dict):
            raise BadLine(f"{what} part {k} is not an object")
        kind = part.get("type")
        if kind in TEXT_PART_TYPES or (kind is None and "text" in part):
            pieces.append(text(part.get("text"), f"{what} part {k} text"))
        elif kind in MEDIA_PART_TYPES or any(key in part for key in MEDIA_PART_TYPES):
            raise BadLine(f"multimodal: {what} part {k} is {kind or 'media'}; only text is trained, line skipped")
        else:
            raise BadLine(f"{what} part {k}: unknown part type {json.dumps(kind)[:40]}")
    return "".join(pieces)  # what templates that take parts do: the text parts, back to back


def _arguments(value: Any, what: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise BadLine(f"{what} is not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict):
        raise BadLine(f"{what} is not a JSON object (got {type(value).__name__})")
    return value


def tool_calls(value: Any, what: str) -> list[dict[str, Any]]:
    """OpenAI ``tool_calls`` (or a bare ``{"name", "arguments"}`` / list of them) -> template tool calls."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise BadLine(f"{what} is not a list of calls")
    out = []
    for k, call in enumerate(value, 1):
        if not isinstance(call, dict):
            raise BadLine(f"{what} call {k} is not an object")
        fn = call.get("function", call)
        if not isinstance(fn, dict):
            raise BadLine(f"{what} call {k} function is not an object")
        name = text(fn.get("name"), f"{what} call {k} name")
        norm: dict[str, Any] = {"type": "function",
                                "function": {"name": name, "arguments": _arguments(fn.get("arguments", {}),
                                                                                   f"{what} call {k} arguments")}}
        if isinstance(call.get("id"), str):
            norm["id"] = call["id"]
        out.append(norm)
    return out


def tools_list(value: Any, what: str) -> list[dict[str, Any]] | None:
    """A tool definitions field (a list, or LLaMA-Factory's JSON string of one) -> OpenAI-style tools."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadLine(f"{what} is not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise BadLine(f"{what} is not a list of tool definitions (got {type(value).__name__})")
    out = []
    for k, tool in enumerate(value, 1):
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
            out.append(tool)
        elif isinstance(tool, dict) and isinstance(tool.get("name"), str):
            out.append({"type": "function", "function": tool})
        else:
            raise BadLine(f"{what} item {k} is not a function definition (no name)")
    return out or None


def _target(t: dict[str, Any], content: str, what: str) -> Target:
    detail = t.get("train_detail")
    if detail is not None:
        if not isinstance(detail, list):
            raise BadLine(f"{what} train_detail is not a list")
        ranges = []
        for k, d in enumerate(detail, 1):
            if not isinstance(d, dict):
                raise BadLine(f"{what} train_detail item {k} is not an object")
            a, b, on = d.get("begin_offset"), d.get("end_offset"), d.get("train")
            if not (type(a) is int and type(b) is int and 0 <= a <= b < len(content)):
                raise BadLine(f"{what} train_detail item {k}: offsets {a}..{b} are not within the "
                              f"{len(content)} characters of the turn")
            if not isinstance(on, bool):
                raise BadLine(f"{what} train_detail item {k}: train is not true or false")
            if on:
                ranges.append((a, b + 1))  # Axolotl's end_offset is inclusive
        return ranges
    if "train" in t and t["train"] is not None:
        if not isinstance(t["train"], bool):
            raise BadLine(f"{what} train is not true or false (got {json.dumps(t['train'])[:20]})")
        return t["train"]
    if "weight" in t and t["weight"] is not None:
        w = t["weight"]
        if type(w) not in (int, float) or w not in (0, 1):
            raise BadLine(f"{what} weight must be 0 or 1 (got {json.dumps(w)[:20]})")
        return bool(w)
    return None


def turn(t: Any, what: str, role_key: str, content_key: str) -> tuple[dict[str, Any], Target]:
    """One source turn -> (normalised message, target). ``what`` names it in reasons ("message 3")."""
    if not isinstance(t, dict):
        raise BadLine(f"{what} is not an object")
    if role_key not in t and "role" in t:  # ShareGPT written with role/content keys (Axolotl, LLaMA-Factory)
        role_key, content_key = "role", "content"
    who = t.get(role_key)
    role = ROLE_NAMES.get(who.lower()) if isinstance(who, str) else None
    if role is None:
        noun = "speaker" if role_key == "from" else "role"
        raise BadLine(f"{what}: unknown {noun} {json.dumps(who)[:40]}"
                      + ("" if who is not None else f" (no {json.dumps(role_key)} key)"))
    msg: dict[str, Any] = {"role": role}
    raw = t.get(content_key)
    if who.lower() == "function_call":
        # LLaMA-Factory: the call itself is the value, as JSON ({"name", "arguments"} or a list of them).
        try:
            calls = json.loads(text(raw, f"{what} {content_key}"))
        except json.JSONDecodeError as e:
            raise BadLine(f"{what} function_call {content_key} is not valid JSON ({e.msg})") from None
        msg["content"] = ""
        msg["tool_calls"] = tool_calls(calls, f"{what} function_call")
    elif role == "assistant":
        calls = t.get("tool_calls") or t.get("function_call")
        if calls:
            field = "tool_calls" if t.get("tool_calls") else "function_call"
            msg["tool_calls"] = tool_calls(calls, f"{what} {field}")
        msg["content"] = content_text(raw, f"{what} {content_key}", allow_none=bool(calls))
    else:
        msg["content"] = content_text(raw, f"{what} {content_key}")
        if role == "tool":
            for key in ("name", "tool_call_id"):
                if isinstance(t.get(key), str):
                    msg[key] = t[key]
    return msg, _target(t, msg["content"], what)


def media_field(obj: dict[str, Any]) -> str | None:
    """The name of a non-empty image/video/audio field of a record (LLaMA-Factory, TRL vision data)."""
    for key in MEDIA_FIELDS:
        if obj.get(key) not in (None, "", [], {}):
            return key
    return None
