"""Changing a few settings inside a config file the user wrote, and nothing else of it.

``set_values(path, {"training.learning_rate": 5e-4, "lora.r": 16})`` replaces those values in the
file's text where they stand (their spelling, the file's indentation, key order and every other
line stay byte for byte), adds a missing key beside its siblings (a missing group at the end), and
checks before writing that the new text parses to exactly the old settings with those values set
and validates as a whole (core/config.py). The file is replaced atomically (temp file beside it,
fsync, rename) and keeps its permissions, so the daemon, which reads it at its next start, sees the
old file or the new one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from json.decoder import scanstring
from pathlib import Path
from typing import Any

from ultimate_trainer.core.config import ConfigError, from_dict, read_object
from ultimate_trainer.core.status import atomic_write_text

_WS = " \t\r\n"


@dataclass
class _Object:
    """Where one JSON object of the file lies, and where each member's value lies."""

    start: int  # the "{"
    end: int  # just after the "}"
    members: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # key -> (key start, value start, end)


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _objects(text: str) -> dict[tuple[str, ...], _Object]:
    """Every object reachable from the top through objects only, by key path (arrays are opaque values)."""
    decoder = json.JSONDecoder()
    found: dict[tuple[str, ...], _Object] = {}

    def obj(i: int, path: tuple[str, ...]) -> int:
        o = found[path] = _Object(i, -1)
        i = _skip(text, i + 1)
        if text[i] == "}":
            o.end = i + 1
            return o.end
        while True:
            key_start = i
            key, i = scanstring(text, i + 1)
            i = _skip(text, _skip(text, i) + 1)  # past the ":"
            value_start = i
            i = obj(i, path + (key,)) if text[i] == "{" else decoder.raw_decode(text, i)[1]
            o.members[key] = (key_start, value_start, i)
            i = _skip(text, i)
            if text[i] == ",":
                i = _skip(text, i + 1)
                continue
            o.end = i + 1
            return o.end

    obj(_skip(text, 0), ())
    return found


def _indent_of(text: str, i: int) -> str:
    line_start = text.rfind("\n", 0, i) + 1
    return text[line_start:i] if not text[line_start:i].strip() else ""


def _set_one(text: str, parts: list[str], value: Any) -> str:
    objects = _objects(text)
    depth = len(parts) - 1
    while tuple(parts[:depth]) not in objects:
        depth -= 1
    parent = objects[tuple(parts[:depth])]
    key = parts[depth]
    if depth == len(parts) - 1 and key in parent.members:  # the value is there: replace it where it stands
        _, start, end = parent.members[key]
        return text[:start] + json.dumps(value) + text[end:]
    for name in reversed(parts[depth + 1:]):  # missing groups become one nested value
        value = {name: value}
    member = f"{json.dumps(key)}: {json.dumps(value)}"
    if not parent.members:
        close = parent.end - 1
        return text[:parent.start + 1] + member + text[close:]
    last_key, _, last_end = list(parent.members.values())[-1]
    multiline = "\n" in text[parent.start:last_key]
    joint = ",\n" + _indent_of(text, last_key) if multiline else ", "
    return text[:last_end] + joint + member + text[last_end:]


def _nested_set(data: dict[str, Any], parts: list[str], value: Any) -> None:
    for p in parts[:-1]:
        data = data.setdefault(p, {})
    data[parts[-1]] = value


def set_values(path: str | Path, values: dict[str, Any]) -> str:
    """Set dotted ``values`` in the config file ``path`` (created holding only them when absent).

    Returns the new text. Raises ``ConfigError`` (nothing written) when the file is not a JSON
    object, a dotted key runs through a value that is not a group, or the result does not validate.
    """
    path = Path(path)
    target = path.resolve()  # a symlinked config: write the file it points to
    text, data = read_object(path, None if target.exists() else "{}\n")
    expected = json.loads(text)
    new = text
    for key, value in values.items():
        parts = key.split(".")
        node: Any = data
        for p in parts[:-1]:
            node = node.get(p, {}) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                raise ConfigError([f"{path}: {key}: {p} is not a group"])
        _nested_set(expected, parts, value)
        new = _set_one(new, parts, value)
    if json.loads(new) != expected:  # the edit must be exactly the asked change
        raise ConfigError([f"{path}: could not set {', '.join(values)} without touching other settings"])
    from_dict(json.loads(new))  # ConfigError listing every problem, before anything is written
    _atomic_replace(target, new)
    return new


def _atomic_replace(path: Path, text: str) -> None:
    """``text`` into ``path`` atomically, keeping the file's permission bits (0644 for a new one)."""
    atomic_write_text(path, text, mode=path.stat().st_mode & 0o7777 if path.exists() else 0o644)
