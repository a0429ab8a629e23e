"""Held-out evaluation: answer matchers, running accuracy with trends, greedy generation, val loss.

Matchers (``eval.matcher``):

- ``exact``       the stripped strings are equal
- ``normalized``  equal after Unicode NFKC, case folding, dropping punctuation/symbols and collapsing
                  whitespace (the default)
- ``contains``    the normalized expected answer occurs in the normalized generated one
- ``numeric``     the first number of each (``1,000`` = ``1000.0``) agrees within a relative 1e-6; a
                  text without digits is read for a number in English words ("eight",
                  "twenty-four", "one hundred and five"), so "An octagon has eight sides." is 8

A generated answer that opens with a closed ``<think>...</think>`` block (reasoning models such as
Qwen3 and DeepSeek-R1's distillations think before answering, even when the data has no reasoning)
is judged on what follows the block; an answer still inside an unclosed block has no answer yet and
counts as wrong (data/reasoning.py describes how reasoning is trained).

Accuracy is counted over individual scored answers, as percentages: ``overall`` (all answers since
the first run), ``last_20`` and ``last_50`` (the newest 20 and 50). The ``trend`` is ``improving``
when last_50 beats overall by more than ``eval.margin_trend`` points, ``regressing`` when it trails
by more, else ``stable``; it is null until 20 answers exist. The ``signals`` say whether last_20
(last_50) is ``above``, ``level`` or ``below`` overall by ``eval.margin_last_20`` (``_50``).
"""

from __future__ import annotations

import copy
import logging
import math
import re
import unicodedata
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ultimate_trainer.core import status

log = logging.getLogger(__name__)

MATCHERS = ("exact", "normalized", "contains", "numeric")
MIN_ANSWERS_FOR_TREND = 20
NUMERIC_REL_TOL = 1e-6
_THINK = re.compile(r"\A\s*<think>.*?</think>\s*", re.DOTALL)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_SMALL = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}
_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9}
_NUMBER_WORD = "|".join(sorted([*_SMALL, *_TENS, "hundred", *_SCALES], key=len, reverse=True))
# A run of number words joined by spaces, hyphens or "and" ("one hundred and five", "twenty-four"),
# or "a hundred" / "a thousand".
_WORDS = re.compile(rf"\b(?:an?\s+(?=hundred|thousand|million|billion))?(?:{_NUMBER_WORD})"
                    rf"(?:(?:[\s-]+|\s+and\s+)(?:{_NUMBER_WORD}))*\b", re.IGNORECASE)

# "one" as a pronoun, not a number: "no one", "the one", "one another", "one who", "one's" ("one of
# them" stays a count: "only one of them is prime").
_PRONOUN_ONE_BEFORE = re.compile(r"\b(?:no|any|some|every|each|the|this|that|which|another|every\s+single)\s+\Z",
                                 re.IGNORECASE)
_PRONOUN_ONE_AFTER = re.compile(r"\A(?:\s+(?:another|who|which|that|must|should|can|could|might|may)\b|'s\b|’s\b)",
                                re.IGNORECASE)


