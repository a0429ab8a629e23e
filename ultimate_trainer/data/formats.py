"""One record (a JSONL line or a JSON array item) -> one ``Example``: shape detection and normalisation.

Every problem with a record raises ``BadLine`` with a short, specific reason; ``prepare`` turns it into
a ``file:line: reason`` entry of the file's report and goes on with the next record.

Shapes (detected per record, first match wins, extra keys are ignored; docs/DATA.md has the table
by source tool, with what carries the loss):

=============== ============================================================ ================================
fmt             shape                                                        becomes
=============== ============================================================ ================================
preference      ``{"chosen_messages", "rejected_messages"}`` (LLaMA-Factory   the prompt as untrained context,
                v1), ``{"input", "preferred_output"}`` (OpenAI)               then the chosen answer
preference      ``{"messages" | "conversations", "chosen", "rejected"}``      the conversation as context,
                (Axolotl, LLaMA-Factory)                                     then the chosen turn
chat            ``{"messages": [{"role", "content"}, ...], "tools"}``        the messages (OpenAI, TRL, Axolotl)
sharegpt        ``{"conversations": [{"from", "value"}, ...], "system",      the turns, ``system`` first
                "tools"}``
preference      ``{"prompt" | "instruction" | "question"?, "chosen",         the prompt as context, then the
                "rejected"}``, ``{"instruction", "chosen_response"}``        chosen answer (no prompt: the
                (DPO, ORPO)                                                  turns chosen and rejected share)
prompt_response ``{"prompt", "completion" | "response"}`` (strings or        prompt turns (never trained),
                message lists; KTO adds ``label``)                           then the completion
alpaca          ``{"instruction", "input", "output", "system", "history"}``  system, history pairs, then
                                                                             instruction (+ input) / output
text            ``{"text"}``                                                 no roles: trained as plain text
segments        ``{"segments": [{"label", "text"}, ...]}`` (Axolotl          no roles, no template: the texts
                input_output)                                                joined, labelled ones trained
=============== ============================================================ ================================

In every shape but text, a KTO label (``label``, LLaMA-Factory's ``kto_tag``) that is false skips the
record; true trains its last answer only (the turns before it are its prompt).
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
    MEDIA_PLACEHOLDER, TEMPLATE_PLACEHOLDER, Target, Turn, content_text, describe, media_field, need, read_turn,
    text, tools_list,
)

__all__ = ["BadLine", "Example", "FORMATS", "decode_line", "detect_format", "parse_line", "parse_record"]

log = logging.getLogger(__name__)

FORMATS = ("chat", "sharegpt", "preference", "prompt_response", "alpaca", "text", "segments")
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
    reasoning_off: set[int] = field(default_factory=set)  # messages whose reasoning is not trained

    @property
    def has_reasoning(self) -> bool:
        return any(m.get("reasoning_content") for m in self.messages)

    @property
    def is_text(self) -> bool:
        """No roles and no chat template: ``text`` (trained whole, EOS added) or ``segments`` (as flagged)."""
        return self.fmt in ("text", "segments")

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
        if self.is_text or self.uses_tools or not self.messages or self.has_reasoning:
            return False  # a reasoning answer is not compared word for word with a generated one
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


def _keys(obj: dict) -> str:
    keys = sorted(str(k) for k in obj)
    shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
    return shown or "none"


Turns = list[Turn]


def _turn_list(value: Any, name: str, what: str, role_key: str, content_key: str,
               trained: bool | None = None) -> Turns:
    """A list of turns; ``trained=False`` forces every target off (a prompt), None keeps the source's flags."""
    if not isinstance(value, list):
        raise BadLine(f"{name} is {describe(value)}, not a list of {'turns' if role_key == 'from' else 'messages'}")
    turns = []
    for i, t in enumerate(value, 1):
        r = read_turn(t, f"{what} {i}", role_key, content_key)
        if trained is False:
            r.target = False
        turns.append(r)
    return turns


def _context(turns: Turns) -> Turns:
    """Turns that are the prompt of a preference pair: shown to the model, never trained."""
    for t in turns:
        t.target = False
    return turns


def _from_chat(obj: dict) -> Turns:
    return _turn_list(obj["messages"], "messages", "message", "role", "content")


def _from_sharegpt(obj: dict) -> Turns:
    return _turn_list(obj["conversations"], "conversations", "turn", "from", "value")


def _prompt_turns(value: Any, name: str) -> Turns:
    """A prompt: a string (one user turn) or a list of messages; never trained (TRL trains the completion)."""
    if isinstance(value, str):
        return [Turn({"role": "user", "content": value}, False)]
    if isinstance(value, list):
        return _turn_list(value, name, f"{name} message", "role", "content", trained=False)
    raise BadLine(f"{name} is {describe(value)}, not a string or a list of messages")


