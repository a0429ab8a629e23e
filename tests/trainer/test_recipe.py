"""train.py on a tiny random model, through the real CLI: continuity, crash safety, exit codes."""

from __future__ import annotations

import json
import shutil
import signal

import pytest

from conftest import chat, optimizer_step, run_train, sigkill_when, spawn_train, wait_for, write_jsonl
from ultimate_trainer.core import checkpoints as ck
from ultimate_trainer.core.lineage import Lineage


def records(n: int, tag: str) -> list[dict]:
    return [chat(f"{tag} question number {i}?", f"{tag} answer {i}") for i in range(n)]


def test_second_run_continues_global_step_and_restores_optimizer(tiny_model_dir, make_project, tmp_path):
    cfg = make_project(tiny_model_dir, eval_steps=0)
    a = write_jsonl(tmp_path / "a.jsonl", records(12, "alpha"))
    b = write_jsonl(tmp_path / "b.jsonl", records(8, "beta"))
    root = cfg.parent

    r1 = run_train(cfg, a)
    assert r1.returncode == 0, r1.stderr
    first = ck.newest_complete(root / "checkpoints")
    assert first.meta["run_complete"] and first.global_step == first.meta["run_total_steps"]

    r2 = run_train(cfg, b)
    assert r2.returncode == 0, r2.stderr
    last = ck.newest_complete(root / "checkpoints")
    assert last.global_step == first.global_step + last.meta["run_total_steps"]
    # Adam's step counter only carries on if the optimizer state was loaded from run 1's checkpoint.
    assert optimizer_step(last.path) == last.global_step
    status = json.loads((root / "status" / "training_status.json").read_text())
    assert status["state"] == "idle" and status["global_step"] == last.global_step
    assert status["current_files"] == ["b.jsonl"]
    steps = [json.loads(line)["global_step"] for line in (root / "status/history/steps.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == last.global_step
    # Lineage: the second run's checkpoint contains both runs' files, as recorded by the trainer.
    files = Lineage(root / "checkpoints", root / "models").of(last)["files"]
    assert [(f["name"], f["size"], f["run_id"]) for f in files] == [
        ("a.jsonl", a.stat().st_size, first.meta["run_id"]), ("b.jsonl", b.stat().st_size, last.meta["run_id"])]
    assert all(f["examples"] > 0 and f["trained_at"] and f["sha256"] and not f["partial"] for f in files)
    assert last.meta["parent"] == {"kind": "checkpoint", "name": first.name}


def test_a_changed_learning_rate_applies_to_the_next_run_that_resumes_a_checkpoint(tiny_model_dir, make_project,
                                                                                     tmp_path):
    """The checkpoint's scheduler carries the old rate; the configured one wins, the schedule's position stays."""
    cfg = make_project(tiny_model_dir, eval_steps=0, training__warmup_steps=2)
    root = cfg.parent
    rates = {}
    for name, lr in (("a", 0.01), ("b", 0.002)):
        data = write_jsonl(tmp_path / f"{name}.jsonl", records(12, name))
        r = run_train(cfg, data, extra=["--set", f"training.learning_rate={lr}"])
        assert r.returncode == 0, r.stderr[-3000:]
        rates[name] = [(s["global_step"], s["learning_rate"])
                       for s in map(json.loads, (root / "status/history/steps.jsonl").read_text().splitlines())
                       if s["files"] == [f"{name}.jsonl"]]
    # run a warms up (0 at its first step, constant_with_warmup) and holds 0.01
    assert rates["a"][0][1] == 0.0 and rates["a"][-1][1] == pytest.approx(0.01)
    # run b resumes a's optimizer and schedule (no second warm-up) at the rate configured now
    assert [lr for _, lr in rates["b"]] == pytest.approx([0.002] * len(rates["b"]))
    assert rates["b"][0][0] == rates["a"][-1][0] + 1
    assert "learning rate 0.002 from the configuration" in r.stderr


def test_sigkill_mid_run_resumes_from_last_complete_checkpoint(tiny_model_dir, make_project, tmp_path):
    cfg = make_project(tiny_model_dir, eval_steps=0, save_steps=4)
    data = write_jsonl(tmp_path / "big.jsonl", records(640, "gamma"))  # packed: ~8 short examples a row
    root = cfg.parent
    sigkill_when(spawn_train(cfg, data),
                 lambda: (ck.newest_complete(root / "checkpoints") or ck.CheckpointInfo(root, 0, {})).global_step >= 8)
    killed_at = ck.newest_complete(root / "checkpoints")
    total = killed_at.meta["run_total_steps"]
    assert killed_at.global_step < total, "the run finished before it could be killed"
    # A half-written checkpoint (what a kill during a save leaves) must never be resumed from.
    fake = root / "checkpoints" / f"checkpoint-{killed_at.global_step + 1}"
    fake.mkdir()
    (fake / "adapter_model.safetensors").write_bytes(b"truncated")

    r = run_train(cfg, data)
    assert r.returncode == 0, r.stderr
    assert "continuing interrupted run" in r.stderr
    assert not fake.exists() and any((root / "checkpoints" / ".incomplete").iterdir())
    final = ck.newest_complete(root / "checkpoints")
    # Nothing trained twice: the run ends at exactly its planned number of steps.
    assert final.global_step == total and final.meta["run_step"] == total and final.meta["run_complete"]
    assert optimizer_step(final.path) == total


def test_sigterm_finishes_the_step_saves_and_exits_zero(tiny_model_dir, make_project, tmp_path):
    cfg = make_project(tiny_model_dir, eval_steps=0, save_steps=1000)
    data = write_jsonl(tmp_path / "d.jsonl", records(300, "delta"))
    root = cfg.parent
    proc = spawn_train(cfg, data)
    status = root / "status" / "training_status.json"

    def training_started() -> bool:
        try:
            return json.loads(status.read_text()).get("global_step", 0) >= 2
        except (OSError, ValueError):
            return False

    wait_for(training_started, proc=proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    saved = ck.newest_complete(root / "checkpoints")
    assert saved is not None and 2 <= saved.global_step < saved.meta["run_total_steps"]
    assert not saved.meta["run_complete"]
    assert json.loads(status.read_text())["state"] == "idle"


def test_max_steps_caps_the_run_and_the_next_start_finishes_it(tiny_model_dir, make_project, tmp_path):
    cfg = make_project(tiny_model_dir, eval_steps=0)
    data = write_jsonl(tmp_path / "e.jsonl", records(150, "eps"))  # packed: ~8 short examples a row
    r = run_train(cfg, data, extra=["--max-steps", "2"])
    assert r.returncode == 0, r.stderr
    first = ck.newest_complete(cfg.parent / "checkpoints")
    assert first.global_step == 2 and first.meta["run_step"] == 2 and not first.meta["run_complete"]
    r = run_train(cfg, data)
    assert r.returncode == 0, r.stderr
    done = ck.newest_complete(cfg.parent / "checkpoints")
    assert done.global_step == done.meta["run_total_steps"] and done.meta["run_complete"]


def test_file_without_usable_example_fails_with_one_line_and_code_3(tiny_model_dir, make_project, tmp_path):
    cfg = make_project(tiny_model_dir)
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{not json", {"foo": 1}, chat("q", "")])
    r = run_train(cfg, bad)
    assert r.returncode == 3
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bad.jsonl" in errors[0]
    report = json.loads((cfg.parent / "status/reports/bad.jsonl.report.json").read_text())
    assert report["usable"] is False and report["bad_lines"] == 3
    assert not (cfg.parent / "checkpoints").exists() or ck.newest_complete(cfg.parent / "checkpoints") is None


def test_hub_id_not_in_cache_fails_fast_with_what_to_set(make_project, tmp_path):
    cfg = make_project("SomeOrg/NotDownloaded-7B")
    data = write_jsonl(tmp_path / "a.jsonl", records(4, "x"))
    r = run_train(cfg, data, timeout=120)
    assert r.returncode == 4
    assert "not in the local Hugging Face cache" in r.stderr and "base_model" in r.stderr
    assert "Traceback" not in r.stderr
    status = json.loads((cfg.parent / "status/training_status.json").read_text())
    assert status["state"] == "error" and "NotDownloaded" in status["error"]


def test_dry_run_reports_counts_and_lengths_without_training(tiny_model_dir, make_project, tmp_path):
    cfg = make_project(tiny_model_dir)
    data = write_jsonl(tmp_path / "a.jsonl", records(20, "x") + ["{oops"])
    r = run_train(cfg, data, extra=["--dry-run"])
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["examples"] == 20 and summary["bad_lines"] == 1
    assert 0 < summary["length_p50"] <= summary["length_max"] <= 256
    assert "a.jsonl:21: invalid JSON" in r.stderr
    assert not (cfg.parent / "checkpoints").exists()


def test_after_consolidation_a_fresh_adapter_continues_the_global_step(tiny_model_dir, make_project, tmp_path):
    cfg = make_project(tiny_model_dir, eval_steps=0)
    root = cfg.parent
    assert run_train(cfg, write_jsonl(tmp_path / "a.jsonl", records(10, "a"))).returncode == 0
    before = ck.newest_complete(root / "checkpoints")
    # A consolidation as the daemon writes it: merged weights + manifest (here: the tiny base itself).
    merged = root / "models" / "consolidated" / "20260101-030000"
    shutil.copytree(tiny_model_dir, merged)
    (merged / "manifest.json").write_text(json.dumps({
        "schema_version": 1, "source_checkpoint": before.name, "global_step": before.global_step,
        "base_model": str(tiny_model_dir), "files_since_last": ["a.jsonl"], "dtype": "float32",
        "created_at": "2026-01-01T03:00:00+0000"}))
    r = run_train(cfg, write_jsonl(tmp_path / "b.jsonl", records(10, "b")))
    assert r.returncode == 0, r.stderr
    after = ck.newest_complete(root / "checkpoints")
    assert after.global_step == before.global_step + after.meta["run_total_steps"]
    assert after.meta["base_model"] == str(merged)
    # A fresh optimizer: its step counter counts only this run's steps.
    assert optimizer_step(after.path) == after.meta["run_total_steps"]
    # That adapter belongs to the merged weights: without them, refuse rather than use another base.
    shutil.rmtree(merged)
    r = run_train(cfg, tmp_path / "b.jsonl")
    assert r.returncode == 4 and "consolidated model" in r.stderr and "missing" in r.stderr


def test_checkpoint_of_another_base_model_is_not_resumed(tiny_model_dir, make_project, tmp_path):
    cfg = make_project(tiny_model_dir, eval_steps=0)
    assert run_train(cfg, write_jsonl(tmp_path / "a.jsonl", records(6, "a"))).returncode == 0
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    data = json.loads(cfg.read_text())
    data["base_model"] = str(other)
    cfg.write_text(json.dumps(data))
    r = run_train(cfg, tmp_path / "a.jsonl")
    assert r.returncode == 2 and "paths.checkpoints" in r.stderr


def test_bad_config_reports_every_problem_and_exits_2(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"eval_steps": -1, "lora": {"r": "big"}, "nope": 1}))
    data = write_jsonl(tmp_path / "a.jsonl", records(2, "x"))
    r = run_train(cfg, data)
    assert r.returncode == 2
    for key in ("eval_steps", "lora.r", "nope"):
        assert key in r.stderr
