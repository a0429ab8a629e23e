"""Which tokens carry the loss, checked against the built-in model's real ChatML template."""

from __future__ import annotations

import pytest

from conftest import UnstableTemplate, smol_tokenizer
from ultimate_trainer.data.encoding import TemplateError, encode
from ultimate_trainer.data.formats import BadLine, Example


def _ex(*turns: tuple[str, str]) -> Example:
    return Example([{"role": r, "content": c} for r, c in turns], "chat", source="t.jsonl:1", line=1)


def _trained(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Runs of consecutive trained tokens, as id lists."""
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != -100:
            assert lab == t, "a trained token's label is its own id"
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs



class _ChatmlWith:
    """A ChatML-shaped template double that renders each message's content through ``transform``."""

    def __init__(self, name: str, transform):
        self.chat_template, self.transform = name, transform

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        body = "".join(f"<s>{m['role']}\n{self.transform(m['content'])}</s>\n" for m in messages)
        return body + ("<s>assistant\n" if add_generation_prompt else "")

def test_single_turn_only_answer_and_end_of_turn_are_trained():
    tok = smol_tokenizer()
    ids, labels = encode(tok, _ex(("system", "Be brief."), ("user", "What is 2+2?"), ("assistant", "It is 4.")),
                         512, "skip")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    answer = tok("It is 4.", add_special_tokens=False)["input_ids"]
    assert _trained(ids, labels) == [answer + [im_end]]
    # Everything else (system, user, the role headers, the final newline) is masked.
    untrained = tok.decode([t for t, lab in zip(ids, labels) if lab == -100])
    assert untrained == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                         "<|im_start|>assistant\n\n")
    assert len(ids) == len(labels)


def test_multi_turn_every_assistant_turn_trained_users_not():
    tok = smol_tokenizer()
    ex = _ex(("system", "S"), ("user", "first question"), ("assistant", "first answer"),
             ("user", "second question"), ("assistant", "second answer"))
    ids, labels = encode(tok, ex, 512, "skip")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    runs = _trained(ids, labels)
    assert [tok.decode(r) for r in runs] == ["first answer<|im_end|>", "second answer<|im_end|>"]
    assert all(r[-1] == im_end for r in runs)
    masked_text = tok.decode([t for t, lab in zip(ids, labels) if lab == -100])
    assert "first question" in masked_text and "second question" in masked_text
    assert "answer" not in masked_text


def test_template_default_system_prompt_is_masked():
    # The SmolLM template inserts its own system prompt when none is given: it must not be trained.
    tok = smol_tokenizer()
    ids, labels = encode(tok, _ex(("user", "hi"), ("assistant", "hello")), 512, "skip")
    assert [tok.decode(r) for r in _trained(ids, labels)] == ["hello<|im_end|>"]
    assert "SmolLM" in tok.decode(ids)


def test_text_format_trains_every_token_plus_eos():
    tok = smol_tokenizer()
    ex = Example([{"role": "text", "content": "Plain document text."}], "text")
    ids, labels = encode(tok, ex, 512, "skip")
    assert labels == ids
    assert ids[:-1] == tok("Plain document text.", add_special_tokens=False)["input_ids"]
    assert ids[-1] == tok.eos_token_id


def test_overlong_skip_and_truncate():
    tok = smol_tokenizer()
    ex = _ex(("user", "q"), ("assistant", "many words " * 50))
    full_ids, _ = encode(tok, ex, 4096, "skip")
    with pytest.raises(BadLine, match=rf"over-long: {len(full_ids)} tokens > max_seq_length 40"):
        encode(tok, ex, 40, "skip")
    ids, labels = encode(tok, ex, 40, "truncate")
    assert ids == full_ids[:40] and labels[-1] == ids[-1]


def test_template_that_is_not_prefix_stable_is_a_clear_error():
    with pytest.raises(TemplateError, match="not prefix-stable"):
        encode(UnstableTemplate(), _ex(("user", "q"), ("assistant", "a")), 64, "skip")