def normalize(text: str) -> str:
    """Case-, whitespace- and punctuation-insensitive form of ``text`` (Unicode-aware)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(" " if unicodedata.category(c)[0] in "PSZC" else c for c in text)
    return " ".join(kept.split())


def first_number(text: str) -> float | None:
    """The first number written in digits in ``text``; when it has none, the first in English words."""
    text = unicodedata.normalize("NFKC", text)
    m = _NUMBER.search(text)
    if m is None:
        return number_in_words(text)
    try:
        return float(m.group(0).replace(",", ""))
    except ValueError:
        return None


def number_in_words(text: str) -> float | None:
    """The first number spelled out in English words in ``text`` ("twenty-four" is 24), or None.

    Words that cannot continue the number they follow end it: "three two" reads 3, "five hundred
    twelve" 512, "one thousand two hundred" 1200. A lone "one" used as a pronoun ("no one", "the
    one", "one who", "one's") is not a number.
    """
    for m in _WORDS.finditer(text):
        if m.group(0).casefold() != "one" or not (_PRONOUN_ONE_BEFORE.search(text[:m.start()])
                                                 or _PRONOUN_ONE_AFTER.match(text[m.end():])):
            break
    else:
        return None
    words = [w for w in re.split(r"[\s-]+", m.group(0).casefold()) if w not in ("and", "a", "an")]
    total, current, last = 0, 0, None  # last: "small", "tens", "hundred", "scale"
    for w in words:
        if w in _SMALL:
            if last == "small" or (last == "tens" and _SMALL[w] >= 10) or (last is not None and _SMALL[w] == 0):
                break
            current, last = current + _SMALL[w], "small"
        elif w in _TENS:
            if last in ("small", "tens"):
                break
            current, last = current + _TENS[w], "tens"
        elif w == "hundred":
            if last in ("hundred", "scale") or current >= 100:
                break
            current, last = (current or 1) * 100, "hundred"
        else:
            if last == "scale":
                break
            total, current, last = total + (current or 1) * _SCALES[w], 0, "scale"
    return float(total + current)


def _numeric(generated: str, expected: str) -> bool:
    a, b = first_number(generated), first_number(expected)
    if a is None or b is None:
        return False
    return math.isclose(a, b, rel_tol=NUMERIC_REL_TOL, abs_tol=1e-12)


_SCORERS: dict[str, Callable[[str, str], bool]] = {
    "exact": lambda g, e: g.strip() == e.strip(),
    "normalized": lambda g, e: normalize(g) == normalize(e),
    "contains": lambda g, e: normalize(e) in normalize(g) if normalize(e) else not normalize(g),
    "numeric": _numeric,
}


def final_answer(generated: str) -> str:
    """``generated`` less a leading closed ``<think>`` block; empty while the block is still open."""
    m = _THINK.match(generated)
    if m is not None:
        return generated[m.end():]
    return "" if generated.lstrip().startswith("<think>") else generated


def score(matcher: str, generated: str, expected: str) -> bool:
    """Whether ``generated`` (its final answer, after any reasoning) counts as the ``expected`` answer."""
    try:
        return _SCORERS[matcher](final_answer(generated), expected)
    except KeyError:
        raise ValueError(f"unknown matcher {matcher!r}; choose one of {', '.join(MATCHERS)}") from None


class AccuracyTracker:
    """Running accuracy over every scored answer, with last-20/last-50 windows and a trend."""

    def __init__(self, margin_last_20: float = 5.0, margin_last_50: float = 3.0, margin_trend: float = 3.0):
        self.margin_last_20, self.margin_last_50, self.margin_trend = margin_last_20, margin_last_50, margin_trend
        self.answers = 0
        self.correct = 0
        self.evaluations = 0
        self._recent: deque[bool] = deque(maxlen=50)

    def add(self, correct: bool) -> None:
        """One scored answer."""
        self.answers += 1
        self.correct += bool(correct)
        self._recent.append(bool(correct))

    def add_evaluation(self, results: Iterable[bool]) -> None:
        """The answers of one evaluation (counts one evaluation)."""
        for r in results:
            self.add(r)
        self.evaluations += 1

    @classmethod
    def from_history(cls, examples_jsonl: str | Path, evals_jsonl: str | Path | None = None,
                     margin_last_20: float = 5.0, margin_last_50: float = 3.0,
                     margin_trend: float = 3.0) -> "AccuracyTracker":
        """Rebuild from ``history/examples.jsonl`` (and count ``history/evals.jsonl``), one line at a time."""
        t = cls(margin_last_20, margin_last_50, margin_trend)
        for rec in status.iter_jsonl(examples_jsonl):
            if isinstance(rec.get("correct"), bool):
                t.add(rec["correct"])
        if evals_jsonl is not None:
            t.evaluations = sum(1 for _ in status.iter_jsonl(evals_jsonl))
        return t

    def _window(self, n: int) -> float | None:
        if not self._recent:
            return None
        last = list(self._recent)[-n:]
        return 100.0 * sum(last) / len(last)

    @property
    def overall(self) -> float | None:
        return 100.0 * self.correct / self.answers if self.answers else None

    @property
    def last_20(self) -> float | None:
        return self._window(20)

    @property
    def last_50(self) -> float | None:
        return self._window(50)

    @property
    def trend(self) -> str | None:
        if self.answers < MIN_ANSWERS_FOR_TREND:
            return None
        diff = self.last_50 - self.overall  # type: ignore[operator]
        if diff > self.margin_trend:
            return "improving"
        if diff < -self.margin_trend:
            return "regressing"
        return "stable"

    def _signal(self, value: float | None, margin: float) -> str | None:
        if self.answers < MIN_ANSWERS_FOR_TREND or value is None:
            return None
        diff = value - self.overall  # type: ignore[operator]
        return "above" if diff > margin else "below" if diff < -margin else "level"

    @property
    def signals(self) -> dict[str, str | None]:
        return {"last_20": self._signal(self.last_20, self.margin_last_20),
                "last_50": self._signal(self.last_50, self.margin_last_50)}

    def snapshot(self) -> dict[str, Any]:
        """The ``accuracy`` object of training_status.json."""
        r = lambda v: None if v is None else round(v, 2)  # noqa: E731
        return {
            "overall": r(self.overall),
            "last_20": r(self.last_20),
            "last_50": r(self.last_50),
            "trend": self.trend,
            "evaluations": self.evaluations,
            "answers": self.answers,
            "signals": self.signals,
        }


# --------------------------------------------------------------------------- model-side: generation, val loss

def _device(model: Any) -> Any:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return "cpu"


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS and the template's end-of-turn token: generation stops at whichever comes first."""
    from ultimate_trainer.data.encoding import end_of_turn

    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    closing = end_of_turn(tokenizer)
    if closing:
        closing_ids = tokenizer(closing.strip(), add_special_tokens=False)["input_ids"]
        if len(closing_ids) == 1 and closing_ids[0] not in ids:
            ids.append(closing_ids[0])
    return ids


