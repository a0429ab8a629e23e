"""``train.py --tune``: candidates from one start, the best-pick rule, --write-config, the user's files untouched,
a stop mid-search, bad input (docs/TUNING.md)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, chat, run_train, wait_for, write_jsonl
from test_probe import own_answers_probe
from ultimate_trainer.core import config as config_mod
from ultimate_trainer.core.config_edit import set_values
from ultimate_trainer.core.exitcodes import Exit
from ultimate_trainer.trainer.tuning import report as rp
from ultimate_trainer.trainer.tuning import scratch


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the hash of its bytes and its mtime."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() + f"@{p.stat().st_mtime_ns}"
            for p in sorted(root.rglob("*")) if p.is_file()}


def task(path: Path, n: int = 60) -> Path:
    return write_jsonl(path, [chat(f"code for item {i}?", f"K{i % 7}") for i in range(n)])


def search(cfg_path: Path, files: list[Path], **kw):
    """The search in this process (no signal handlers installed), as ``train.py --tune`` runs it."""
    from ultimate_trainer.trainer.recipe import StopFlag
    from ultimate_trainer.trainer.tuning.search import Options, tune

    cfg = config_mod.load(str(cfg_path), [])
    opts = Options(**{"lrs": [1e-3], "ranks": [4], "steps": 3, "prompts": 8, "budget": None, **kw})
    return tune(cfg, files, opts, StopFlag())


# --------------------------------------------------------------------------- the search


def test_candidates_start_from_the_same_point_and_leave_the_project_alone(make_project, tiny_model_dir: Path,
                                                                          tmp_path: Path, capsys) -> None:
    root = tmp_path / "project"
    root.mkdir()
    own_answers_probe(tiny_model_dir, root / "probe.jsonl", ["Question one?", "Question two?", "Question three?"])
    cfg_path = make_project(tiny_model_dir, eval__probe_file="probe.jsonl", eval__probe_max_new_tokens=6,
                            eval__max_new_tokens=4, data__heldout_max_per_file=8)
    data = task(tmp_path / "d.jsonl")
    r = run_train(cfg_path, data, extra=["--max-steps", "2"])  # a checkpoint to start from
    assert r.returncode == 0, r.stderr[-2000:]
    before = {d: tree(root / d) for d in ("checkpoints", "status")}
    config_before = cfg_path.read_bytes()
    (root / ".work" / "tune").mkdir(parents=True)
    (root / ".work" / "tune" / "999999-1").mkdir()  # a search that died: swept

    out = tmp_path / "report.json"
    written = tmp_path / "written.json"
    written.write_text(cfg_path.read_text())
    code = search(cfg_path, [data], lrs=[1e-3, 1e-2], ranks=[2, 4], report=out, write_config=written)
    assert code == Exit.OK
    rep = json.loads(out.read_text())
    cands = rep["candidates"]
    assert [(c["lr"], c["rank"]) for c in cands] == [(1e-3, 2), (1e-2, 2), (1e-3, 4), (1e-2, 4)]
    assert all(c["status"] == "done" and c["steps"] == 3 for c in cands)
    assert all(c["accuracy"] is not None and c["retention"] is not None and c["train_loss"] is not None
               for c in cands)
    assert rep["start"]["accuracy"] is not None and rep["start"]["steps"] == 0
    assert rep["probe_baseline"]["score"] == 1.0  # the run's stored baseline of this probe, read, not rescored
    assert rep["start_point"]["kind"] == "checkpoint" and rep["start_point"]["adapter"] is True
    assert rep["best"] is not None and (rep["best"]["learning_rate"], rep["best"]["lora_r"]) == \
        (cands[rep["best"]["index"]]["lr"], cands[rep["best"]["index"]]["rank"])

    # The same candidate alone gives the same result: it started from the same weights as in the set.
    alone = tmp_path / "alone.json"
    assert search(cfg_path, [data], lrs=[1e-2], ranks=[4], report=alone) == Exit.OK
    one = json.loads(alone.read_text())["candidates"][0]
    assert one["train_loss"] == pytest.approx(cands[3]["train_loss"], abs=1e-3)
    assert one["val_loss"] == pytest.approx(cands[3]["val_loss"], abs=1e-3)

    first, again = json.loads(out.read_text())["start"], json.loads(alone.read_text())["start"]
    assert [first[k] for k in ("accuracy", "val_loss", "retention")] == [again[k] for k in ("accuracy", "val_loss",
                                                                                           "retention")]

    # Nothing of the project changed; the scratch folders are gone; the config only with --write-config.
    assert {d: tree(root / d) for d in ("checkpoints", "status")} == before
    assert cfg_path.read_bytes() == config_before
    assert not (root / ".work" / "tune").exists()
    assert not (root / "queue").exists()
    best = cands[rep["best"]["index"]]
    new = json.loads(written.read_text())
    old = json.loads(config_before)
    assert new["training"]["learning_rate"] == best["lr"] and new["lora"]["r"] == best["rank"]
    new["training"]["learning_rate"], new["lora"]["r"] = old["training"]["learning_rate"], old["lora"]["r"]
    assert new == old
    printed = capsys.readouterr().out
    assert "held-out acc" in printed and "report: " in printed and "training.learning_rate" in printed


def test_a_stop_mid_search_reports_the_finished_candidates(make_project, tiny_model_dir: Path,
                                                           tmp_path: Path) -> None:
    cfg_path = make_project(tiny_model_dir, eval__probe_file=None, eval__max_new_tokens=4,
                            data__heldout_max_per_file=8)
    data = task(tmp_path / "d.jsonl", 120)
    out = tmp_path / "report.json"
    log = tmp_path / "err.log"
    cmd = [sys.executable, str(REPO / "train.py"), "--tune", str(data), "--config", str(cfg_path),
           "--lrs", "1e-3,2e-3,4e-3", "--ranks", "2", "--steps", "40", "--report", str(out)]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            # the first candidate trained and scored: stop the second in its steps
            wait_for(lambda: "tune: lr=0.001 r=2: 40 steps" in log.read_text(), timeout=300, proc=proc)
            proc.send_signal(signal.SIGTERM)
            stdout, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == Exit.OK, log.read_text()[-2000:]
    rep = json.loads(out.read_text())
    assert rep["stopped"] is True
    first, second, third = rep["candidates"]
    assert first["status"] == "done" and first["accuracy"] is not None and first["steps"] == 40
    # the signal lands in the second candidate's steps (stopped at a step's end, not scored) or, when it
    # arrives before that candidate began, the second is never started
    assert (second["status"], second["accuracy"]) in (("stopped", None), ("skipped", None))
    assert second["steps"] < 40 and third["status"] == "skipped" and third["steps"] == 0
    assert "stopped" in stdout and "report: " in stdout
    assert not (cfg_path.parent / ".work" / "tune").exists()


# --------------------------------------------------------------------------- bad input


def tune_cli(cfg_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), "--tune", *args, "--config", str(cfg_path)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def test_bad_input_is_a_clear_error_and_the_exit_code(make_project, tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg_path = make_project(tiny_model_dir)
    r = tune_cli(cfg_path)
    assert r.returncode == Exit.CONFIG and "--tune needs the files" in r.stderr and "Traceback" not in r.stderr
    r = tune_cli(cfg_path, str(tmp_path / "missing.jsonl"))
    assert r.returncode == Exit.CONFIG and "missing.jsonl: no such file" in r.stderr
    (tmp_path / "folder.jsonl").mkdir()
    r = tune_cli(cfg_path, str(tmp_path / "folder.jsonl"))
    assert r.returncode == Exit.CONFIG and "folder.jsonl: no such file" in r.stderr
    r = tune_cli(cfg_path, str(task(tmp_path / "ok.jsonl")), "--steps", "0", "--lrs", "x")
    assert r.returncode == Exit.CONFIG and "--lrs" in r.stderr and "Traceback" not in r.stderr
    r = tune_cli(cfg_path, str(task(tmp_path / "ok.jsonl")), "--ranks", "0")
    assert r.returncode == Exit.CONFIG and "lora.r" in r.stderr and "Traceback" not in r.stderr

    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"\x00\x01 not json\n{broken\n")
    r = tune_cli(cfg_path, str(garbage))
    assert r.returncode == Exit.DATA and "garbage.jsonl" in r.stderr and "Traceback" not in r.stderr
    r = tune_cli(cfg_path, str(task(tmp_path / "few.jsonl", 6)))
    assert r.returncode == Exit.DATA and "needs at least 5" in r.stderr and "Traceback" not in r.stderr
    assert not (cfg_path.parent / ".work" / "tune").exists()


# --------------------------------------------------------------------------- the rule, the config, the scratch


def res(lr: float, acc: float | None, ret: float | None, loss: float = 1.0, status: str = rp.DONE) -> rp.Result:
    return rp.Result(lr, 8, status=status, accuracy=acc, retention=ret, val_loss=loss)


def test_best_is_the_most_accurate_that_kept_retention() -> None:
    rows = [res(1e-3, 90.0, 0.90), res(5e-4, 80.0, 0.96), res(2e-4, 80.0, 1.0, loss=0.5), res(1e-4, 70.0, 1.0)]
    best, why = rp.pick_best(rows, 0.95)
    assert best == 2 and "retention >= 0.95" in why  # 90 % forgot; of the two at 80 % the lower held-out loss
    assert rp.pick_best(rows, 0.85)[0] == 0
    rows.append(res(3e-3, 99.0, None, status=rp.STOPPED))
    assert rp.pick_best(rows, 0.95)[0] == 2  # an unfinished candidate never wins


def test_none_qualifies_means_no_best() -> None:
    best, why = rp.pick_best([res(1e-3, 90.0, 0.5), res(5e-4, 80.0, 0.8)], 0.95)
    assert best is None and "no candidate kept retention" in why and "0.8" in why
    assert rp.pick_best([res(1e-3, None, None, status=rp.FAILED)], 0.95)[0] is None
    assert rp.pick_best([res(1e-3, 60.0, None), res(2e-3, 70.0, None)], 0.95)[0] == 1  # probe off


def test_defaults_surround_the_configured_values() -> None:
    assert rp.default_lrs(5e-4) == [2.5e-4, 5e-4, 1e-3]
    assert rp.default_ranks(16) == [8, 16] and rp.default_ranks(1) == [1, 2]


def test_write_config_changes_the_two_values_and_nothing_else(tmp_path: Path) -> None:
    p = tmp_path / "config.json"
    text = (REPO / "config.json").read_text()
    p.write_text(text)
    os.chmod(p, 0o640)
    new = set_values(p, {"training.learning_rate": 0.0005, "lora.r": 16})
    assert p.read_text() == new and (p.stat().st_mode & 0o777) == 0o640
    changed = [(a, b) for a, b in zip(text.splitlines(), new.splitlines()) if a != b]
    assert changed == [('    "r": 64,', '    "r": 16,'), ('    "learning_rate": 0.0002,', '    "learning_rate": 0.0005,')]
    # missing keys are added beside their siblings; a file that would not validate is left as it was
    p.write_text('{\n  "training": {\n    "batch_size": 2\n  }\n}\n')
    assert json.loads(set_values(p, {"training.learning_rate": 0.001, "lora.r": 8})) == \
        {"training": {"batch_size": 2, "learning_rate": 0.001}, "lora": {"r": 8}}
    before = p.read_text()
    with pytest.raises(config_mod.ConfigError):
        set_values(p, {"lora.r": 0})
    assert p.read_text() == before


def test_a_dead_searchs_scratch_is_swept_and_a_live_ones_kept(tmp_path: Path) -> None:
    mine = scratch.create(tmp_path)
    (tmp_path / "tune" / "999999-1").mkdir()
    (tmp_path / "tune" / "notes").mkdir()
    other = scratch.create(tmp_path)  # the same process again: its own live folder is recreated, not swept away
    assert other == mine and mine.is_dir()
    assert not (tmp_path / "tune" / "999999-1").exists() and (tmp_path / "tune" / "notes").is_dir()