def test_one_render_gives_the_same_spans_as_prefix_renders_and_renders_once(monkeypatch):
    from ultimate_trainer.data import encoding

    tok = smol_tokenizer()
    convs = [_ex(("user", "q"), ("assistant", "a")),
             _ex(("system", "S"), ("user", "q1"), ("assistant", " padded answer  "), ("user", "q2"),
                 ("assistant", "line one\nline two\n")),
             _ex(("user", "repeat"), ("assistant", "same"), ("user", "same"), ("assistant", "same"))]
    for ex in convs:
        full = encoding.render_chat(tok, ex.messages, False)
        shape = encoding._turn_shape(tok)
        assert shape is not None and shape.header == "<|im_start|>assistant\n" and shape.closing == "<|im_end|>"
        assert encoding._spans_one_render(ex, full, shape) == encoding._spans_by_prefixes(tok, ex, full)
    calls = []
    real = encoding.render_chat
    monkeypatch.setattr(encoding, "render_chat", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(encoding, "VERIFY_FIRST", 0)
    monkeypatch.setattr(encoding, "VERIFY_EVERY", 10**9)
    monkeypatch.setattr(encoding, "concatenation", lambda tok: None)  # the template itself renders
    encode(tok, convs[1], 512, "skip")
    assert len(calls) == 1  # one render for a two-turn conversation, not five


def test_a_template_that_rewrites_content_falls_back_to_prefix_renders():
    from ultimate_trainer.data import encoding

    # ChatML that strips the answer: the content is not verbatim in the rendering.
    tok = _ChatmlWith("trimming-chatml", str.strip)
    ex = _ex(("user", "q"), ("assistant", "  spaced  "))
    full, spans = encoding.render(tok, ex)
    assert encoding._turn_shape(tok) is not None
    assert spans == encoding._spans_by_prefixes(tok, ex, full)
    assert [full[a:b] for a, b in spans] == ["spaced</s>"]


def test_a_shape_that_disagrees_with_prefix_renders_is_distrusted():
    from ultimate_trainer.data import encoding

    class CountsAnswers:
        """ChatML opening with the number of answers: prefix-stable for one answer only."""

        chat_template = "counts-answers"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            n = sum(m["role"] == "assistant" for m in messages)
            body = "".join(f"<s>{m['role']}\n{m['content']}</s>\n" for m in messages)
            return f"<{min(n, 2) if n > 1 else 1}>" + body + ("<s>assistant\n" if add_generation_prompt else "")

    tok = CountsAnswers()
    one = _ex(("user", "<s>assistant\nA</s>\n is what I got"), ("assistant", "A"))
    full, spans = encoding.render(tok, one)
    assert [full[a:b] for a, b in spans] == ["A</s>"] and spans[0][0] > full.index("is what I got")
    assert encoding._turn_shape(tok) is not None
    with pytest.raises(TemplateError, match="not prefix-stable"):  # the one-render spans would be wrong here
        encoding.render(tok, _ex(("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "b")))
    assert encoding._turn_shape(tok) is None  # from now on: prefix renders only


def test_the_rust_tokenizer_call_gives_what_the_tokenizer_call_gives():
    from ultimate_trainer.data.encoding import _tokenize

    tok = smol_tokenizer()
    texts = ["<|im_start|>user\nHi there<|im_end|>\n", "plain text, ünïcode & emoji 🙂", ""]
    ids, offsets = _tokenize(tok, texts)
    ref = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    assert ids == [list(x) for x in ref["input_ids"]]
    assert [list(map(tuple, o)) for o in offsets] == [list(map(tuple, o)) for o in ref["offset_mapping"]]


def _conversations(n: int) -> list[Example]:
    """Varied plain conversations: with and without a system turn, one to three exchanges, awkward text."""
    import random

    rng = random.Random(5)
    texts = ["Hi", " padded  ", "two\nlines\n", "<think>\nhmm\n</think>\n\nok", "{{ jinja }} {% if %}", "ünï 🙂 中文",
             "<|im_start|>user\nquoted<|im_end|>", "\t"]
    out = []
    for _ in range(n):
        turns = [("system", rng.choice(texts))] if rng.random() < 0.4 else []
        for _ in range(rng.randint(1, 3)):
            turns += [("user", rng.choice(texts)), ("assistant", rng.choice(texts))]
        out.append(_ex(*turns))
    return out


def test_fixed_pieces_render_exactly_what_the_chatml_template_renders():
    from ultimate_trainer.data import encoding
    from ultimate_trainer.data.chat_template import concatenation

    tok = smol_tokenizer()
    pieces = concatenation(tok)
    assert pieces is not None and pieces.gap[("user", "assistant")] == "<|im_end|>\n<|im_start|>assistant\n"
    for ex in _conversations(200):
        assert pieces.render(ex.messages) == encoding.render_chat(tok, ex.messages, False)
    # Tool calls and empty turns are left to the template.
    assert pieces.render([{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]) is None


@pytest.mark.parametrize("template", [
    # Llama 3 style: the content is trimmed
    "{% for m in messages %}<|start|>{{ m['role'] }}\n\n{{ m['content'] | trim }}<|eot|>{% endfor %}",
    # Qwen3 style: the reasoning of an answer is dropped from the rendering
    "{% for m in messages %}{% if m.role == 'assistant' and '</think>' in m.content %}"
    "{% set c = m.content.split('</think>')[-1].lstrip('\\n') %}{% else %}{% set c = m.content %}{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ c }}<|im_end|>\n{% endfor %}",
    # the system prompt moves into the first user turn (Mistral, Gemma)
    "{% for m in messages %}{% if m.role == 'system' %}{% set ns = namespace() %}{% elif loop.index0 == 1 and "
    "messages[0].role == 'system' %}[INST] {{ messages[0].content }}\n\n{{ m.content }}[/INST]{% else %}"
    "<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endif %}{% endfor %}",
])
def test_templates_that_rewrite_content_get_no_fixed_pieces(template):
    import copy

    from ultimate_trainer.data import encoding
    from ultimate_trainer.data.chat_template import concatenation

    tok = copy.deepcopy(smol_tokenizer())
    tok.chat_template = template
    assert concatenation(tok) is None
    ex = _ex(("user", "q"), ("assistant", "<think>\nx\n</think>\n\n a "))
    assert encoding._render_full(tok, ex) == encoding.render_chat(tok, ex.messages, False)


def test_fixed_pieces_that_disagree_with_the_template_are_dropped(monkeypatch):
    from ultimate_trainer.data import encoding
    from ultimate_trainer.data.chat_template import concatenation

    # ChatML, except that one word is rendered as stars: no probe contains it.
    tok = _ChatmlWith("censoring-chatml", lambda text: text.replace("SECRET", "***"))
    assert concatenation(tok) is not None
    monkeypatch.setattr(encoding, "VERIFY_EVERY", 1)
    plain = _ex(("user", "q"), ("assistant", "a"))
    assert encoding._render_full(tok, plain) == encoding.render_chat(tok, plain.messages, False)
    assert concatenation(tok) is not None
    secret = _ex(("user", "the SECRET"), ("assistant", "a"))
    assert encoding._render_full(tok, secret) == "<s>user\nthe ***</s>\n<s>assistant\na</s>\n"
    assert concatenation(tok) is None  # from now on: the template renders


def test_chunk_mask_equals_the_per_example_mask_from_offsets():
    import numpy as np

    from ultimate_trainer.data import encoding

    tok = smol_tokenizer()
    examples = _conversations(120) + [Example([{"role": "text", "content": "plain document"}], "text")]
    rendered = encoding.render_batch(tok, examples)
    ids, offsets = encoding._tokenize(tok, rendered.texts)
    lengths = np.array([len(x) for x in ids])
    got = encoding._chunk_mask(offsets, rendered.spans, lengths, max(map(len, rendered.texts)))
    want = np.concatenate([encoding._mask_from_offsets(o, sp) for o, sp in zip(offsets, rendered.spans)])
    assert got.any() and np.array_equal(got, want)
    # Offsets that do not rise within an example (some tokenizers) take the per-example computation.
    odd = [[(0, 2), (5, 7), (2, 5)], [(0, 3), (3, 4)]]
    spans = [[(2, 6)], [(3, 4)]]
    got = encoding._chunk_mask(odd, spans, np.array([3, 2]), 7)
    assert got.tolist() == [False, True, True, False, True]
    # Each example comes back as encode() gives it on its own (the text one with its EOS).
    done = encoding.finish_chunk(tok, rendered, encoding.tokenize(tok, rendered), 4096, "skip")
    for i, ex in enumerate(examples):
        assert done.pair(i) == encode(tok, ex, 4096, "skip")
    assert done.pair(len(examples) - 1)[0][-1] == tok.eos_token_id