def _greedy_config(model: Any, max_new_tokens: int, pad_token_id: int | None,
                   stop_ids: list[int] | None = None) -> Any:
    # A copy with the sampling knobs put back to the library defaults, so greedy decoding does not warn
    # about a checkpoint's temperature/top_p (None would not do: generate() fills None from the model).
    gc = copy.deepcopy(model.generation_config)
    defaults_of = getattr(type(gc), "_get_default_generation_params", None)
    defaults = defaults_of() if callable(defaults_of) else {}
    gc.max_new_tokens = max_new_tokens
    gc.max_length = None
    gc.do_sample = False
    gc.num_beams = 1
    gc.use_cache = True  # training turns it off for gradient checkpointing; generating without it is quadratic
    if stop_ids:
        gc.eos_token_id = stop_ids
    for knob in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
        if hasattr(gc, knob):
            setattr(gc, knob, defaults.get(knob))
    if pad_token_id is not None:
        gc.pad_token_id = pad_token_id
    return gc


def _stop_criteria(progress: Any) -> Any:
    """Generation ends at the next token once ``progress`` says stop (a SIGTERM is honoured within a token)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), progress.stopped(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Stop()])


def generate_answers(model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]], max_new_tokens: int,
                     batch_size: int, progress: Any = None) -> list[str]:
    """Greedy answers to chat ``prompts`` (each a message list ending before the answer), stripped.

    Prompts are batched by length (less padding), each answer stops at EOS or the template's end of
    turn, and the KV cache is on even when training uses gradient checkpointing. ``progress``
    (core/progress.py ``Progress``) is advanced after each batch and asked at every generated token
    whether to stop: then ``Stopped`` is raised and no answer is returned.
    """
    import torch

    from ultimate_trainer.model.loading import inference_kernels

    if not prompts:
        return []
    was_training = model.training
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    if tokenizer.pad_token is None:
        # Batching needs a pad token; left pads are masked out by attention_mask, so EOS serves.
        tokenizer.pad_token = tokenizer.eos_token
    gc = _greedy_config(model, max_new_tokens, tokenizer.pad_token_id, stop_token_ids(tokenizer))
    device = _device(model)
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    by_length = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers: list[str] = [""] * len(texts)
    # generate() fills unset values from the model's own generation config (a checkpoint's max_length
    # would clash with max_new_tokens and warn at every evaluation): lend it ours for the duration.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    own_config = inner.generation_config
    try:
        inner.generation_config = gc
        model.eval()
        tokenizer.padding_side = "left"  # so every prompt ends right where generation starts
        with torch.inference_mode(), inference_kernels(model):
            for i in range(0, len(texts), batch_size):
                chunk = by_length[i:i + batch_size]
                enc = tokenizer([texts[j] for j in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
                enc = {k: v.to(device) for k, v in enc.items()}
                if progress is not None:
                    progress.check()
                    out = model.generate(**enc, generation_config=gc, stopping_criteria=_stop_criteria(progress))
                    progress.check()  # a batch cut short by the stop is not an answer
                else:
                    out = model.generate(**enc, generation_config=gc)
                new = out[:, enc["input_ids"].shape[1]:]
                for j, text in zip(chunk, tokenizer.batch_decode(new, skip_special_tokens=True)):
                    answers[j] = text.strip()
                if progress is not None:
                    progress.advance(len(chunk))
    finally:
        inner.generation_config = own_config
        tokenizer.padding_side = old_side
        if old_pad is None:
            tokenizer.pad_token = None
        model.train(was_training)
    return answers


def _packed_batches(encoded: list[tuple[list[int], list[int]]], batch_size: int, max_tokens: int,
                    pad_token_id: int, flat: bool = False) -> list[dict[str, Any]]:
    """``encoded`` laid out as training lays out its rows (data/packing.py), one collated batch each.

    ``flat``: ``batch_size`` examples back to back in one row, a batch of one row (padding-free);
    otherwise packed into rows of at most ``max_tokens``, ``batch_size`` rows a batch."""
    import numpy as np

    from ultimate_trainer.data.collate import PackedCollator, PackedRows
    from ultimate_trainer.data.packing import flat_rows, pack_rows

    examples = [{"input_ids": ids, "labels": labels} for ids, labels in encoded]
    collate = PackedCollator(pad_token_id)
    if flat:
        rows = PackedRows(examples, flat_rows(range(len(examples)), batch_size))
        return [collate([rows[r]]) for r in range(len(rows))]
    lengths = np.array([len(ids) for ids, _ in encoded])
    rows = PackedRows(examples, pack_rows(range(len(examples)), lengths, max_tokens, 0))
    return [collate([rows[r] for r in range(i, min(i + batch_size, len(rows)))])
            for i in range(0, len(rows), batch_size)]


def validation_loss(model: Any, encoded: list[tuple[list[int], list[int]]], batch_size: int,
                    collator: Any, max_tokens: int | None = None, progress: Any = None) -> float | None:
    """Mean loss per trained token over ``encoded`` held-out examples; None when there are none.

    With ``max_tokens``, padding-free, each example isolated from the others. When the model's
    attention takes the examples' boundaries (``segmented_sdpa``, FlashAttention: model/attention.py),
    as padding-free training does: ``batch_size`` examples back to back in one row a forward pass,
    with ``cu_seq_lens``. Otherwise rows of at most ``max_tokens`` packed tokens, ``batch_size`` rows
    a pass under a block-diagonal mask. Without ``max_tokens``, the examples are padded by
    ``collator``, ``batch_size`` at a time.
    """
    import torch

    from ultimate_trainer.data.collate import packed_inputs
    from ultimate_trainer.model.attention import takes_boundaries
    from ultimate_trainer.model.loading import inference_kernels

    if not encoded:
        return None
    was_training = model.training
    device = _device(model)
    total, count = 0.0, 0
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    flat = bool(max_tokens) and takes_boundaries(attn)
    if max_tokens:
        batches = _packed_batches(encoded, batch_size, max_tokens, collator.pad_token_id, flat)
    else:
        batches = [collator([{"input_ids": ids, "labels": labels} for ids, labels in encoded[i:i + batch_size]])
                   for i in range(0, len(encoded), batch_size)]
    try:
        model.eval()
        with torch.inference_mode(), inference_kernels(model):
            for batch in batches:
                if progress is not None:
                    progress.check()  # a stop ends the pass between batches (Stopped)
                batch = packed_inputs({k: v.to(device) for k, v in batch.items()}, attn,
                                      getattr(model, "dtype", torch.float32), flat)
                # The model shifts labels by one: the tokens that count are those after the first
                # (a packed row's examples each start with an untrained label).
                n = int((batch["labels"][:, 1:] != -100).sum())
                if n == 0:
                    continue
                loss = model(**batch).loss
                total += float(loss) * n
                count += n
    finally:
        model.train(was_training)
    return total / count if count else None


def stream_reply(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, stats: dict[str, Any] | None = None) -> Iterator[str]:
    """The model's answer to a chat, yielded as it grows (the whole text so far each time).

    Greedy at ``temperature`` 0, else sampled; it stops at EOS or the template's end of turn.
    Generation runs in a helper thread that a streamer feeds; it is joined before returning, also when
    the caller stops iterating early. ``stats``, when given, receives ``prompt_tokens``,
    ``completion_tokens`` and ``finish_reason`` (``stop`` or ``length``) once the answer is complete.
    """
    import threading

    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    gc = _greedy_config(model, max_new_tokens, tokenizer.pad_token_id or tokenizer.eos_token_id,
                        stop_token_ids(tokenizer))
    if temperature > 0:
        gc.do_sample, gc.temperature, gc.top_p = True, temperature, top_p
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    enc = {k: v.to(_device(model)) for k, v in enc.items()}
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    failure: list[BaseException] = []
    stop = threading.Event()

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    produced: list[tuple[int, int]] = []  # (new tokens, the last one)

    def work() -> None:
        try:
            with torch.inference_mode():
                out = model.generate(**enc, generation_config=gc, streamer=streamer,
                                     stopping_criteria=StoppingCriteriaList([_Stop()]))
            produced.append((int(out.shape[1] - enc["input_ids"].shape[1]), int(out[0, -1])))
        except BaseException as e:  # reported to the caller below
            failure.append(e)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True, name="generate")
    thread.start()
    out = ""
    try:
        for piece in streamer:
            out += piece
            yield out
    finally:
        stop.set()  # a caller that stopped listening (a closed page) stops the generation too
        thread.join()
    if failure:
        raise failure[0]
    if stats is not None and produced:
        n, last = produced[0]
        stopped = last in (gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id])
        stats.update(prompt_tokens=int(enc["input_ids"].shape[1]), completion_tokens=n,
                     finish_reason="stop" if stopped or n < max_new_tokens else "length")
