"""The forgetting guard: the probe file, the retention figure, and a real run that scores a baseline and probes."""

from __future__ import annotations

import json
import logging
from pathlib import Path


from conftest import chat, run_train, write_jsonl
from ultimate_trainer.core import config as config_mod
from ultimate_trainer.model.scoring import normalize
from ultimate_trainer.trainer.probe.questions import BUILTIN_PATH, load_probe
from ultimate_trainer.trainer.probe.callback import retention_status


def test_builtin_probe_loads_and_a_bad_line_is_reported_not_fatal(tmp_path: Path, caplog) -> None:
    probe = load_probe(config_mod.load(None, []))
    assert probe is not None and probe.path == BUILTIN_PATH and len(probe.items) == 36
    assert {q.matcher for q in probe.items} <= {"contains", "numeric"}
    for q in probe.items:  # a question holding its own answer is met by any answer that repeats it
        assert normalize(q.expected) not in normalize(q.prompt_messages[-1]["content"]), q.source
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "completion": "4", "metadata": {"matcher": "numeric"}},
                                           "{not json", {"text": "no answer here"},
                                           {"prompt": "x", "completion": "y", "metadata": {"matcher": "fuzzy"}}])
    with caplog.at_level(logging.WARNING):
        probe = load_probe(config_mod.load(None, [f"paths.root={tmp_path}", "eval.probe_file=p.jsonl"]))
    assert probe is not None and [q.source for q in probe.items] == ["p.jsonl:1"]
    assert "p.jsonl:2" in caplog.text and "p.jsonl:3" in caplog.text and "p.jsonl:4: metadata.matcher" in caplog.text
    assert load_probe(config_mod.load(None, ["eval.probe_file=null"])) is None


def test_retention_status_trend_and_forgetting() -> None:
    assert retention_status([], 0.95) is None
    one = retention_status([{"retention": 1.0, "score": 0.9, "baseline": 0.9, "global_step": 2}], 0.95)
    assert one is not None and one["trend"] is None and one["forgetting"] is False
    recs = [{"retention": 1.0}, {"retention": 0.9, "global_step": 8, "correct": 18, "total": 20}]
    st = retention_status(recs, 0.95)
    assert st is not None and st["trend"] == "falling" and st["forgetting"] is True and st["ratio"] == 0.9
    assert retention_status([{"retention": 0.9}, {"retention": 0.99}], 0.95)["trend"] == "rising"
    assert retention_status([{"retention": 0.99}, {"retention": 0.985}], 0.95)["trend"] == "stable"


def own_answers_probe(model_dir: Path, path: Path, questions: list[str]) -> Path:
    """A probe whose expected answers are what the (random) base itself says: its baseline is 100%.

    A random model often says nothing (an end token first): "." under ``contains`` expects exactly
    that (normalized, it is empty, and only an empty answer matches it).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from ultimate_trainer.model.loading import load_tokenizer
    from ultimate_trainer.model.scoring import generate_answers

    tok = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    system = {"role": "system", "content": config_mod.Config().data.system_prompt}
    answers = generate_answers(model, tok, [[system, {"role": "user", "content": q}] for q in questions], 6, 8)
    return write_jsonl(path, [{"prompt": q, "completion": a or ".", "metadata": {"matcher": "exact" if a else "contains"}}
                              for q, a in zip(questions, answers)])


def test_a_run_scores_the_baseline_then_probes_every_nth_evaluation(make_project, tiny_model_dir: Path,
                                                                     tmp_path: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    own_answers_probe(tiny_model_dir, root / "probe.jsonl", [f"Question number {i}?" for i in range(6)])
    cfg = make_project(tiny_model_dir, eval__probe_file="probe.jsonl", eval__probe_every=2,
                       eval__probe_max_new_tokens=6, eval_steps=2, save_steps=4)
    data = write_jsonl(tmp_path / "d.jsonl", [chat(f"say {i}", f"word{i % 5}") for i in range(40)])
    r = run_train(cfg, data, extra=["--set", "training.learning_rate=0.05"])
    assert r.returncode == 0, r.stderr[-3000:]
    base = json.loads((root / "status/history/probe_baseline.json").read_text())
    assert base["score"] == 1.0 and base["total"] == 6 and base["global_step"] == 0
    evals = [json.loads(x) for x in (root / "status/history/evals.jsonl").read_text().splitlines()]
    probes = [json.loads(x) for x in (root / "status/history/probe.jsonl").read_text().splitlines()]
    # evaluations 1, 3, 5... are probed (the first one before any step)
    assert [p["global_step"] for p in probes] == [e["global_step"] for e in evals][::2]
    assert probes[0]["retention"] == 1.0  # before the first step the model is the base
    assert all(p["retention"] == round(p["score"] / 1.0, 4) for p in probes)
    ts = json.loads((root / "status/training_status.json").read_text())
    assert ts["retention"]["ratio"] == probes[-1]["retention"] and ts["retention"]["probes"] == len(probes)
    assert ts["retention"]["forgetting"] is (probes[-1]["retention"] < 0.95)


def test_the_baseline_is_scored_again_under_another_answer_bound_and_kept_under_its_own(
        make_project, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Retention compares like with like: a baseline scored with another ``eval.probe_max_new_tokens`` is
    scored again (same base), one scored with the same bound is kept, and one that records no bound was
    scored with 24 (the bound before it was recorded)."""
    root = tmp_path / "project"
    root.mkdir()
    own_answers_probe(tiny_model_dir, root / "probe.jsonl", [f"Question number {i}?" for i in range(4)])
    cfg = make_project(tiny_model_dir, eval__probe_file="probe.jsonl", eval__probe_max_new_tokens=6, eval_steps=4)
    path = root / "status/history/probe_baseline.json"

    def run(name: str, bound: int) -> str:
        data = write_jsonl(tmp_path / f"{name}.jsonl", [chat(f"say {name} {i}", f"word{i % 5}") for i in range(8)])
        r = run_train(cfg, data, extra=["--set", f"eval.probe_max_new_tokens={bound}"])
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stderr

    run("a", 6)
    first = json.loads(path.read_text())
    assert first["max_new_tokens"] == 6
    err = run("b", 4)
    second = json.loads(path.read_text())
    assert second["max_new_tokens"] == 4 and second["created_at"] >= first["created_at"]
    assert "scored with answers of at most 6 tokens, now 4: scored again" in err
    legacy = {k: v for k, v in second.items() if k != "max_new_tokens"}
    path.write_text(json.dumps({**legacy, "seconds": -1.0}))  # marks this very file
    err = run("c", 24)
    assert json.loads(path.read_text())["seconds"] == -1.0 and "scored again" not in err
