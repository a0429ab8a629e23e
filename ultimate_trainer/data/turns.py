"""One turn of a conversation, from whichever shape a tool wrote it in, to a normalised chat message.

A normalised message is what Hugging Face chat templates take: ``{"role", "content"}`` with role
``system``, ``user``, ``assistant`` or ``tool``; an assistant turn may carry ``tool_calls``
(``[{"type": "function", "function": {"name", "arguments": {...}}}]``, arguments as an object, as
templates expect) and ``reasoning_content`` (its reasoning trace, however the source wrote it:
``reasoning_content``, ``thinking`` or ``reasoning`` fields, reasoning/thinking content parts, or a
leading ``<think>...</think>`` block in the answer; data/reasoning.py renders it); a tool turn may
carry a ``name``. Beside it, each turn has a *target*, what of it carries the loss, read from the
source format's own flags:

- ``None``: the default, trained when the turn is an assistant turn;
- ``True`` / ``False``: OpenAI's ``weight`` (1 / 0), Axolotl's ``train``, LLaMA-Factory v1's
  ``loss_weight`` (1.0 / 0.0);
- a list of ``(start, end)`` character ranges of ``content`` (end exclusive): Axolotl's ``train_detail``
  (whose ``end_offset`` is inclusive), or content parts of which some say ``"train": false``;

and whether its reasoning is trained (a reasoning part's own ``train`` flag; by default it goes with
the answer).

Every problem raises ``BadLine`` naming the turn and the field, and what the file has there.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
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
REASONING_PART_TYPES = ("reasoning", "thinking")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
MEDIA_PART_TYPES = ("image", "image_url", "input_image", "audio", "audio_url", "input_audio", "video", "video_url", "file",
                    "input_file")
MEDIA_FIELDS = ("images", "image", "videos", "video", "audios", "audio")
MEDIA_PLACEHOLDER = re.compile(r"<(image|video|audio)>")
TEMPLATE_PLACEHOLDER = re.compile(r"\{\{\s*[A-Za-z_][\w.]*\s*\}\}")
THINK_BLOCK = re.compile(r"\A\s*<think>(.*?)</think>", re.DOTALL)


def describe(value: Any) -> str:
    """What a JSON value is, in the file's own terms (``null``, ``a number (3)``), for reasons."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"a number ({json.dumps(value)[:20]})"
    if isinstance(value, str):
        return f"a string ({json.dumps(value)[:30]})"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadLine(f"{what} is {describe(value)}, not a string")
    return value


def need(obj: dict[str, Any], key: str, what: str) -> Any:
    """``obj[key]``, or BadLine saying the key is missing (rather than that its value is null)."""
    if key not in obj:
        raise BadLine(f'{what} has no "{key}"')
    return obj[key]


@dataclass
class Content:
    """A turn's content read from a string or a list of parts."""

    text: str = ""
    ranges: list[tuple[int, int, bool | None]] | None = None  # per text part: (start, end, its train flag)
    reasoning: str | None = None
    reasoning_train: bool | None = None
    calls: list[Any] = field(default_factory=list)  # LLaMA-Factory v1 tool_call parts (raw)
    tools: list[Any] = field(default_factory=list)  # LLaMA-Factory v1 tools parts (raw)


def _part_flag(part: dict[str, Any], what: str) -> bool | None:
    flag = part.get("train")
    if flag is not None and not isinstance(flag, bool):
        raise BadLine(f"{what} train is {describe(flag)}, not true or false")
    return flag


def _part_text(part: dict[str, Any], what: str, keys: tuple[str, ...]) -> str:
    for key in keys:
        if key in part:
            value = part[key]
            if isinstance(value, list):  # a thinking part holding text parts (Mistral)
                return "".join(_part_text(p, f"{what} {key}", ("text", "value")) if isinstance(p, dict)
                               else text(p, f"{what} {key}") for p in value)
            return text(value, f"{what} {key}")
    raise BadLine(f"{what} has no " + " or ".join(f'"{k}"' for k in keys))


