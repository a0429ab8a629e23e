"""The demo data: deterministic, every format present, bad lines reported, held-out items are new inputs."""

from __future__ import annotations

import re

import pytest

from conftest import make_cfg, smol_tokenizer
from ultimate_trainer.data import prepare as data
from ultimate_trainer.data import sample as sample_data


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = sample_data.write_demo_data(tmp_path / "a", n_files=2, examples_per_file=50, seed=3)
    b = sample_data.write_demo_data(tmp_path / "b", n_files=2, examples_per_file=50, seed=3)
    c = sample_data.write_demo_data(tmp_path / "c", n_files=2, examples_per_file=50, seed=4)
    assert [p.name for p in a] == ["bookings-1.jsonl", "bookings-2.jsonl"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert a[0].read_bytes() != c[0].read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["bookings-1.jsonl", "bookings-2.jsonl"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    files = sample_data.write_demo_data(tmp / "in", n_files=2, examples_per_file=300)
    cfg = make_cfg(tmp)  # default held-out settings: 5% per file
    return files, data.prepare(files, smol_tokenizer(), cfg, tmp / "store", None)


def test_demo_files_read_cleanly_with_bad_lines_in_the_first(demo):
    files, p = demo
    r1, r2 = (p.reports[str(f)] for f in files)
    assert r1.examples == r2.examples == 300
    assert [b["reason"].split(":")[0] for b in r1.bad] == ["invalid JSON", "no assistant turn",
                                                              "unknown shape (keys"]
    assert r2.bad_lines == 0
    for fmt in ("chat", "sharegpt", "prompt_response", "alpaca"):
        assert r1.formats[fmt] + r2.formats[fmt] > 0, fmt
    assert r1.heldout_examples >= 5 and r2.heldout_examples >= 5
    assert not p.unusable


def test_answers_follow_the_rule_and_heldout_inputs_are_new(demo):
    _, p = demo
    tok = smol_tokenizer()
    trained_answers = [tok.decode([t for t, lab in zip(x["input_ids"], x["labels"]) if lab != -100],
                                  skip_special_tokens=True) for x in p.train]
    assert all(re.fullmatch(r"REF-\d{1,2}-[A-Z]+", a) for a in trained_answers)
    assert p.heldout
    for ex in p.heldout:
        (last,) = [n for n in sample_data.SURNAMES if re.search(rf"\b{n}\b", ex.prompt_text)]
        seat = int(re.search(r"[Ss]eat (\d+)", ex.prompt_text).group(1))
        assert ex.expected == sample_data.reference(last, seat)
    # Held-out prompts never appear word for word among the trained ones.
    trained_text = "\n".join(tok.decode(x["input_ids"]) for x in p.train)
    assert not any(ex.prompt_text in trained_text for ex in p.heldout)


def test_cli_writes_files(tmp_path, capsys):
    assert sample_data.main([str(tmp_path), "--files", "1", "--examples", "5"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "bookings-1.jsonl")
    assert len((tmp_path / "bookings-1.jsonl").read_bytes().splitlines()) == 5 + 3  # 3 bad lines


@pytest.mark.e2e
def test_base_model_does_not_know_the_format_yet(tmp_path, builtin_model_dir):
    """The point of the demo: before training, the built-in model gets these wrong."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ultimate_trainer.model.scoring import generate_answers, score

    files = sample_data.write_demo_data(tmp_path / "in", n_files=1, examples_per_file=200)
    tok = AutoTokenizer.from_pretrained(builtin_model_dir)
    p = data.prepare(files, tok, make_cfg(tmp_path), tmp_path / "store", None)
    held = p.heldout[:8]
    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir, dtype=torch.float32)
    answers = generate_answers(model, tok, [e.prompt_messages for e in held], max_new_tokens=16, batch_size=8)
    correct = sum(score("normalized", a, e.expected) for a, e in zip(answers, held))
    assert correct <= 1, list(zip(answers, [e.expected for e in held]))