def _answer_turns(value: Any, name: str, role_key: str = "role", content_key: str = "content") -> Turns:
    """An answer: a string (one assistant turn), one message, or a list of messages."""
    if isinstance(value, str):
        return [read_turn({"role": "assistant", "content": value}, name, "role", "content")]
    if isinstance(value, dict):
        return [read_turn(value, name, role_key, content_key)]
    if isinstance(value, list):
        return _turn_list(value, name, f"{name} message", role_key, content_key)
    raise BadLine(f"{name} is {describe(value)}, not a string, a message or a list of messages")


def _from_prompt_response(obj: dict) -> Turns:
    answer_key = "completion" if "completion" in obj else "response"
    return _prompt_turns(obj["prompt"], "prompt") + _answer_turns(obj[answer_key], answer_key)


def _shared_prefix(chosen: list, rejected: Any) -> int:
    """How many leading turns ``chosen`` and ``rejected`` have in common (TRL's implicit prompt)."""
    if not isinstance(rejected, list):
        return 0
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    return n


def _whole_conversation(chosen_key: str, rejected_key: str, obj: dict) -> Turns:
    """A preference pair written as two whole conversations (TRL's implicit prompt, LLaMA-Factory v1's
    ``chosen_messages``): the turns both share are the prompt; of the chosen conversation only what
    comes after them is trained (when they share nothing, the turns after the last non-assistant one)."""
    raw = obj[chosen_key]
    if not isinstance(raw, list):
        raise BadLine(f"{chosen_key} is {describe(raw)} but there is no prompt: give \"prompt\" or make "
                      f"{chosen_key} the whole conversation (a list of messages)")
    turns = _answer_turns(raw, chosen_key)
    n = _shared_prefix(raw, obj.get(rejected_key))
    if not 0 < n < len(turns):
        n = max((i + 1 for i, t in enumerate(turns) if t.message["role"] != "assistant"), default=0)
    _context(turns[:n])
    return turns


def _from_preference(obj: dict) -> Turns:
    """Preference pairs (DPO, ORPO): supervised fine-tuning on the chosen answer only; the prompt,
    earlier assistant turns included, is untrained context; ``rejected`` is not trained."""
    if "chosen_messages" in obj:  # LLaMA-Factory v1
        return _whole_conversation("chosen_messages", "rejected_messages", obj)
    if "preferred_output" in obj:  # OpenAI preference fine-tuning
        inp = obj.get("input")
        if not isinstance(inp, dict) or "messages" not in inp:
            raise BadLine(f'input is {describe(inp)}: OpenAI preference lines need "input": {{"messages": [...]}}')
        return _context(_turn_list(inp["messages"], "input messages", "input message", "role", "content")) \
            + _answer_turns(obj["preferred_output"], "preferred_output")
    if "messages" in obj:  # Axolotl chat_template DPO: messages + chosen/rejected turns
        return _context(_from_chat(obj)) + _answer_turns(obj["chosen"], "chosen")
    if "conversations" in obj:  # LLaMA-Factory ShareGPT: conversations + chosen/rejected turns
        return _context(_from_sharegpt(obj)) + _answer_turns(obj["chosen"], "chosen", "from", "value")
    if "chosen_response" in obj:  # Axolotl chatml.argilla: instruction + chosen_response
        return [Turn({"role": "user", "content": text(need(obj, "instruction", "the line"), "instruction")}, False),
                read_turn({"role": "assistant", "content": obj["chosen_response"]}, "chosen_response", "role",
                          "content")]
    if "instruction" in obj:  # LLaMA-Factory's Alpaca preference variant
        p = _history(obj, trained=False) + [Turn({"role": "user", "content": _alpaca_user(obj)}, False)]
    elif "question" in obj:  # Axolotl chatml.intel
        p = [Turn({"role": "user", "content": text(obj["question"], "question")}, False)]
    elif "prompt" in obj and not _is_conversation(obj["chosen"]):
        p = _prompt_turns(obj["prompt"], "prompt")
    else:  # implicit prompt (TRL), or chosen repeats the prompt (UltraFeedback): chosen holds the whole conversation
        return _whole_conversation("chosen", "rejected", obj)
    return p + _answer_turns(obj["chosen"], "chosen")


def _is_conversation(value: Any) -> bool:
    """A list of messages with a non-assistant turn in it: a whole conversation, not just an answer."""
    return isinstance(value, list) and any(isinstance(m, dict) and m.get("role", m.get("from")) not in
                                           ("assistant", "gpt", "model") for m in value)


def _alpaca_user(obj: dict) -> str:
    instruction = text(obj["instruction"], "instruction")
    extra = obj.get("input")
    extra = "" if extra is None else text(extra, "input")
    return instruction + ("\n\n" + extra if extra.strip() else "")