def read_content(value: Any, what: str, allow_none: bool = False) -> Content:
    """A turn's content: a string, or a list of parts (OpenAI/TRL ``{"type": "text", "text"}``, LLaMA-Factory
    v1 ``{"type", "value"}``, Axolotl parts with a ``train`` flag, reasoning/thinking parts)."""
    if value is None and allow_none:
        return Content()
    if isinstance(value, str):
        return Content(value)
    if not isinstance(value, list):
        raise BadLine(f"{what} is {describe(value)}, not a string or a list of content parts")
    out = Content(ranges=[])
    pieces: list[str] = []
    at = 0
    for k, part in enumerate(value, 1):
        where = f"{what} part {k}"
        if isinstance(part, str):
            piece, flag = part, None
        elif not isinstance(part, dict):
            raise BadLine(f"{where} is {describe(part)}, not a string or an object")
        else:
            kind = part.get("type")
            if kind in TEXT_PART_TYPES or (kind is None and ("text" in part or "value" in part)):
                piece, flag = _part_text(part, f'{where} (type "{kind or "text"}")', ("text", "value")), \
                    _part_flag(part, where)
            elif kind in REASONING_PART_TYPES:
                r = _part_text(part, f'{where} (type "{kind}")', (kind, "text", "value"))
                out.reasoning = (out.reasoning or "") + r
                flag = _part_flag(part, where)
                if flag is not None:
                    out.reasoning_train = flag
                continue
            elif kind in ("tool_call", "tool_calls"):  # LLaMA-Factory v1: value is the call as JSON
                out.calls.append(_json_value(need(part, "value", f'{where} (type "{kind}")'),
                                             f'{where} (type "{kind}") value'))
                continue
            elif kind == "tools":  # LLaMA-Factory v1: tool definitions as JSON
                defs = _json_value(need(part, "value", f'{where} (type "tools")'), f'{where} (type "tools") value')
                out.tools.extend(defs if isinstance(defs, list) else [defs])
                continue
            elif kind in MEDIA_PART_TYPES or any(key in part for key in MEDIA_PART_TYPES):
                raise BadLine(f"multimodal: {where} is {kind or 'media'}; only text is trained, line skipped")
            elif kind is None:
                raise BadLine(f'{where} has no "type" and no "text" (keys: {", ".join(sorted(map(str, part)))})')
            else:
                raise BadLine(f"{where}: unknown part type {json.dumps(kind)[:40]} (text, reasoning, thinking, "
                              f"tool_call and tools parts are read)")
        pieces.append(piece)
        out.ranges.append((at, at + len(piece), flag))
        at += len(piece)
    out.text = "".join(pieces)  # what templates that take parts do: the text parts, back to back
    if all(flag is None for _, _, flag in out.ranges):
        out.ranges = None
    return out


def content_text(value: Any, what: str, allow_none: bool = False) -> str:
    """A turn's text (string or text parts); reasoning and tool-call parts are refused here."""
    c = read_content(value, what, allow_none)
    if c.reasoning is not None or c.calls or c.tools:
        raise BadLine(f"{what} has reasoning or tool-call parts, which only an assistant turn can have")
    return c.text


