"""Examples -> token ids and labels, with the loss only on what the source format says is trained.

The conversation is rendered with the tokenizer's own chat template (tool definitions passed as its
``tools``; ``chat_template.tool_support`` says whether it renders them). Each trained turn's character
span is defined by rendering prefixes: for an assistant turn ``messages[:i]`` with the generation
prompt ends where the answer starts, ``messages[:i+1]`` ends where it stops (its end-of-turn token,
e.g. ``<|im_end|>``, included, trailing whitespace after it not). Both renders must be prefixes of the
full rendering, or the template is not prefix-stable and the spans would be wrong: that is a
``TemplateError``.

Rendering every prefix costs about three renders an example, so the spans are found from the one
full rendering whenever that gives the same answer: the template's assistant turn is learnt once
per template from a probe conversation (the text the generation prompt adds before an answer, the
text that closes it), and each assistant turn is then located in the rendering as that header,
its content verbatim, that closing text (after the previous turns' contents, so text quoted in a
user turn is never taken for an answer). A conversation where this does not hold (a template that
trims or rewrites content, trained non-assistant turns, character ranges, tool use) takes the
prefix renders; so does every template whose probe fails, and the first ``VERIFY_FIRST`` examples of
a template, then one in ``VERIFY_EVERY``, are computed both ways: one disagreement sends that
template to the prefix renders for the rest of the process. Which turns are trained is ``Example.target``: assistant turns by default, OpenAI
``weight`` and Axolotl ``train`` per turn, and Axolotl ``train_detail`` character ranges, placed where
the turn's text sits in the rendering. The full text is then tokenized once (a whole chunk per
tokenizer call) with character offsets, and a token is trained on (label = its id) when it starts
inside a trained span; every other token gets label -100.

``text`` examples have no template and no roles: their text plus the EOS token is trained on whole.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import chain
from typing import Any, Sequence

import numpy as np

from ultimate_trainer.data import reasoning
from ultimate_trainer.data.chat_template import concatenation, render as render_chat, tool_support
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


VERIFY_FIRST = 32
VERIFY_EVERY = 64
_PROBE_Q, _PROBE_A = "probe question 5f1c", "probe answer 9b2e"


@dataclass
class _TurnShape:
    """How a template renders an assistant turn around its content; ``rendered`` counts fast renders."""

    header: str
    closing: str
    rendered: int = 0
    trusted: bool = True


_shapes: dict[str, _TurnShape | None] = {}  # chat template text -> its turn shape, None: prefixes only


def _turn_shape(tokenizer: Any) -> _TurnShape | None:
    template = tokenizer.chat_template
    key = template if isinstance(template, str) else repr(template)
    if key not in _shapes:
        _shapes[key] = None
        try:
            user = [{"role": "user", "content": _PROBE_Q}]
            before = render_chat(tokenizer, user, False)
            prompt = render_chat(tokenizer, user, True)
            full = render_chat(tokenizer, user + [{"role": "assistant", "content": _PROBE_A}], False).rstrip()
        except BadLine:
            return None
        if prompt.startswith(before) and full.startswith(prompt + _PROBE_A) and len(prompt) > len(before):
            closing = full[len(prompt) + len(_PROBE_A):]
            if closing:  # no closing text: rstrip() would eat an answer's own trailing spaces
                _shapes[key] = _TurnShape(prompt[len(before):], closing)
    shape = _shapes[key]
    return shape if shape is not None and shape.trusted else None



def end_of_turn(tokenizer: Any) -> str | None:
    """The text a chat template closes an assistant turn with (``<|im_end|>`` for ChatML); None if unknown."""
    _turn_shape(tokenizer)
    template = tokenizer.chat_template
    shape = _shapes.get(template if isinstance(template, str) else repr(template))
    return shape.closing if shape is not None else None

def _spans_one_render(example: Example, full: str, shape: _TurnShape) -> list[tuple[int, int]] | None:
    """The assistant spans read off ``full`` with the template's turn shape; None when it does not apply."""
    if example.extra.get("reasoning_field"):
        return None  # reasoning rendered by the template: placed (and checked) by the prefix renders
    spans, cursor = [], 0
    for i, m in enumerate(example.messages):
        target = example.target(i)
        content = m.get("content")
        if m["role"] != "assistant":
            if target or not isinstance(content, str):
                return None  # a trained user/system turn: placed by the prefix renders
            at = full.find(content, cursor)  # skipped, so that text quoted in it is never taken for a turn
            if at < 0:
                return None
            cursor = at + len(content)
            continue
        if not isinstance(content, str) or not content or m.get("tool_calls") or target not in (True, False):
            return None
        at = full.find(shape.header + content, cursor)
        if at < 0:
            return None
        start = at + len(shape.header)
        end = start + len(content)
        if not full.startswith(shape.closing, end):
            return None
        cursor = end + len(shape.closing)
        if target:
            spans.append((start, cursor))
    return spans