def _history(obj: dict, trained: bool | None = None) -> Turns:
    history = obj.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise BadLine(f"history is {describe(history)}, not a list of [question, answer] pairs")
    turns = []
    for k, pair in enumerate(history, 1):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise BadLine(f"history item {k} is not a [question, answer] pair")
        turns.append(Turn({"role": "user", "content": text(pair[0], f"history item {k} question")}, None))
        turns.append(read_turn({"role": "assistant", "content": text(pair[1], f"history item {k} answer")},
                               f"history item {k} answer", "role", "content"))
        if trained is False:
            turns[-1].target = False
    return turns


def _from_alpaca(obj: dict) -> Turns:
    return _history(obj) + [Turn({"role": "user", "content": _alpaca_user(obj)}, None),
                            read_turn({"role": "assistant", "content": text(obj["output"], "output")}, "output",
                                      "role", "content")]


# Accepted shapes: the keys that identify each (all required) and optional ones, for "unknown shape" reasons.
SHAPES = (
    ("chat", ("messages",), ("tools",)),
    ("sharegpt", ("conversations",), ("tools",)),
    ("prompt_response", ("prompt", "completion"), ("response", "label")),
    ("preference", ("prompt", "chosen"), ("rejected",)),
    ("alpaca", ("instruction", "output"), ("input", "history")),
    ("text", ("text",), ()),
    ("segments", ("segments",), ()),
)


def detect_format(obj: dict) -> str:
    """The format name of a parsed record; BadLine (naming the nearest shape) when no known shape fits."""
    if "chosen_messages" in obj or "preferred_output" in obj:
        return "preference"
    if ("messages" in obj or "conversations" in obj) and "chosen" in obj:
        return "preference"
    if "messages" in obj:
        return "chat"
    if "conversations" in obj:
        return "sharegpt"
    if "chosen" in obj or "chosen_response" in obj:
        return "preference"
    if "prompt" in obj and ("response" in obj or "completion" in obj):
        return "prompt_response"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "text" in obj:
        return "text"
    if "segments" in obj:
        return "segments"
    raise BadLine(_unknown_shape(obj))


def _unknown_shape(obj: dict) -> str:
    if "prompt" in obj and "completions" in obj:
        return (f"unknown shape (keys: {_keys(obj)}): TRL stepwise supervision (prompt, completions, labels) grades "
                f"reasoning steps for a reward model; it has no single answer to fine-tune on")
    if "rejected_messages" in obj or "rejected" in obj or "non_preferred_output" in obj:
        given = "rejected_messages" if "rejected_messages" in obj else (
            "rejected" if "rejected" in obj else "non_preferred_output")
        wanted = {"rejected_messages": "chosen_messages", "rejected": "chosen",
                  "non_preferred_output": "preferred_output"}[given]
        return f'unknown shape (keys: {_keys(obj)}): a preference pair with "{given}" needs "{wanted}"'
    best, score = None, 0
    for name, required, optional in SHAPES:
        s = 2 * sum(k in obj for k in required) + sum(k in obj for k in optional)
        if s > score:
            best, score = (name, required), s
    if best is None:
        return (f"unknown shape (keys: {_keys(obj)}): none of the accepted shapes' keys is there (messages, "
                f"conversations, prompt + completion, prompt + chosen, instruction + output, text)")
    name, required = best
    if name == "prompt_response":
        missing = ['"prompt"'] if "prompt" not in obj else ['"completion" (or "response"): a prompt alone has no '
                                                            'answer to learn']
    else:
        missing = [f'"{k}"' for k in required if k not in obj]
    return (f"unknown shape (keys: {_keys(obj)}): nearest is {name} ({' + '.join(required)}), "
            f"which needs {' and '.join(missing)}")


def _from_segments(obj: dict, metadata: dict | None, skill: str | None) -> Example:
    """Axolotl's template-free ``input_output``: the segments' texts joined as they are (no template, no
    EOS added: special tokens are the user's), the segments with ``"label": true`` trained."""
    segments = obj["segments"]
    if not isinstance(segments, list) or not segments:
        raise BadLine(f"segments is {describe(segments)}, not a list of {{\"label\", \"text\"}} objects")
    pieces, ranges, at = [], [], 0
    for k, seg in enumerate(segments, 1):
        if not isinstance(seg, dict):
            raise BadLine(f"segment {k} is {describe(seg)}, not an object")
        piece = text(need(seg, "text", f"segment {k}"), f"segment {k} text")
        label = need(seg, "label", f"segment {k}")
        if not isinstance(label, bool):
            raise BadLine(f"segment {k} label is {describe(label)}, not true or false")
        if label and piece:
            ranges.append((at, at + len(piece)))
        pieces.append(piece)
        at += len(piece)
    if not ranges:
        raise BadLine("no trained segment (every segment has label false or no text)")
    content = "".join(pieces)
    ex = Example([{"role": "text", "content": content}], "segments", metadata, targets=[ranges], skill=skill)
    ex.warnings = _scan_content(ex.messages)
    return ex