def _json_value(value: Any, what: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise BadLine(f"{what} is not valid JSON ({e.msg} at column {e.colno})") from None
    return value


def _arguments(value: Any, what: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise BadLine(f"{what} is not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict):
        raise BadLine(f"{what} is {describe(value)}, not a JSON object")
    return value


def tool_calls(value: Any, what: str) -> list[dict[str, Any]]:
    """OpenAI ``tool_calls`` (or a bare ``{"name", "arguments"}`` / list of them) -> template tool calls."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise BadLine(f"{what} is {describe(value)}, not a list of calls")
    out = []
    for k, call in enumerate(value, 1):
        if not isinstance(call, dict):
            raise BadLine(f"{what} call {k} is {describe(call)}, not an object")
        fn = call.get("function", call)
        if not isinstance(fn, dict):
            raise BadLine(f"{what} call {k} function is {describe(fn)}, not an object")
        name = text(need(fn, "name", f"{what} call {k}"), f"{what} call {k} name")
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
    value = _json_value(value, what)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise BadLine(f"{what} is {describe(value)}, not a list of tool definitions")
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
            raise BadLine(f"{what} train_detail is {describe(detail)}, not a list")
        ranges = []
        for k, d in enumerate(detail, 1):
            if not isinstance(d, dict):
                raise BadLine(f"{what} train_detail item {k} is {describe(d)}, not an object")
            a, b, on = d.get("begin_offset"), d.get("end_offset"), d.get("train")
            if not (type(a) is int and type(b) is int and 0 <= a <= b < len(content)):
                raise BadLine(f"{what} train_detail item {k}: offsets {a}..{b} are not within the "
                              f"{len(content)} characters of the turn")
            if not isinstance(on, bool):
                raise BadLine(f"{what} train_detail item {k}: train is {describe(on)}, not true or false")
            if on:
                ranges.append((a, b + 1))  # Axolotl's end_offset is inclusive
        return ranges
    if "train" in t and t["train"] is not None:
        if not isinstance(t["train"], bool):
            raise BadLine(f"{what} train is {describe(t['train'])}, not true or false")
        return t["train"]
    for key in ("weight", "loss_weight"):  # OpenAI; LLaMA-Factory v1
        if key in t and t[key] is not None:
            w = t[key]
            if type(w) not in (int, float) or w not in (0, 1):
                raise BadLine(f"{what} {key} must be 0 or 1 (got {json.dumps(w)[:20]}): the loss is on a token or "
                              f"not, it is not scaled")
            return bool(w)
    return None


@dataclass
class Turn:
    message: dict[str, Any]
    target: Target
    reasoning_train: bool = True  # whether its reasoning (if any) carries the loss with the answer
    tools: list[Any] = field(default_factory=list)  # tool definitions given as a content part (LLaMA-Factory v1)


def _reasoning_field(t: dict[str, Any], what: str) -> tuple[str, str] | None:
    for key in REASONING_FIELDS:
        value = t.get(key)
        if value is None or value == "":
            continue
        if isinstance(value, dict):  # {"text": ...} / {"content": ...}
            value = value.get("text", value.get("content"))
        if not isinstance(value, str):
            raise BadLine(f"{what} {key} is {describe(t[key])}, not a string")
        if value.strip():
            return key, value
    return None


def read_turn(t: Any, what: str, role_key: str, content_key: str) -> Turn:
    """One source turn -> its normalised message, target and reasoning flag. ``what`` names it ("message 3")."""
    if not isinstance(t, dict):
        raise BadLine(f"{what} is {describe(t)}, not an object")
    if role_key not in t and "role" in t:  # ShareGPT written with role/content keys (Axolotl, LLaMA-Factory)
        role_key, content_key = "role", "content"
    if content_key not in t and content_key == "content" and "value" in t:  # role/value (pygmalion)
        content_key = "value"
    who = t.get(role_key)
    role = ROLE_NAMES.get(who.lower()) if isinstance(who, str) else None
    if role is None:
        noun = "speaker" if role_key == "from" else "role"
        raise BadLine(f"{what}: unknown {noun} {json.dumps(who)[:40]}"
                      + ("" if who is not None else f' (no "{role_key}" key)'))
    msg: dict[str, Any] = {"role": role}
    raw = t.get(content_key)
    where = f"{what} {content_key}"
    c = Content()
    if who.lower() == "function_call":
        # LLaMA-Factory: the call itself is the value, as JSON ({"name", "arguments"} or a list of them).
        calls = _json_value(text(need(t, content_key, what), where), f"{what} function_call {content_key}")
        msg["content"] = ""
        msg["tool_calls"] = tool_calls(calls, f"{what} function_call")
    elif role == "assistant":
        calls = t.get("tool_calls") or t.get("function_call")
        if raw is None and not calls and not _reasoning_field(t, what):
            raise BadLine(f'{what} has no "{content_key}"' if content_key not in t
                          else f"{where} is null (an answer without text needs tool calls)")
        c = read_content(raw, where, allow_none=True)
        if calls:
            name = "tool_calls" if t.get("tool_calls") else "function_call"
            msg["tool_calls"] = tool_calls(calls, f"{what} {name}")
        elif c.calls:
            msg["tool_calls"] = tool_calls(c.calls, f"{what} tool_call part")
        msg["content"] = c.text
        found = _reasoning_field(t, what)
        if found is not None:
            c.reasoning = found[1] if c.reasoning is None else c.reasoning + found[1]
    else:
        if content_key not in t:
            raise BadLine(f'{what} has no "{content_key}"')
        c = read_content(raw, where)
        if c.reasoning is not None or c.calls:
            raise BadLine(f"{where} has reasoning or tool-call parts, but it is a {role} turn")
        msg["content"] = c.text
        if role == "tool":
            for key in ("name", "tool_call_id"):
                if isinstance(t.get(key), str):
                    msg[key] = t[key]
    target = _target(t, msg["content"], what)
    if c.ranges is not None:
        if isinstance(target, list):
            raise BadLine(f"{what} has both train_detail and content parts with a train flag: use one of them")
        default = target if target is not None else role == "assistant"
        target = _merge([(a, b) for a, b, flag in c.ranges if (default if flag is None else flag) and b > a])
    if role == "assistant" and c.reasoning is None and not isinstance(target, list):
        m = THINK_BLOCK.match(msg["content"])
        if m and m.group(1).strip():  # an answer that starts with its reasoning: split it off
            c.reasoning = m.group(1)
            msg["content"] = msg["content"][m.end():].lstrip("\n")
    if c.reasoning is not None and c.reasoning.strip():
        msg["reasoning_content"] = c.reasoning.strip("\n")
    return Turn(msg, target, c.reasoning_train is not False, c.tools)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def media_field(obj: dict[str, Any]) -> str | None:
    """The name of a non-empty image/video/audio field of a record (LLaMA-Factory, TRL vision data)."""
    for key in MEDIA_FIELDS:
        if obj.get(key) not in (None, "", [], {}):
            return key
    return None