def render(tokenizer: Any, example: Example) -> tuple[str, list[tuple[int, int]]]:
    """The text to tokenize and the character spans that carry the loss."""
    if example.is_text:
        content = example.messages[0]["content"]
        return content, _word_aligned(content, example.targets[0]) if example.fmt == "segments" else [(0, len(content))]
    if getattr(tokenizer, "chat_template", None) is None:
        raise TemplateError("the tokenizer has no chat template; only {\"text\"} examples can be used with it")
    example = reasoning.for_template(tokenizer, example)
    full, spans = _render_chat(tokenizer, example)
    reasoning.check_rendered(example, full)
    return full, spans


def _render_chat(tokenizer: Any, example: Example) -> tuple[str, list[tuple[int, int]]]:
    if example.uses_tools:
        lacks = tool_support(tokenizer)
        if lacks:
            raise BadLine(f"{_tool_use(example)}, but the model's chat template has no tool support ({lacks})")
    full = _render_full(tokenizer, example)
    shape = None if example.uses_tools else _turn_shape(tokenizer)
    fast = _spans_one_render(example, full, shape) if shape is not None else None
    if fast is None:
        return full, _spans_by_prefixes(tokenizer, example, full)
    shape.rendered += 1
    if shape.rendered <= VERIFY_FIRST or shape.rendered % VERIFY_EVERY == 0:
        try:
            exact = _spans_by_prefixes(tokenizer, example, full)
        except TemplateError:
            shape.trusted = False
            raise
        if exact != fast:
            shape.trusted = False
            log.warning("the chat template renders a conversation differently from its turn shape "
                        "(%s): assistant spans come from prefix renders from now on", example.source or "example")
            return full, exact
    return full, fast


def _render_full(tokenizer: Any, example: Example) -> str:
    """The whole conversation as the chat template renders it: joined from the template's fixed pieces
    (chat_template.Concatenation) where it has them, checked against the template itself on the first
    ``VERIFY_FIRST`` conversations and one in ``VERIFY_EVERY`` after (a difference drops the pieces for
    good); the template otherwise."""
    pieces = None if example.tools else concatenation(tokenizer)
    fast = pieces.render(example.messages) if pieces is not None else None
    if fast is None:
        return render_chat(tokenizer, example.messages, False, example.tools)
    pieces.rendered += 1
    if pieces.rendered <= VERIFY_FIRST or pieces.rendered % VERIFY_EVERY == 0:
        exact = render_chat(tokenizer, example.messages, False, example.tools)
        if exact != fast:
            pieces.trusted = False
            log.warning("the chat template renders a conversation differently from its fixed pieces (%s): "
                        "rendered by the template from now on", example.source or "example")
            return exact
    return fast


def _spans_by_prefixes(tokenizer: Any, example: Example, full: str) -> list[tuple[int, int]]:
    msgs = example.messages
    field = example.extra.get("reasoning_field")
    spans = []
    for i, m in enumerate(msgs):
        target = example.target(i)
        if not target:
            continue
        start, end = _span(tokenizer, example, full, i)
        thought = m.get(field).strip() if field and m.get(field) else None  # reasoning the template renders
        after = start
        if thought:
            at = full.find(thought, start, end)
            if at < 0:
                raise BadLine(reasoning.left_out(i))
            after = at + len(thought)
        thought_on = bool(thought) and i not in example.reasoning_off
        if target is True and m["role"] == "assistant" and (not thought or thought_on):
            spans.append((start, end))
            continue
        # A trained non-assistant turn (Axolotl's train: true), character ranges (train_detail, content parts
        # with a train flag) or untrained reasoning: place the turn's own text inside its rendering, so the
        # role header (and the reasoning, unless trained) stays untrained.
        content = m["content"]
        at = full.find(content, after, end) if content else -1
        if at < 0:
            if thought and not content:
                continue  # reasoning alone, not trained
            raise BadLine(f"a trained {m['role']} turn ({content[:30]!r}) does not appear verbatim in the chat "
                          f"template's rendering, so its trained part cannot be placed")
        if thought_on:
            spans.append((start, at))
        if target is True:
            spans.append((at, end))
            continue
        spans.extend((at + a, at + b) for a, b in _word_aligned(content, target))
        if target and target[-1][1] == len(content):
            spans.append((at + len(content), end))  # the last character is trained: so is the end of turn
    return spans


