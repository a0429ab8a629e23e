"""The long-lived trainer worker on a tiny random model: same results as one train.py per run, fewer loads."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, chat, optimizer_step, run_train, wait_for, write_jsonl
from ultimate_trainer.core import checkpoints as ck
from ultimate_trainer.core import config, worker_files
from ultimate_trainer.trainer.worker import MemoryBound


def records(n: int, tag: str) -> list[dict]:
    return [chat(f"{tag} question number {i}?", f"{tag} answer {i}") for i in range(n)]


def losses(root: Path) -> list[float]:
    text = (root / "status" / "history" / "steps.jsonl").read_text()
    return [json.loads(line)["loss"] for line in text.splitlines()]


def test_runs_in_one_session_equal_one_process_per_run(arch_model_dir, make_project, tmp_path):
    from ultimate_trainer.trainer.recipe import run
    from ultimate_trainer.trainer.session import Session

    a = write_jsonl(tmp_path / "a.jsonl", records(12, "alpha"))
    b = write_jsonl(tmp_path / "b.jsonl", records(8, "beta"))
    # Qwen2's 152k-row output layer makes generation slow here: its runs train only (the Llama's evaluate).
    settings = {"eval_steps": 0, "eval__probe_file": None} if "qwen2" in arch_model_dir.name else {}
    per_run = make_project(arch_model_dir, root=tmp_path / "per_run", **settings).parent
    kept = make_project(arch_model_dir, root=tmp_path / "kept", **settings).parent

    for f in (a, b):
        r = run_train(per_run / "config.json", f)
        assert r.returncode == 0, r.stderr
    session = Session()
    cfg = config.load(kept / "config.json")
    assert run(cfg, [a], session=session) == 0
    model = session.model
    assert run(cfg, [b], session=session) == 0

    assert session.model is model and len(session.loads) == 1  # loaded once, for the first run only
    one, other = ck.newest_complete(per_run / "checkpoints"), ck.newest_complete(kept / "checkpoints")
    assert one.global_step == other.global_step and other.meta["run_complete"]
    assert optimizer_step(other.path) == other.global_step  # Adam's step counter carried on across runs
    assert losses(kept) == pytest.approx(losses(per_run), rel=1e-4)
    w1, w2 = load_file(one.path / "adapter_model.safetensors"), load_file(other.path / "adapter_model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)


def test_worker_process_preloads_keeps_the_model_and_reloads_when_a_model_setting_changes(tiny_model_dir, make_project,
                                                                                 tmp_path):
    cfg_path = make_project(tiny_model_dir, eval_steps=0)
    wdir = tmp_path / "worker"
    worker_files.clear(wdir)
    proc = subprocess.Popen([sys.executable, "-m", "ultimate_trainer.trainer.worker", "--worker-dir", str(wdir),
                             "--config", str(cfg_path)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        results = []
        for i, tag in enumerate(("alpha", "beta", "gamma")):
            if i == 2:  # another LoRA dropout: the model must be built again
                data = json.loads(cfg_path.read_text())
                data["lora"]["dropout"] = 0.1
                cfg_path.write_text(json.dumps(data))
            req = worker_files.write_request(wdir, [write_jsonl(tmp_path / f"{tag}.jsonl", records(6, tag))])
            wait_for(lambda: worker_files.read_result(wdir, req.seq) is not None, timeout=300, proc=proc)
            results.append(worker_files.read_result(wdir, req.seq))
        assert [r["code"] for r in results] == [0, 0, 0]
        assert len({r["pid"] for r in results}) == 1 and not any(r["exiting"] for r in results)
        # loaded before the first request (preload), kept for the second, loaded again for the third
        assert [r["model_loaded"] for r in results] == [False, False, True]
        status = json.loads((cfg_path.parent / "status" / "training_status.json").read_text())
        assert status["pid"] == proc.pid and status["current_files"] == ["gamma.jsonl"] and status["state"] == "idle"
        proc.send_signal(signal.SIGTERM)  # idle: ends at once
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_memory_bound_counts_growth_past_the_first_run():
    bound = MemoryBound(limit_mb=100)
    assert bound.exceeded({"rss_mb": 900.0, "gpu_mb": 5000.0}) is None  # the baseline
    assert bound.exceeded({"rss_mb": 990.0, "gpu_mb": 5050.0}) is None
    why = bound.exceeded({"rss_mb": 950.0, "gpu_mb": 5200.0})
    assert why is not None and why.startswith("gpu grew 200 MB")
    assert MemoryBound(limit_mb=0).exceeded({"rss_mb": 1.0}) is None


def test_a_request_without_result_is_taken_once_and_in_order(tmp_path):
    worker_files.clear(tmp_path)
    first = worker_files.write_request(tmp_path, [tmp_path / "a.jsonl"])
    time.sleep(0.001)
    second = worker_files.write_request(tmp_path, [tmp_path / "b.jsonl"])
    assert worker_files.next_request(tmp_path).seq == first.seq
    worker_files.write_result(tmp_path, first.seq, code=0)
    assert worker_files.next_request(tmp_path).seq == second.seq
    worker_files.write_result(tmp_path, second.seq, code=3)
    assert worker_files.next_request(tmp_path) is None
    assert worker_files.read_result(tmp_path, second.seq)["code"] == 3


def test_the_next_hint_carries_the_journal_hashes_and_an_older_path_hint_still_reads(tmp_path):
    from ultimate_trainer.core.manifest import FileEntry, digest
    from ultimate_trainer.core.status import atomic_write_json

    nxt = tmp_path / "b.jsonl"
    nxt.write_text('{"prompt": "q", "response": "a"}\n')
    worker_files.clear(tmp_path)
    req = worker_files.write_request(tmp_path, [tmp_path / "a.jsonl"], [digest(nxt)])
    got = worker_files.next_request(tmp_path)
    assert got.seq == req.seq and got.next == [digest(nxt)]  # path, sha256, size, lines: nothing to hash again
    worker_files.write_result(tmp_path, req.seq, code=0)
    atomic_write_json(tmp_path / worker_files.REQUESTS / "0.json", {"seq": "0", "files": [], "next": [str(nxt)]})
    assert worker_files.next_request(tmp_path).next == [FileEntry(nxt, "", 0, None)]  # unhashed: the child hashes


def test_the_next_run_takes_its_files_tokenized_ahead_and_a_stale_one_is_read_again(tiny_model_dir, make_project,
                                                                                  tmp_path):
    cfg_path = make_project(tiny_model_dir, eval_steps=0, daemon__prefetch_tokenize="on")
    wdir, log_path = tmp_path / "worker", tmp_path / "worker.log"
    worker_files.clear(wdir)
    a, b, c = (write_jsonl(tmp_path / f"{t}.jsonl", records(6, t)) for t in ("alpha", "beta", "gamma"))
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ultimate_trainer.trainer.worker", "--worker-dir", str(wdir),
                                 "--config", str(cfg_path)], cwd=REPO, stderr=log, text=True)
    try:
        def train(files: list[Path], following: list[Path]) -> dict:
            req = worker_files.write_request(wdir, files, following)
            wait_for(lambda: worker_files.read_result(wdir, req.seq) is not None, timeout=300, proc=proc)
            return worker_files.read_result(wdir, req.seq)

        def tokenized_ahead(name: str) -> bool:
            return f"{name}: tokenized ahead for the next run" in log_path.read_text()

        first = train([a], [b])
        assert first["code"] == 0 and first["tokenized_ahead"] == 0
        wait_for(lambda: tokenized_ahead("beta.jsonl"), timeout=120, proc=proc)
        second = train([b], [c])
        assert second["code"] == 0 and second["tokenized_ahead"] == 1
        assert "beta.jsonl: tokens from the prefetch cache" in log_path.read_text()
        # gamma was tokenized ahead, then changed before its run: its new content is what is trained
        wait_for(lambda: tokenized_ahead("gamma.jsonl"), timeout=120, proc=proc)
        write_jsonl(c, records(9, "gamma"))
        third = train([c], [])
        assert third["code"] == 0 and third["tokenized_ahead"] == 0
        report = json.loads((cfg_path.parent / "status" / "reports" / "gamma.jsonl.report.json").read_text())
        assert report["lines"] == 9
        assert len({r["pid"] for r in (first, second, third)}) == 1
        # the entry beta's run used is gone; gamma's stale one waits for the age limit
        assert len(list((config.load(cfg_path).path("work") / "tokcache").iterdir())) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
