"""Lineage (core/lineage.py, ``train.py --lineage``): which input files every checkpoint and
consolidation contains, over a chain of two runs of known files, one written before per-file
sizes were recorded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from ultimate_trainer.core import checkpoints as ck
from ultimate_trainer.core.lineage import Lineage, run_files
from ultimate_trainer.core.records import FileReport
from ultimate_trainer.core.status import atomic_write_json

A = {"name": "a.jsonl", "sha256": "aa" * 32}  # an older marker: no size, examples or trained_at
B = {"name": "b.jsonl", "sha256": "bb" * 32}


def _ckpt(root: Path, step: int, run_id: str, files: list, run_step: int, total: int) -> None:
    path = root / "checkpoints" / f"checkpoint-{step}"
    path.mkdir(parents=True)
    ck.mark_complete(path, {"global_step": step, "run_id": run_id, "run_step": run_step, "run_total_steps": total,
                            "run_complete": run_step >= total, "files": files, "base_model_name": "tiny"})


def two_runs(root: Path) -> list[dict]:
    """Run r1 (a, b: steps 1-5, saved at 3 and 5), a consolidation of checkpoint-5, run r2 (c: 6-8)."""
    c_file = root / "c.jsonl"
    c_file.write_text('{"prompt": "q", "response": "a"}\n')
    reports = {str(c_file): FileReport(sha256="cc" * 32, size_bytes=33, examples=1)}
    c_entries = run_files([c_file], reports, "2026-11-27T10:00:00+00:00")
    _ckpt(root, 3, "r1", [A, B], 3, 5)
    _ckpt(root, 5, "r1", [A, B], 5, 5)
    cons = root / "models" / "consolidated" / "20261127-030000"
    cons.mkdir(parents=True)
    atomic_write_json(cons / ck.MANIFEST, {"global_step": 5, "source_checkpoint": "checkpoint-5"})
    _ckpt(root, 8, "r2", c_entries, 3, 3)
    (root / "checkpoints" / "checkpoint-9").mkdir()  # incomplete (no marker): not a model, not in any lineage
    return c_entries


def test_a_checkpoint_contains_every_earlier_run_and_partial_runs_say_so(tmp_path):
    c_entries = two_runs(tmp_path)
    lin = Lineage(tmp_path / "checkpoints", tmp_path / "models")
    assert [r.run_id for r in lin.runs] == ["r1", "r2"]
    newest = lin.of(lin.find("latest"))
    assert newest["name"] == "checkpoint-8"
    assert [f["name"] for f in newest["files"]] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    c = newest["files"][2]
    assert (c["sha256"], c["size"], c["examples"], c["trained_at"]) == ("cc" * 32, 33, 1, c_entries[0]["trained_at"])
    a = newest["files"][0]
    assert a["size"] is None and a["examples"] is None and a["trained_at"]  # older marker: its save time
    assert not any(f["partial"] for f in newest["files"])

    mid = lin.of(lin.find("checkpoint-3"))
    assert [(f["name"], f["partial"]) for f in mid["files"]] == [("a.jsonl", True), ("b.jsonl", True)]
    cons = lin.of(lin.find("20261127-030000"))
    assert cons["kind"] == "consolidation" and cons["source_checkpoint"] == "checkpoint-5"
    assert [f["name"] for f in cons["files"]] == ["a.jsonl", "b.jsonl"]
    assert lin.find("checkpoint-9") is None
    assert [r["name"] for r in lin.all()] == ["checkpoint-3", "checkpoint-5", "20261127-030000", "checkpoint-8"]


def test_reverse_lineage_lists_the_models_containing_a_file(tmp_path):
    two_runs(tmp_path)
    lin = Lineage(tmp_path / "checkpoints", tmp_path / "models")
    [b] = lin.containing("b.jsonl")
    assert [(m["name"], m["partial"]) for m in b["models"]] == [
        ("checkpoint-3", True), ("checkpoint-5", False), ("20261127-030000", False), ("checkpoint-8", False)]
    [c] = lin.containing("cccccccc")  # a sha256 prefix
    assert [m["name"] for m in c["models"]] == ["checkpoint-8"]
    assert lin.containing("never-trained.jsonl") == []


def _lineage_cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(config), "--lineage", *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_train_py_lineage_prints_the_files_of_a_checkpoint(tmp_path, make_project):
    config = make_project("tiny", root=tmp_path)
    two_runs(tmp_path)
    out = _lineage_cli(config)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("checkpoint checkpoint-8 (global step 8")
    assert [ln.split()[0] for ln in lines[1:]] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert "33 B  1 examples  trained 2026-11-27T10:00:00+00:00  run r2" in lines[3]
    assert "sha256 aaaaaaaaaaaa  ?  ? examples" in lines[1]

    out = _lineage_cli(config, "checkpoint-3")
    assert out.returncode == 0 and out.stdout.count("partly") == 2
    out = _lineage_cli(config, "c.jsonl")
    assert out.returncode == 0 and "checkpoint checkpoint-8 (step 8)" in out.stdout
    out = _lineage_cli(config, "nothing-like-it")
    assert out.returncode == 2 and "neither a checkpoint" in out.stderr


def test_checkpoint_meta_written_by_training_is_read_back(tmp_path):
    """The marker keys the trainer writes (trainer/hf.py) are the ones lineage reads."""
    f = tmp_path / "x.jsonl"
    entries = run_files([f], {str(f): FileReport(sha256="ff" * 32, size_bytes=10, examples=2)}, "T")
    assert entries == [{"name": "x.jsonl", "sha256": "ff" * 32, "size": 10, "examples": 2, "trained_at": "T"}]
    assert json.loads(json.dumps(entries)) == entries
