"""End to end on the real built-in model (SmolLM2-135M-Instruct), 4-bit NF4 on this CPU: QLoRA for real."""

from __future__ import annotations

import json

import pytest

from conftest import chat, optimizer_step, run_train, sigkill_when, spawn_train, write_jsonl
from ultimate_trainer.core import checkpoints as ck

pytestmark = pytest.mark.e2e


def test_qlora_on_builtin_model_continues_across_files_and_survives_sigkill(builtin_model_dir, make_project, tmp_path):
    # The probe (24 questions x 24 tokens, scored at each run's first evaluation) is left out: nothing
    # here asserts on it, and tests/trainer/test_probe.py proves it. Each run is as short as its
    # assertions allow: 4 steps, then about 7 (killed after 2, resumed for the rest).
    cfg = make_project("smollm2-135m-instruct", load_in_4bit=True, eval_steps=4, save_steps=2,
                       training__batch_size=4, training__max_seq_length=128,
                       eval__max_prompts=2, eval__max_new_tokens=6, eval__probe_file=None)
    root = cfg.parent
    first = write_jsonl(tmp_path / "first.jsonl",
                        [chat(f"Code word for {i}?", f"KX-{i}") for i in range(20)]
                        + [b"\xff\xfe not utf-8", "{truncated", {"messages": [{"role": "user", "content": "hi"}]}])
    r = run_train(cfg, first)
    assert r.returncode == 0, r.stderr
    report = json.loads((root / "status/reports/first.jsonl.report.json").read_text())
    assert report["bad_lines"] == 3 and [b["line"] for b in report["bad"]] == [21, 22, 23]
    assert "first.jsonl:21: not UTF-8" in r.stderr
    after_first = ck.newest_complete(root / "checkpoints")
    assert after_first.meta["load_in_4bit"] and after_first.meta["run_complete"]

    second = write_jsonl(tmp_path / "second.jsonl", [chat(f"Secret number {i}?", f"{i * 7}") for i in range(32)])
    sigkill_when(spawn_train(cfg, second),
                 lambda: ck.newest_complete(root / "checkpoints").global_step >= after_first.global_step + 2,
                 timeout=300)
    killed = ck.newest_complete(root / "checkpoints")
    assert not killed.meta["run_complete"]

    r = run_train(cfg, second)
    assert r.returncode == 0, r.stderr
    final = ck.newest_complete(root / "checkpoints")
    assert final.global_step == after_first.global_step + final.meta["run_total_steps"]
    assert final.meta["run_complete"] and optimizer_step(final.path) == final.global_step
    status = json.loads((root / "status/training_status.json").read_text())
    assert status["load_in_4bit"] is True and status["accuracy"]["evaluations"] >= 2
    assert status["global_step"] == final.global_step and status["run_step"] == status["run_total_steps"]
