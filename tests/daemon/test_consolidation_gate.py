"""A refused consolidation is kept beside and reported; ``--rollback-consolidation`` un-adopts the newest one
and training goes on from the previous base, the global step never going back."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ultimate_trainer.core import config as config_mod
from ultimate_trainer.core import checkpoints as ck
from ultimate_trainer.core.exitcodes import Exit
from ultimate_trainer.daemon import cli
from ultimate_trainer.daemon.loop import Daemon

SETS = ["daemon.file_stable_seconds=0", "daemon.start_monitors=false", "daemon.disk_warn_gb=0",
        "daemon.disk_critical_gb=0", "daemon.consolidation_hour=null", "daemon.poll_interval=0.1"]


def checkpoint(root: Path, step: int, base: str) -> None:
    c = root / "checkpoints" / f"checkpoint-{step}"
    c.mkdir(parents=True)
    ck.mark_complete(c, ck.marker_meta(global_step=step, run_id="r", run_step=1, run_total_steps=1, files=[],
                                       base_model=base))


def consolidation(root: Path, name: str, step: int, sub: str = "") -> Path:
    m = root / "models" / "consolidated" / sub / name
    m.mkdir(parents=True)
    (m / "manifest.json").write_text(json.dumps({"global_step": step, "source_checkpoint": f"checkpoint-{step}",
                                                 "created_at": "2026-11-27T03:00:00+0000"}))
    return m


def cfg_for(root: Path) -> config_mod.Config:
    return config_mod.load(None, [f"paths.root={root}", *SETS])


def start(root: Path) -> ck.StartPoint:
    return ck.start_point(root / "checkpoints", root / "models")


def test_rollback_of_the_only_consolidation_restarts_the_original_base_at_the_highest_step(tmp_path: Path) -> None:
    checkpoint(tmp_path, 10, "/models/base")
    a = consolidation(tmp_path, "A", 10)
    checkpoint(tmp_path, 20, str(a))
    assert start(tmp_path).kind == "checkpoint" and start(tmp_path).global_step == 20

    assert cli.main(["--config", "/nonexistent.json", "--set", f"paths.root={tmp_path}",
                     "--rollback-consolidation"]) == 2  # an unreadable config is reported, nothing moved
    assert cli.main(["--set", f"paths.root={tmp_path}", "--config", str(_config(tmp_path)),
                     "--rollback-consolidation"]) == 0
    assert not a.exists() and (tmp_path / "models/consolidated/.rolled-back/A/model/manifest.json").exists()
    sp = start(tmp_path)
    # The original base with a fresh adapter: neither checkpoint-20 (trained on A) nor checkpoint-10
    # (the adapter that A merged) is continued, and the global step goes on from 20.
    assert (sp.kind, sp.global_step, sp.base_path, sp.checkpoint) == ("fresh", 20, None, None)
    assert ck.current_checkpoints(tmp_path / "checkpoints", tmp_path / "models") == []
    # Training after the rollback continues normally.
    checkpoint(tmp_path, 25, "/models/base")
    assert (start(tmp_path).kind, start(tmp_path).global_step) == ("checkpoint", 25)
    # Nothing left to roll back.
    assert cli.main(["--config", str(_config(tmp_path)), "--rollback-consolidation"]) == 1


def test_rollback_returns_to_the_previous_consolidation(tmp_path: Path) -> None:
    checkpoint(tmp_path, 10, "/models/base")
    a = consolidation(tmp_path, "A", 10)
    checkpoint(tmp_path, 20, str(a))
    b = consolidation(tmp_path, "B", 20)
    checkpoint(tmp_path, 30, str(b))
    from ultimate_trainer.daemon.consolidation import rollback

    rollback(cfg_for(tmp_path))
    sp = start(tmp_path)
    assert (sp.kind, sp.global_step, sp.base_path) == ("consolidation", 30, str(a))
    assert sp.checkpoint is None  # a fresh adapter on A, not checkpoint-20 (the adapter B merged)
    assert [c.path.name for c in ck.list_consolidations(tmp_path / "models")] == ["A"]


def _config(root: Path) -> Path:
    p = root / "config.json"
    p.write_text(json.dumps({"paths": {"root": str(root)}}))
    return p


def test_a_refused_consolidation_is_reported_and_not_retried(tmp_path: Path) -> None:
    checkpoint(tmp_path, 10, "/models/base")
    # Stand-in merge child: writes a refused candidate the way trainer/consolidation/merge.py does, exits 6.
    script = (
        "import json, pathlib, sys; m = pathlib.Path(sys.argv[1]) / 'models/consolidated/.refused/20261127-030000';"
        "m.mkdir(parents=True); (m / 'manifest.json').write_text(json.dumps({'global_step': 10, 'adopted': False,"
        "'gate': {'adopted': False, 'reason': 'retention fell from 1.00 to 0.80'}, "
        "'created_at': '2026-11-27T03:00:00+0000'})); sys.exit(6)")
    calls = []

    def cmd(files_json: Path) -> list[str]:
        calls.append(files_json)
        return [sys.executable, "-c", script, str(tmp_path)]

    cfg = cfg_for(tmp_path)
    d = Daemon(cfg, str(_config(tmp_path)), SETS + [f"paths.root={tmp_path}"], once=True, consolidate_now=True,
               consolidate_cmd=cmd)
    assert d.tick() == 0  # --once: the refusal is not an error, and nothing is left to do
    assert len(calls) == 1 and d.exit_code == 0
    assert ck.list_consolidations(tmp_path / "models") == []
    assert start(tmp_path).kind == "checkpoint"  # training continues on the current base
    st = json.loads((tmp_path / "status" / "daemon_status.json").read_text())
    assert st["consolidation"]["last_refused"]["reason"] == "retention fell from 1.00 to 0.80"
    assert st["consolidation"]["history"] == []
    journal = (tmp_path / "queue" / "journal.jsonl").read_text()
    assert '"consolidation_refused"' in journal
    assert not d.consolidations.wanted()  # not again until training went past the refused step
    checkpoint(tmp_path, 15, "/models/base")
    d.consolidations.requested = True
    assert d.consolidations.wanted()


@pytest.mark.parametrize("code", [Exit.REFUSED])
def test_exit_code_is_documented(code: Exit) -> None:
    assert code == 6 and "refused" in code.meaning


def test_the_daemon_status_carries_the_running_merges_progress(tmp_path: Path) -> None:
    """While the merge child runs, daemon_status.json's consolidation.progress is the phase the child shows
    in its consolidation_status.json (trainer/consolidation/merge.py MergeStatus): the page and any client
    of the daemon's status see the merge's progress and ETA, not only the daemon's log."""
    checkpoint(tmp_path, 10, "/models/base")
    # Stand-in merge child: the real MergeStatus and Progress, then it waits until the daemon's status shows
    # its progress, records what it saw, and refuses its candidate (exit 6) as the gate would.
    script = """
import json, pathlib, sys, time
from ultimate_trainer.core.progress import Progress
from ultimate_trainer.trainer.consolidation.merge import STAGES, MergeStatus
root = pathlib.Path(sys.argv[1])
status = MergeStatus(root / 'status' / 'consolidation_status.json')
Progress('consolidation', len(STAGES), 'stages', on_update=status.stage).advance()
Progress('gate: the base', 40, 'prompts', on_update=status.phase).advance(12)
seen, deadline = None, time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        seen = json.loads((root / 'status' / 'daemon_status.json').read_text())['consolidation']
    except (OSError, ValueError, KeyError):
        seen = None
    if seen and seen.get('progress'):
        break
    time.sleep(0.1)
(root / 'seen.json').write_text(json.dumps(seen))
m = root / 'models/consolidated/.refused/20261127-030000'
m.mkdir(parents=True)
(m / 'manifest.json').write_text(json.dumps({'global_step': 10, 'adopted': False, 'gate': {'adopted': False,
    'reason': 'stand-in'}, 'created_at': '2026-11-27T03:00:00+0000'}))
status.finish('refused', str(m))
sys.exit(6)
"""
    cfg = cfg_for(tmp_path)
    d = Daemon(cfg, str(_config(tmp_path)), SETS + [f"paths.root={tmp_path}"], once=True, consolidate_now=True,
               consolidate_cmd=lambda files_json: [sys.executable, "-c", script, str(tmp_path)])
    assert d.tick() == 0
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["running"] is True
    progress = seen["progress"]
    assert progress["phase"] == "gate: the base" and (progress["done"], progress["total"]) == (12, 40)
    assert progress["unit"] == "prompts" and "eta_seconds" in progress
    assert progress["stage"] == {"done": 1, "total": 5, "name": "score the base (gate)"}
    after = json.loads((tmp_path / "status" / "daemon_status.json").read_text())["consolidation"]
    assert after["running"] is False and after["progress"] is None  # the merge is over
    merge = json.loads((tmp_path / "status" / "consolidation_status.json").read_text())
    assert merge["state"] == "refused" and merge["progress"] is None
