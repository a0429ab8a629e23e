"""Reading JSONL: formats, bad lines with file:line, held-out split, reports, the token store."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import UnstableTemplate, chat, make_cfg, smol_tokenizer, write_jsonl
from ultimate_trainer.data import prepare as data
from ultimate_trainer.data.collate import Collator
from ultimate_trainer.core import status
from ultimate_trainer.core.records import FileReport
from ultimate_trainer.data.encoding import TemplateError
from ultimate_trainer.data.formats import BadLine, parse_line
from ultimate_trainer.data.heldout import is_heldout
from ultimate_trainer.data.tokenstore import TokenStore

SYS = "Be brief."


def _line(obj) -> bytes:
    return json.dumps(obj).encode()


# ------------------------------------------------------------------ formats

def test_chat_format_keeps_messages_and_metadata():
    ex = parse_line(_line(chat("hi", "hello", system="S", metadata={"topic": "greeting"})), SYS)
    assert ex.fmt == "chat"
    assert ex.messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello"}]
    assert ex.metadata == {"topic": "greeting"}


def test_system_prompt_inserted_only_when_absent():
    ex = parse_line(_line(chat("hi", "hello")), SYS)
    assert ex.messages[0] == {"role": "system", "content": SYS}
    ex = parse_line(_line(chat("hi", "hello", system="Own")), SYS)
    assert [m["content"] for m in ex.messages if m["role"] == "system"] == ["Own"]


def test_multi_turn_chat_prompt_and_expected():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    ex = parse_line(_line({"messages": msgs}), SYS)
    assert ex.expected == "d"
    assert [m["content"] for m in ex.prompt_messages] == [SYS, "a", "b", "c"]
    assert ex.prompt_text == "c"


def test_sharegpt_roles_mapped():
    obj = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"},
                             {"from": "gpt", "value": "a"}, {"from": "user", "value": "q2"},
                             {"from": "model", "value": "a2"}]}
    ex = parse_line(_line(obj), SYS)
    assert ex.fmt == "sharegpt"
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant", "user", "assistant"]


@pytest.mark.parametrize("key", ["response", "completion"])
def test_prompt_response_and_completion(key):
    ex = parse_line(_line({"prompt": "p", key: "r"}), SYS)
    assert ex.fmt == "prompt_response"
    assert ex.messages[1:] == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}]


def test_alpaca_joins_instruction_and_input():
    ex = parse_line(_line({"instruction": "Translate", "input": "chat", "output": "cat"}), SYS)
    assert ex.fmt == "alpaca"
    assert ex.messages[1] == {"role": "user", "content": "Translate\n\nchat"}
    ex = parse_line(_line({"instruction": "Say hi", "input": "", "output": "hi"}), SYS)
    assert ex.messages[1]["content"] == "Say hi"


def test_text_format_has_no_roles():
    ex = parse_line(_line({"text": "raw document"}), SYS)
    assert ex.fmt == "text" and ex.is_text
    assert ex.messages == [{"role": "text", "content": "raw document"}]


@pytest.mark.parametrize("raw, reason", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"messages": [', "invalid JSON: "),
    (b"[1, 2]", "not a JSON object: it is a list"),
    (b'{"foo": 1, "bar": 2}', "unknown shape (keys: bar, foo): none of the accepted shapes' keys is there"),
    (_line({"messages": [{"role": "user", "content": "q"}]}), "no assistant turn"),
    (_line(chat("q", "  ")), "empty assistant turn"),
    (_line({"messages": [{"role": "robot", "content": "x"}]}), "message 1: unknown role \"robot\""),
    (_line({"messages": [{"role": "user", "content": 3}]}), "message 1 content is a number (3), not a string"),
    (_line({"messages": [{"role": "assistant", "content": "a"}]}), "no user turn before the assistant turn"),
    (_line({"conversations": [{"from": "alien", "value": "x"}]}), "turn 1: unknown speaker"),
    (_line({"prompt": "p", "response": ""}), "empty assistant turn"),
    (_line({"text": "  "}), "empty text"),
    (_line({"text": "t", "metadata": [1]}), "metadata is a list, not an object"),
    (b"x" * 200, "line longer than 120 bytes"),
])
def test_bad_line_reasons(raw, reason):
    with pytest.raises(BadLine) as e:
        parse_line(raw, SYS, max_line_bytes=120)
    assert str(e.value).startswith(reason)


# ------------------------------------------------------------------ prepare(): reports and bad lines

def _prepare(tmp_path, files, **data_cfg):
    cfg = make_cfg(tmp_path, **data_cfg)
    return data.prepare(files, smol_tokenizer(), cfg, tmp_path / "store", tmp_path / "status")


def test_bad_lines_reported_with_line_numbers_and_run_continues(tmp_path):
    long_answer = "x " * 300  # > 256 tokens, < 700 bytes
    f = write_jsonl(tmp_path / "mixed.jsonl", [
        chat("q1", "a1"),
        b"{not json",
        b"\xc3\x28",
        {"unknown": 1},
        {"messages": [{"role": "user", "content": "q"}]},
        chat("q", ""),
        chat("q", long_answer),
        b"y" * 800,
        b"",
        {"prompt": "p", "completion": "c"},
    ])
    p = _prepare(tmp_path, [f], max_line_bytes=700, heldout_fraction=0.0)
    rep = p.reports[str(f)]
    bad = {b["line"]: b["reason"] for b in rep.bad}
    assert bad[2].startswith("invalid JSON")
    assert bad[3].startswith("not UTF-8")
    assert bad[4].startswith("unknown shape (keys: unknown): none of the accepted shapes' keys is there")
    assert bad[5] == "no assistant turn"
    assert bad[6] == "empty assistant turn"
    assert bad[7].startswith("over-long: ") and "> max_seq_length 256" in bad[7]
    assert bad[8] == "line longer than 700 bytes (800 bytes)"
    assert set(bad) == {2, 3, 4, 5, 6, 7, 8}
    assert rep.lines == 10 and rep.bad_lines == 7 and rep.examples == 2
    assert rep.formats["chat"] == 1 and rep.formats["prompt_response"] == 1
    assert rep.usable is True and rep.error is None
    assert len(p.train) == 2
    on_disk = status.read_json(status.report_path(tmp_path / "status", f))
    assert on_disk == rep.to_json()
    assert FileReport.from_json(on_disk, strict=True) == rep  # every field, of its documented type, and no other


def test_report_sha256_and_size_match_file(tmp_path):
    import hashlib

    f = write_jsonl(tmp_path / "a.jsonl", [chat(f"q{i}", f"a{i}") for i in range(5)])
    rep = _prepare(tmp_path, [f]).reports[str(f)]
    content = f.read_bytes()
    assert rep.sha256 == hashlib.sha256(content).hexdigest()
    assert rep.size_bytes == len(content)


def test_last_line_without_newline_and_crlf_are_read(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes(_line(chat("q1", "a1")) + b"\r\n" + _line(chat("q2", "a2")))
    p = _prepare(tmp_path, [f], heldout_fraction=0.0)
    assert p.reports[str(f)].examples == 2 and p.reports[str(f)].bad_lines == 0


def test_overlong_truncate_keeps_cut_example(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [chat("q", "word " * 400)])
    p = _prepare(tmp_path, [f], overlong="truncate", heldout_fraction=0.0)
    assert len(p.train) == 1 and p.train.lengths[0] == 256
    assert p.train[0]["labels"][-1] != -100


def test_overlong_truncate_with_no_assistant_token_left_is_bad(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [chat("word " * 400, "answer")])
    p = _prepare(tmp_path, [f], overlong="truncate", heldout_fraction=0.0)
    assert p.reports[str(f)].bad == [{"line": 1, "reason": "over-long: no assistant token within max_seq_length 256"}]
    assert [u[0] for u in p.unusable] == [str(f)]


def test_file_with_no_usable_example_is_unusable(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [chat("q", "a")])
    bad = write_jsonl(tmp_path / "bad.jsonl", [b"nope", {"x": 1}])
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.jsonl"
    p = _prepare(tmp_path, [good, bad, empty, missing])
    reasons = dict(p.unusable)
    assert set(reasons) == {str(bad), str(empty), str(missing)}
    assert reasons[str(bad)] == "no usable example (2 bad lines; first: line 1: invalid JSON: Expecting value at column 1)"
    assert "empty" in reasons[str(empty)] and "\n" not in reasons[str(empty)]
    assert reasons[str(missing)].startswith("cannot read: ")
    assert p.reports[str(bad)].usable is False
    assert p.reports[str(good)].usable is True


# ------------------------------------------------------------------ held-out split

def test_heldout_is_deterministic_capped_and_never_trained(tmp_path):
    records = [chat(f"question {i}", f"answer {i}") for i in range(400)]
    f = write_jsonl(tmp_path / "a.jsonl", records)
    p1 = _prepare(tmp_path, [f], heldout_fraction=0.1, heldout_max_per_file=15)
    p2 = _prepare(tmp_path, [f], heldout_fraction=0.1, heldout_max_per_file=15)
    held1 = [e.source for e in p1.heldout]
    assert held1 == [e.source for e in p2.heldout]
    assert len(held1) == 15
    assert p1.reports[str(f)].heldout_examples == 15 and p1.reports[str(f)].train_examples == 385
    # Same line, held out whatever its position: decided by content.
    assert all(is_heldout(json.dumps(records[e.line - 1]).encode(), 0.1) for e in p1.heldout)
    held_answers = {e.expected for e in p1.heldout}
    tok = smol_tokenizer()
    trained = {tok.decode([t for t, lab in zip(x["input_ids"], x["labels"]) if lab != -100],
                          skip_special_tokens=True) for x in p1.train}
    assert not held_answers & trained
    assert len(p1.heldout_encoded) == 15


def test_tiny_file_entirely_heldout_is_trained_instead(tmp_path):
    # Pick a line whose hash puts it in the held-out half, so the file's only example is held out.
    rec = next(r for r in (chat(f"q{i}", "a") for i in range(100)) if is_heldout(_line(r), 0.5))
    f = write_jsonl(tmp_path / "a.jsonl", [rec])
    p = _prepare(tmp_path, [f], heldout_fraction=0.5)
    assert len(p.train) == 1 and p.heldout == [] and p.heldout_encoded == []
    assert p.reports[str(f)].train_examples == 1 and p.reports[str(f)].heldout_examples == 0


def test_text_examples_never_become_eval_prompts(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i}"} for i in range(200)] + [chat("q", "a")])
    p = _prepare(tmp_path, [f], heldout_fraction=0.3, heldout_max_per_file=50)
    assert p.heldout_encoded, "some text lines must be held out for val loss"
    assert all(not e.is_text for e in p.heldout)


def test_eval_file_is_all_heldout(tmp_path):
    train = write_jsonl(tmp_path / "a.jsonl", [chat(f"q{i}", f"a{i}") for i in range(10)])
    write_jsonl(tmp_path / "eval.jsonl", [chat(f"e{i}", f"x{i}") for i in range(70)])
    p = _prepare(tmp_path, [train], heldout_fraction=0.0, eval_file="eval.jsonl")
    assert len(p.train) == 10
    assert len(p.heldout) == 70  # the per-file cap does not apply to the eval file
    assert p.reports[str(tmp_path / "eval.jsonl")].heldout_examples == 70


def test_copies_of_heldout_examples_are_never_trained(tmp_path):
    # The eval file's example appears in a training file as another format; a held-out line is
    # repeated in a second file after that file's cap is used up.
    write_jsonl(tmp_path / "eval.jsonl", [chat("What is the code?", "XK-9")])
    records = [chat(f"question {i}", f"answer {i}") for i in range(300)]
    first = write_jsonl(tmp_path / "a.jsonl", records + [{"prompt": "What is the code?", "response": "XK-9"}])
    p1 = _prepare(tmp_path, [first], heldout_fraction=0.1, heldout_max_per_file=3, eval_file="eval.jsonl")
    held = [e for e in p1.heldout if e.source.startswith("a.jsonl")]
    assert len(held) == 3 and p1.reports[str(first)].heldout_examples == 4  # + the eval example's copy
    assert p1.reports[str(first)].train_examples == 297
    assert [e.expected for e in p1.heldout].count("XK-9") == 1  # asked once, from the eval file
    # The same example again in b.jsonl, as prompt/response: other bytes, so not chosen by its hash.
    copy = {"prompt": held[0].prompt_text, "response": held[0].expected}
    assert not is_heldout(_line(copy), 0.1)
    second = write_jsonl(tmp_path / "b.jsonl", [copy] + [chat(f"other {i}", f"o{i}") for i in range(50)])
    p2 = _prepare(tmp_path, [first, second], heldout_fraction=0.1, heldout_max_per_file=3, eval_file="eval.jsonl")
    assert p2.reports[str(second)].train_examples + len([e for e in p2.heldout if e.source.startswith("b")]) == 50
    tok = smol_tokenizer()
    trained = {tok.decode([t for t, lab in zip(x["input_ids"], x["labels"]) if lab != -100],
                          skip_special_tokens=True) for x in p2.train}
    assert held[0].expected not in trained and "XK-9" not in trained


def test_missing_eval_file_is_reported_unusable(tmp_path):
    train = write_jsonl(tmp_path / "a.jsonl", [chat("q", "a")])
    p = _prepare(tmp_path, [train], eval_file="nope.jsonl")
    assert len(p.unusable) == 1 and p.unusable[0][1].startswith("eval file: cannot read: ")


# ------------------------------------------------------------------ store, collator, summary

def test_store_round_trip_across_chunks_and_reopen(tmp_path):
    records = [chat(f"q{i}", "a" * (i % 7 + 1)) for i in range(53)] + [{"text": "plain text"}]
    f = write_jsonl(tmp_path / "a.jsonl", records)
    p = _prepare(tmp_path, [f], tokenize_chunk_size=5, heldout_fraction=0.0)
    cfg = make_cfg(tmp_path)
    from ultimate_trainer.data.encoding import encode

    tok = smol_tokenizer()
    expected = [encode(tok, parse_line(json.dumps(r).encode(), cfg.data.system_prompt), 256, "skip") for r in records]
    reopened = TokenStore.open(tmp_path / "store")
    for store in (p.train, reopened):
        assert len(store) == 54
        got = [(store[i]["input_ids"], store[i]["labels"]) for i in range(len(store))]
        assert got == expected
        assert store.lengths.tolist() == [len(e[0]) for e in expected]
    view = reopened.select([3, 0, 53])
    assert len(view) == 3 and view[1]["input_ids"] == expected[0][0] and view[2]["labels"] == expected[53][1]
    assert view.select([2])[0]["input_ids"] == expected[53][0]
    # text format: trained whole, EOS appended and trained on
    text_ids, text_labels = expected[53]
    assert text_labels == text_ids and text_ids[-1] == tok.eos_token_id


def test_incomplete_store_is_not_opened(tmp_path):
    (tmp_path / "store").mkdir()
    with pytest.raises(FileNotFoundError):
        TokenStore.open(tmp_path / "store")
    assert not TokenStore.is_complete(tmp_path / "store")


def test_failed_prepare_leaves_no_complete_store(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [chat("q", "a")])
    with pytest.raises(TemplateError):
        data.prepare([f], UnstableTemplate(), make_cfg(tmp_path), tmp_path / "store", None)
    assert not TokenStore.is_complete(tmp_path / "store")


def test_collator_pads_right_with_masks():
    c = Collator(pad_token_id=0)
    batch = c([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


def test_collator_falls_back_to_eos():
    assert Collator(smol_tokenizer()).pad_token_id == smol_tokenizer().eos_token_id


def test_summarize_counts_and_lengths(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [chat("q", "a " * n) for n in range(1, 21)] + [b"bad"])
    p = _prepare(tmp_path, [f], heldout_fraction=0.0)
    s = data.summarize(p, 256)
    assert s["train_examples"] == 20 and s["bad_lines"] == 1 and s["formats"]["chat"] == 20
    lengths = p.train.lengths
    assert s["length_max"] == int(lengths.max()) and s["length_p50"] == int(np.percentile(lengths, 50))
    assert s["train_tokens"] == int(lengths.sum()) and s["max_seq_length"] == 256


# ------------------------------------------------------------------ memory does not grow with the file

def _peak_python_memory(tmp_path: Path, n: int) -> int:
    d = tmp_path / f"n{n}"
    d.mkdir()
    f = write_jsonl(d / "big.jsonl", [chat(f"Question number {i} about something", f"Answer {i} " * 5)
                                      for i in range(n)])
    cfg = make_cfg(d, tokenize_chunk_size=200, heldout_fraction=0.01, heldout_max_per_file=5)
    tok = smol_tokenizer()
    tracemalloc.start()
    try:
        p = data.prepare([f], tok, cfg, d / "store", None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(p.train) + len(p.heldout_encoded) == n
    return peak


def test_peak_memory_does_not_grow_with_file_size(tmp_path):
    smol_tokenizer()("warm up", add_special_tokens=False)  # keep one-time allocations out of the measure
    small = _peak_python_memory(tmp_path, 1000)
    large = _peak_python_memory(tmp_path, 4000)
    # 4x the data; allow 25% slack for allocator noise, far below the 4x a growing pipeline would show.
    print(f"peak traced memory: {small} B for 1000 lines, {large} B for 4000")
    assert large < small * 1.25, (small, large)


def test_store_append_slices_equals_append_of_pairs(tmp_path):
    import numpy as np

    from ultimate_trainer.data.tokenstore import TokenStoreWriter

    ids = np.arange(10, 20, dtype=np.int64)
    mask = np.array([0, 1, 1, 0, 0, 1, 1, 1, 0, 1], dtype=bool)
    bounds = [(0, 3), (5, 8), (9, 10)]
    a, b = TokenStoreWriter(tmp_path / "a"), TokenStoreWriter(tmp_path / "b")
    a.append_slices(ids, mask, bounds)
    b.append([(ids[x:y].tolist(), np.where(mask[x:y], ids[x:y], -100).tolist()) for x, y in bounds])
    sa, sb = a.close(), b.close()
    assert len(sa) == 3 and [sa[i] for i in range(3)] == [sb[i] for i in range(3)]
    assert sa[1] == {"input_ids": [15, 16, 17], "labels": [15, 16, 17]}
