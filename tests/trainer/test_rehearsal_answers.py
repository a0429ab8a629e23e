"""Rehearsal in a run: the base answers once per base, the run trains a share of those answers and says so."""

from __future__ import annotations

import json

import pytest

from conftest import chat, run_train, seed_rehearsal, write_jsonl
from ultimate_trainer.core import checkpoints as ck
from ultimate_trainer.core import config as config_mod
from ultimate_trainer.core import status as st
from ultimate_trainer.trainer.rehearsal.prompts import cache_path, load_prompts

RUN_ID = "abcdef0123456789"


class Loaded(Exception):
    pass


def test_the_builtin_base_answers_once_and_a_new_base_is_asked_again(builtin_model_dir, tmp_path, monkeypatch):
    from ultimate_trainer.model import loading
    from ultimate_trainer.trainer.rehearsal.answers import rehearsal_for

    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Which city is the capital of Italy?"},
                                       {"prompt": "What is 2 plus 3?"}])
    cfg = config_mod.load(None, [f"paths.root={tmp_path}", "training.rehearsal_file=p.jsonl", "load_in_4bit=false",
                                 "training.rehearsal_max_new_tokens=24", "training.device=cpu",
                                 "training.rehearsal_fraction=0.5", "training.replay_fraction=0"])
    tok = loading.load_tokenizer(str(builtin_model_dir))
    base = str(builtin_model_dir)
    r = rehearsal_for(cfg, base, tok, 10, RUN_ID, tmp_path / "r1.jsonl")
    cache = cache_path(cfg, base, load_prompts(cfg))
    answers = [json.loads(x)["messages"][-1]["content"] for x in cache.read_bytes().splitlines()]
    # The base's own words (right or not: SmolLM2-135M is no oracle), whole sentences about the question.
    assert len(answers) == 2 and "Italy" in answers[0] and "3" in answers[1]
    assert all(a[-1] in ".!?" for a in answers)
    assert r is not None and r.lines == 10 and r.answers == cache.name  # 10 * 0.5 / 0.5

    def no_load(*a, **kw):
        raise Loaded

    monkeypatch.setattr(loading, "load_base_model", no_load)
    again = rehearsal_for(cfg, base, tok, 10, RUN_ID, tmp_path / "r2.jsonl")  # the cache, no model
    assert again is not None and (tmp_path / "r2.jsonl").read_bytes() == (tmp_path / "r1.jsonl").read_bytes()
    with pytest.raises(Loaded):  # an adopted consolidation is another base: it answers for itself
        rehearsal_for(cfg, str(tmp_path / "models" / "consolidated" / "x"), tok, 10, RUN_ID, tmp_path / "r3.jsonl")


def test_a_run_trains_the_cached_answers_and_records_them(tiny_model_dir, make_project, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [chat(f"question {i}?", f"answer {i}") for i in range(40)])
    project = make_project(tiny_model_dir, eval_steps=0, save_steps=100, training__rehearsal_fraction=0.25,
                           training__replay_fraction=0.0)
    answers = [chat(f"general question {i}?", f"general answer {i}.", system="You are a helpful assistant.")
               for i in range(30)]
    cache = seed_rehearsal(project, answers)
    before = cache.read_bytes()
    r = run_train(project, data)
    assert r.returncode == 0, r.stderr
    assert "the base answers" not in r.stderr  # the cached answers were used, none generated
    assert cache.read_bytes() == before
    meta = ck.newest_complete(project.parent / "checkpoints").meta
    assert meta["rehearsal"] == {"examples": 14, "answers": cache.name, "prompts_file": "rehearsal.jsonl",
                                 "loss": "distill"}  # 40/3
    status = st.read_json(project.parent / "status" / st.TRAINING_STATUS)
    assert status["rehearsal"] == meta["rehearsal"]
    assert not (project.parent / ".work" / "current-rehearsal.jsonl").exists()  # removed with the run's scratch


def test_without_a_cache_the_run_has_the_base_answer_and_keeps_the_answers(tiny_model_dir, make_project, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [chat(f"question {i}?", f"answer {i}") for i in range(20)])
    write_jsonl(tmp_path / "project" / "p.jsonl", [{"prompt": f"Say something about {w}."} for w in "abcdef"])
    project = make_project(tiny_model_dir, eval_steps=0, save_steps=100, training__rehearsal_fraction=0.25,
                           training__rehearsal_file="p.jsonl", training__rehearsal_max_new_tokens=4)
    r = run_train(project, data)
    assert r.returncode == 0, r.stderr
    assert "the base answers 6 general prompts once" in r.stderr
    cached = list((project.parent / ".work" / "rehearsal").glob("*.jsonl"))
    assert len(cached) == 1  # a random tiny model's answers are cut or empty, so few or none are kept
    r = run_train(project, write_jsonl(tmp_path / "more.jsonl", [chat(f"more {i}?", f"{i}") for i in range(20)]))
    assert r.returncode == 0, r.stderr
    assert "the base answers" not in r.stderr  # the same base: its answers are not asked again