def _label(obj: dict) -> bool:
    """KTO-style labels, in any shape: false marks an answer its authors judged bad; such a line is skipped.
    True when the line carries a label (true): the label judges its last answer, the rest is its prompt."""
    labelled = False
    for key in ("label", "kto_tag"):
        if key not in obj or obj[key] is None:
            continue
        value = obj[key]
        if not isinstance(value, bool):
            raise BadLine(f"{key} is {describe(value)}, not true or false (a KTO {key} marks the answer as good "
                          f"or bad; rename the field if it means something else)")
        if value is False:
            what = "completion" if "completion" in obj else "answer"
            raise BadLine(f"KTO line with {key} false (the {what} is marked as bad): not trained on")
        labelled = True
    return labelled


def _check_turns(turns: Turns) -> Turns:
    def on(t: Turn) -> bool:
        return bool(t.target) if t.target is not None else t.message["role"] == "assistant"

    if not any(t.message["role"] == "assistant" for t in turns):
        raise BadLine("no assistant turn")
    last = max((i for i, t in enumerate(turns) if on(t)), default=-1)
    if last < 0:
        raise BadLine("no trained turn (every assistant turn is marked weight 0 / loss_weight 0 / train false)")
    for i, t in enumerate(turns[: last + 1], 1):
        m = t.message
        if m["role"] == "assistant" and on(t) and not m["content"].strip() and not m.get("tool_calls") \
                and not m.get("reasoning_content"):
            raise BadLine("empty assistant turn" + (f" (message {i})" if i != last + 1 else ""))
    if not any(t.message["role"] == "user" for t in turns[:last]):
        raise BadLine("no user turn before the assistant turn")
    # Turns after the last trained one teach nothing (they would be masked): drop them.
    return turns[: last + 1]


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
        raise BadLine(f"not a JSON object: it is {describe(obj)}")
    fmt = detect_format(obj)
    metadata = obj.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise BadLine(f"metadata is {describe(metadata)}, not an object")
    skill = (metadata or {}).get("skill")
    skill = skill if isinstance(skill, str) and skill.strip() else None
    media = media_field(obj)
    if media:
        raise BadLine(f"multimodal: field {json.dumps(media)} is set; only text is trained, line skipped")
    if fmt == "text":
        content = text(obj["text"], "text")
        if not content.strip():
            raise BadLine("empty text")
        ex = Example([{"role": "text", "content": content}], fmt, metadata, skill=skill)
        ex.warnings = _scan_content([{"role": "text", "content": content}])
        return ex
    if fmt == "segments":
        return _from_segments(obj, metadata, skill)
    labelled = _label(obj)
    turns = {
        "chat": _from_chat,
        "sharegpt": _from_sharegpt,
        "preference": _from_preference,
        "prompt_response": _from_prompt_response,
        "alpaca": _from_alpaca,
    }[fmt](obj)
    if labelled:  # KTO: the label is about the last answer; earlier turns, answers included, are its prompt
        last = max((i for i, t in enumerate(turns) if t.message["role"] == "assistant"), default=0)
        _context(turns[:last])
    tools_field = obj.get("input") if "preferred_output" in obj else obj  # OpenAI preference: input.tools
    tools = tools_list(tools_field.get("tools"), "tools") if "tools" in tools_field \
        else tools_list(tools_field.get("functions"), "functions")
    part_tools = [d for t in turns for d in t.tools]  # LLaMA-Factory v1: a "tools" content part
    if part_tools:
        tools = (tools or []) + (tools_list(part_tools, "tools part") or [])
    turns = _check_turns(turns)
    messages = [t.message for t in turns]
    warnings = _scan_content(messages)  # before a system turn is added, so numbers match the source
    system = obj.get("system")
    if messages[0]["role"] != "system":
        own = content_text(system, "system") if system is not None else ""
        if own or system_prompt:
            turns.insert(0, Turn({"role": "system", "content": own or system_prompt}, False))
    return Example([t.message for t in turns], fmt, metadata, tools=tools, targets=[t.target for t in turns],
                   skill=skill, warnings=warnings,
                   reasoning_off={i for i, t in enumerate(turns) if not t.reasoning_train
                                  and t.message.get("reasoning_content")})


def parse_line(raw: bytes, system_prompt: str, max_line_bytes: int | None = None) -> Example:
    """Parse one raw JSONL line (without caring about its newline) into an Example, or raise BadLine."""
    return parse_record(decode_line(raw, max_line_bytes), system_prompt)
