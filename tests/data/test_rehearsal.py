"""Rehearsal: the base's own answers to general prompts, cached once per base, drawn by the run id."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest

from conftest import chat, smol_tokenizer, write_jsonl
from ultimate_trainer.core import config as config_mod
from ultimate_trainer.data import prepare
from ultimate_trainer.trainer.probe.questions import load_probe
from ultimate_trainer.trainer.rehearsal.prompts import BUILTIN_PATH, cache_path, cached_lines, complete_sentences, draw, \
    load_prompts, rehearsal_count, write_rehearsal

RUN_ID = "abcdef0123456789"


def cfg_for(root: Path, **sets: object) -> config_mod.Config:
    return config_mod.load(None, [f"paths.root={root}", *(f"{k}={v}" for k, v in sets.items())])


class Answers:
    """A stand-in for the base model: answers every prompt, and counts how often it was asked."""

    def __init__(self, tag: str = "base") -> None:
        self.tag, self.calls = tag, 0

    def __call__(self, prompts):
        self.calls += 1
        return [(f"{self.tag} answer to {p[-1]['content']}", False) for p in prompts]


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def test_builtin_prompts_are_many_and_none_is_a_probe_question(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path)
    prompts = load_prompts(cfg)
    assert prompts is not None and prompts.path == BUILTIN_PATH and len(prompts.messages) >= 300
    texts = [m[-1]["content"] for m in prompts.messages]
    assert all(m[-1]["role"] == "user" and m[0] == {"role": "system", "content": cfg.data.system_prompt}
               for m in prompts.messages)
    assert len({t.lower() for t in texts}) == len(texts)
    probe = load_probe(cfg)
    assert probe is not None
    questions = [q.prompt_messages[-1]["content"] for q in probe.items]
    assert not {t.lower().strip() for t in texts} & {q.lower().strip() for q in questions}
    for t in texts:  # no paraphrase of a probe question either: the probe must not measure memorisation
        for q in questions:
            a, b = words(t), words(q)
            assert len(a & b) / len(a | b) < 0.8, (t, q)


def test_the_draw_is_the_fraction_deterministic_from_the_run_id_and_repeats_only_past_the_pool(tmp_path) -> None:
    cfg = cfg_for(tmp_path, **{"training.rehearsal_fraction": 0.3, "training.replay_fraction": 0.1})
    assert rehearsal_count(120, cfg) == math.ceil(120 * 0.3 / 0.6) == 60
    assert rehearsal_count(0, cfg) == 0
    assert rehearsal_count(120, cfg_for(tmp_path, **{"training.rehearsal_fraction": 0})) == 0
    prompts = load_prompts(cfg)
    lines = [json.dumps(chat(f"q{i}", f"a{i}")).encode() for i in range(40)]
    r1 = write_rehearsal(lines, tmp_path / "cache.jsonl", prompts, 120, RUN_ID, cfg, tmp_path / "r1.jsonl")
    r2 = write_rehearsal(lines, tmp_path / "cache.jsonl", prompts, 120, RUN_ID, cfg, tmp_path / "r2.jsonl")
    r3 = write_rehearsal(lines, tmp_path / "cache.jsonl", prompts, 120, "0123456789abcdef", cfg, tmp_path / "r3.jsonl")
    assert r1 is not None and r1.lines == r1.wanted == 60 and r2 is not None and r3 is not None
    one, two = (tmp_path / "r1.jsonl").read_bytes(), (tmp_path / "r2.jsonl").read_bytes()
    assert one == two  # a resumed run rehearses exactly the same lines
    assert (tmp_path / "r3.jsonl").read_bytes() != one  # another run, another draw
    got = one.splitlines()
    assert set(got) <= set(lines)
    assert len(set(got[:40])) == 40  # every answered prompt once before any comes back
    assert draw(5, 3, RUN_ID, 42) == draw(5, 3, RUN_ID, 42) and len(set(draw(5, 5, RUN_ID, 42))) == 5
    assert write_rehearsal([], tmp_path / "c", prompts, 120, RUN_ID, cfg, tmp_path / "r4.jsonl") is None


def test_answers_are_cached_once_and_reused_not_regenerated(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, **{"training.rehearsal_fraction": 0.2})
    prompts = load_prompts(cfg)
    gen = Answers()
    path, lines = cached_lines(cfg, "/models/base", prompts, gen)
    assert gen.calls == 1 and path.parent == cfg.path("work") / "rehearsal" and path.is_file()
    assert len(lines) == len(prompts.messages) == len(path.read_bytes().splitlines())
    first = json.loads(lines[0])
    assert first["messages"][:-1] == prompts.messages[0]
    assert first["messages"][-1] == {"role": "assistant", "content": f"base answer to {prompts.messages[0][-1]['content']}"}
    again_path, again = cached_lines(cfg, "/models/base", prompts, gen)
    assert gen.calls == 1 and again_path == path and again == lines  # the next run reads the cache


def test_a_new_base_gets_new_answers_and_the_old_base_its_old_ones(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, **{"training.rehearsal_fraction": 0.2})
    prompts = load_prompts(cfg)
    old, new = Answers("old"), Answers("new")
    old_path, old_lines = cached_lines(cfg, "/models/base", prompts, old)
    # A consolidation was adopted: the run now trains on models/consolidated/<time>.
    new_path, new_lines = cached_lines(cfg, "/project/models/consolidated/20261126-030000", prompts, new)
    assert new.calls == 1 and new_path != old_path and b"new answer" in new_lines[0]
    # It was rolled back: the original base's answers are still there, not asked again.
    back_path, back_lines = cached_lines(cfg, "/models/base", prompts, Answers("never"))
    assert back_path == old_path and back_lines == old_lines and old.calls == 1
    # Other prompts or another answer bound are other answers too.
    assert cache_path(cfg_for(tmp_path, **{"training.rehearsal_max_new_tokens": 9}), "/models/base", prompts) \
        != old_path


def test_the_cache_is_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cfg_for(tmp_path, **{"training.rehearsal_fraction": 0.2})
    prompts = load_prompts(cfg)
    target = cache_path(cfg, "/models/base", prompts)
    real_replace = os.replace

    def crash(src, dst):  # the process dies between writing the temp file and renaming it
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        cached_lines(cfg, "/models/base", prompts, Answers())
    assert not target.exists() and list(target.parent.iterdir()) == []  # no half file, no temp left
    monkeypatch.setattr(os, "replace", real_replace)
    gen = Answers()
    cached_lines(cfg, "/models/base", prompts, gen)
    assert gen.calls == 1 and target.is_file()  # nothing half-written passed for a cache


def test_an_answer_cut_by_the_bound_keeps_its_complete_sentences() -> None:
    assert complete_sentences("  Paris is big. It has", True) == "Paris is big."
    assert complete_sentences("It has no end", True) == ""
    assert complete_sentences("It has no end", False) == "It has no end"
    assert complete_sentences("Pi is 3.14 and e is 2.71! More", True) == "Pi is 3.14 and e is 2.71!"


def test_empty_answers_are_left_out_and_a_bad_prompts_file_means_no_rehearsal(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Say hi."}, "{not json", {"text": "x"}, {"prompt": "Say nothing."}])
    cfg = cfg_for(tmp_path, **{"training.rehearsal_file": "p.jsonl"})
    prompts = load_prompts(cfg)
    assert prompts is not None and [m[-1]["content"] for m in prompts.messages] == ["Say hi.", "Say nothing."]
    _, lines = cached_lines(cfg, "/b", prompts, lambda ps: [("Hi!", False), ("", False)])
    assert len(lines) == 1
    write_jsonl(tmp_path / "bad.jsonl", ["{not json"])
    assert load_prompts(cfg_for(tmp_path, **{"training.rehearsal_file": "bad.jsonl"})) is None
    assert load_prompts(cfg_for(tmp_path, **{"training.rehearsal_file": "missing.jsonl"})) is None


def test_prepare_trains_the_rehearsal_after_the_run_files_without_holding_any_out(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, **{"training.rehearsal_fraction": 0.2, "training.replay_fraction": 0,
                               "training.max_seq_length": 128,
                               "data.heldout_fraction": 0.2, "data.heldout_max_per_file": 30})
    new = write_jsonl(tmp_path / "new.jsonl", [chat(f"new question {i}", f"new answer {i}") for i in range(60)])
    prompts = load_prompts(cfg)
    path, lines = cached_lines(cfg, "/b", prompts, Answers())
    r = write_rehearsal(lines, path, prompts, 60, RUN_ID, cfg, tmp_path / "rehearsal.jsonl")
    assert r is not None and r.lines == 15
    alone = prepare.prepare([new], smol_tokenizer(), cfg, tmp_path / "s1")
    mixed = prepare.prepare([new], smol_tokenizer(), cfg, tmp_path / "s2", rehearsal_file=r.path)
    assert mixed.rehearsal_examples == 15 and mixed.replay_examples == 0
    assert len(mixed.train) == len(alone.train) + 15
    assert len(mixed.heldout) == len(alone.heldout)  # nothing rehearsed is asked at evaluation
    assert list(mixed.reports) == [str(new)]


def test_config_refuses_rehearsal_and_replay_that_leave_the_run_nothing(tmp_path: Path) -> None:
    with pytest.raises(config_mod.ConfigError, match="training.rehearsal_fraction"):
        cfg_for(tmp_path, **{"training.rehearsal_fraction": 0.9, "training.replay_fraction": 0.1})


def test_the_builtin_bases_shipped_answers_stand_in_for_generating_only_where_they_match(tmp_path: Path) -> None:
    from ultimate_trainer.trainer.rehearsal.prompts import shipped_answers

    cfg = cfg_for(tmp_path, **{"load_in_4bit": "true"})
    prompts = load_prompts(cfg)
    shipped = shipped_answers(cfg, prompts)
    assert shipped is not None and shipped.name == "rehearsal.smollm2-135m-instruct.jsonl"
    shipped_lines = shipped.read_bytes().splitlines()
    asked = {json.loads(x)["messages"][-2]["content"] for x in shipped_lines}
    assert len(shipped_lines) >= 300 and asked <= {m[-1]["content"] for m in prompts.messages}
    gen = Answers()
    path, lines = cached_lines(cfg, "/cache/smollm2-135m-instruct", prompts, gen, shipped)
    assert gen.calls == 0 and lines == shipped_lines and path.read_bytes().splitlines() == shipped_lines
    # Answers made under other settings are not these: then the base is asked.
    assert shipped_answers(cfg_for(tmp_path, **{"load_in_4bit": "false"}), prompts) is None
    assert shipped_answers(cfg_for(tmp_path, **{"training.rehearsal_max_new_tokens": 32}), prompts) is None
    assert shipped_answers(cfg_for(tmp_path, **{"data.system_prompt": "Be brief."}), prompts) is None