def _word_aligned(content: str, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Character ranges of ``content`` moved to where tokens split: tokenizers fold one leading space into
    the next word's token (" It"), so a range that starts a word after a space takes that space (or the
    word's token would start outside it and go untrained), and a range that ends with a space before an
    untrained word leaves it to that word (or the untrained word's token would start inside it)."""
    out = []
    for a, b in ranges:
        if a > 0 and content[a - 1] == " ":
            a -= 1
        if a < b - 1 and b < len(content) and content[b - 1] == " " and content[b] != " ":
            b -= 1
        out.append((a, b))
    return out


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
    pairs = np.fromiter(chain.from_iterable(offsets), dtype=np.int64, count=2 * len(offsets)).reshape(-1, 2)
    starts, ends = pairs[:, 0], pairs[:, 1]
    mask = np.zeros(len(pairs), dtype=bool)
    for a, b in spans:
        mask |= (starts >= a) & (starts < b) & (ends > starts)
    return mask


def _encode(tokenizer: Any, texts: list[str]) -> Any:
    """One call of the Rust tokenizer when there is one (its ``Encoding`` objects), else ``__call__``'s answer.

    A fast tokenizer's ``__call__`` is this same ``encode_batch`` plus a Python dict per text, a
    tenth of the tokenization time.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch"):
        return backend.encode_batch(texts, add_special_tokens=False)
    return tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)


def _ids_offsets(encodings: Any) -> tuple[list[list[int]], list[Any]]:
    if isinstance(encodings, list):  # Rust Encoding objects
        return [e.ids for e in encodings], [e.offsets for e in encodings]
    return [list(ids) for ids in encodings["input_ids"]], list(encodings["offset_mapping"])


def _tokenize(tokenizer: Any, texts: list[str]) -> tuple[list[list[int]], list[Any]]:
    """Token ids and character offsets of ``texts``, in one call of the Rust tokenizer when there is one."""
    return _ids_offsets(_encode(tokenizer, texts))


@dataclass
class Rendered:
    """A chunk rendered, not yet tokenized: ``texts[j]`` with loss ``spans[j]`` is example ``where[j]``."""

    examples: Sequence[Example]
    results: list[Any]  # BadLine of an example that failed to render, else None until finished
    texts: list[str]
    spans: list[list[tuple[int, int]]]
    where: list[int]


def render_batch(tokenizer: Any, examples: Sequence[Example]) -> Rendered:
    """Render a chunk (Python: template, spans); ``tokenize`` + ``finish_batch`` do the rest."""
    out = Rendered(examples, [None] * len(examples), [], [], [])
    for i, ex in enumerate(examples):
        try:
            text, sp = render(tokenizer, ex)
        except BadLine as e:
            out.results[i] = e
            continue
        out.texts.append(text)
        out.spans.append(sp)
        out.where.append(i)
    return out


def tokenize(tokenizer: Any, rendered: Rendered) -> Any:
    """The tokenizer call for a rendered chunk. A fast tokenizer's Rust ``encode_batch`` releases the GIL,
    so this may run in another thread while the next chunk is read and rendered (data/prepare.py)."""
    return _encode(tokenizer, rendered.texts) if rendered.texts else []


@dataclass
class Finished:
    """A tokenized chunk: every usable example's tokens side by side in ``ids`` and ``mask`` (True: trained).

    ``results[i]`` is example ``i``'s ``(start, end)`` in those arrays, or the BadLine that skips it.
    """

    ids: np.ndarray  # int64
    mask: np.ndarray  # bool
    results: list[Any]

    def pair(self, i: int) -> tuple[list[int], list[int]]:
        """Example ``i`` as ``(input_ids, labels)`` lists, labels -100 where untrained."""
        a, b = self.results[i]
        ids = self.ids[a:b]
        return ids.tolist(), np.where(self.mask[a:b], ids, IGNORE_INDEX).tolist()


def _chunk_mask(all_offsets: list[Any], spans: list[list[tuple[int, int]]], lengths: np.ndarray,
                longest_text: int) -> np.ndarray:
    """Which tokens of a chunk start inside one of their example's spans (and are not empty).

    Vectorized over the chunk: token starts rise within each example (checked), so a span's tokens are
    one run, found by binary search; a chunk where they do not rise takes ``_mask_from_offsets`` per example.
    """
    total = int(lengths.sum())
    pairs = np.fromiter(chain.from_iterable(chain.from_iterable(all_offsets)), dtype=np.int64,
                        count=2 * total).reshape(-1, 2)
    starts, ends = pairs[:, 0], pairs[:, 1]
    rows = len(lengths)
    stride = longest_text + 1  # row j's keys lie in [j * stride, (j + 1) * stride)
    keys = np.repeat(np.arange(rows, dtype=np.int64) * stride, lengths) + starts
    if total and not bool(np.all(keys[1:] >= keys[:-1])):
        return np.concatenate([_mask_from_offsets(o, sp) for o, sp in zip(all_offsets, spans)] or
                              [np.zeros(0, dtype=bool)])
    counts = np.fromiter(map(len, spans), dtype=np.int64, count=rows)
    flat = np.fromiter(chain.from_iterable(chain.from_iterable(spans)), dtype=np.int64,
                       count=2 * int(counts.sum())).reshape(-1, 2)
    base = np.repeat(np.arange(rows, dtype=np.int64) * stride, counts)
    lo = np.searchsorted(keys, base + flat[:, 0], side="left")
    hi = np.searchsorted(keys, base + flat[:, 1], side="left")
    edges = np.zeros(total + 1, dtype=np.int64)
    np.add.at(edges, lo, 1)
    np.add.at(edges, hi, -1)
    return (np.cumsum(edges[:-1]) > 0) & (ends > starts)


def finish_chunk(tokenizer: Any, rendered: Rendered, encodings: Any, max_len: int, overlong: str) -> Finished:
    """Token ids and loss mask of a rendered chunk, from ``tokenize``'s answer (``_finish``'s rules, per example)."""
    results = list(rendered.results)
    if not rendered.texts:
        return Finished(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool), results)
    all_ids, all_offsets = _ids_offsets(encodings)
    lengths = np.fromiter(map(len, all_ids), dtype=np.int64, count=len(all_ids))
    ids = np.fromiter(chain.from_iterable(all_ids), dtype=np.int64, count=int(lengths.sum()))
    mask = _chunk_mask(all_offsets, rendered.spans, lengths, max(map(len, rendered.texts)))
    eos = tokenizer.eos_token_id
    texts = [j for j, i in enumerate(rendered.where) if rendered.examples[i].fmt == "text"] if eos is not None else []
    if texts:
        # So a model trained on raw text also learns where a document stops.
        at = np.cumsum(lengths)[texts]
        ids, mask = np.insert(ids, at, eos), np.insert(mask, at, True)
        lengths[texts] += 1
    trained = np.concatenate([[0], np.cumsum(mask)])
    start = 0
    for i, n in zip(rendered.where, lengths.tolist()):
        a, start = start, start + n
        if n > max_len:
            if overlong == "skip":
                results[i] = BadLine(f"over-long: {n} tokens > max_seq_length {max_len}")
                continue
            n = max_len
        if trained[a + n] == trained[a]:
            results[i] = BadLine(f"over-long: no assistant token within max_seq_length {max_len}" if n == max_len
                                 else "no assistant token after tokenization")
            continue
        results[i] = (a, a + n)
    return Finished(ids, mask, results)


def finish_batch(tokenizer: Any, rendered: Rendered, encodings: Any, max_len: int,
                 overlong: str) -> list[tuple[list[int], list[int]] | BadLine]:
    """Token ids and labels of each example of a rendered chunk, from ``tokenize``'s answer."""
    done = finish_chunk(tokenizer, rendered, encodings, max_len, overlong)
    return [r if isinstance(r, BadLine) else done.pair(i) for i, r in enumerate(done.results)]


def encode_batch(
    tokenizer: Any, examples: Sequence[Example], max_len: int, overlong: str
) -> list[tuple[list[int], list[int]] | BadLine]:
    """Encode many examples with one tokenizer call; a failing example yields its BadLine in place."""
    rendered = render_batch(tokenizer, examples)
    return finish_batch(tokenizer, rendered, tokenize(tokenizer, rendered), max_len, overlong)


def encode(tokenizer: Any, example: Example, max_len: int, overlong: str) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one example; labels are -100 except on assistant tokens."""
    (result,) = encode_batch(tokenizer, [example], max_len, overlong)
    if isinstance(result, BadLine):
        raise result
    return result
