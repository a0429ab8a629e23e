"""The journal survives kills at every point of a transition: replay + reconcile finish the job."""

from __future__ import annotations

from pathlib import Path

from ultimate_trainer.daemon.inbox import Spool, move_no_overwrite
from ultimate_trainer.daemon.journal import Journal

LINE = '{"text": "hello"}\n'


def put(p: Path, text: str = LINE) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_replay_rebuilds_state(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.jsonl")
    j.append("queued", name="a.jsonl", sha256="h1", size=3, arrived_at="t")
    j.append("batch", batch="b1", files=["a.jsonl"], attempt=1)
    j2 = Journal(tmp_path / "j.jsonl")
    assert j2.state.files["a.jsonl"].sha256 == "h1"
    assert j2.state.open_batch is not None and j2.state.open_batch.files == ["a.jsonl"]
    j2.append("done", batch="b1", files=[{"name": "a.jsonl", "examples": 4}], global_step=7, seconds=2.0, bytes=3,
              examples=4, finished_ts=1.0)
    j3 = Journal(tmp_path / "j.jsonl")
    assert j3.state.open_batch is None
    assert j3.state.files["a.jsonl"].state == "done" and j3.state.files["a.jsonl"].global_step == 7
    assert j3.state.done_since_consolidation == ["a.jsonl"]


def test_torn_last_line_is_skipped_then_repaired(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    j = Journal(path)
    j.append("queued", name="a.jsonl", sha256="h1", size=3, arrived_at="t")
    with open(path, "ab") as f:
        f.write(b'{"event": "queued", "name": "b.js')  # killed mid-write
    j2 = Journal(path)
    assert list(j2.state.files) == ["a.jsonl"]
    j2.append("queued", name="c.jsonl", sha256="h3", size=3, arrived_at="t")
    assert list(Journal(path).state.files) == ["a.jsonl", "c.jsonl"]


def test_kill_between_move_and_journal_write_is_recovered(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "queue")
    # The rename happened, the "queued" line did not.
    move_no_overwrite(put(tmp_path / "inbox" / "x.jsonl"), sp.folder("waiting") / "x.jsonl")
    sp2 = Spool(tmp_path / "queue")
    sp2.reconcile()
    rec = sp2.journal.state.files["x.jsonl"]
    assert rec.state == "queued" and len(rec.sha256) == 64


def test_kill_between_batch_line_and_moves_finishes_the_moves(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "queue")
    a = sp.take(put(tmp_path / "inbox" / "a.jsonl"), True)
    b = sp.take(put(tmp_path / "inbox" / "b.jsonl", LINE * 2), True)
    sp.journal.append("batch", batch="b1", files=[a, b], attempt=1)  # killed before any move
    sp2 = Spool(tmp_path / "queue")
    sp2.reconcile()
    assert sp2.where(a) == sp2.where(b) == "processing"


def test_kill_after_done_line_before_moves_finishes_them(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "queue")
    a = sp.take(put(tmp_path / "inbox" / "a.jsonl"), True)
    sp.start_batch("b1", [a])
    sp.journal.append("done", batch="b1", files=[{"name": a, "examples": 1}], global_step=1, seconds=1, bytes=1,
                      examples=1, finished_ts=0)
    reports = tmp_path / "status" / "reports"
    put(reports / f"{a}.report.json", '{"examples": 1}')
    sp2 = Spool(tmp_path / "queue")
    sp2.reconcile(tmp_path / "status")
    assert sp2.where(a) == "done"
    assert (sp2.folder("done") / f"{a}.report.json").exists()


def test_processing_file_without_open_batch_goes_back_to_waiting(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "queue")
    a = sp.take(put(tmp_path / "inbox" / "a.jsonl"), True)
    sp.start_batch("b1", [a])
    sp.journal.append("requeue", batch="b1", files=[a], solo=False)  # killed before the move back
    sp2 = Spool(tmp_path / "queue")
    sp2.reconcile()
    assert sp2.where(a) == "waiting" and sp2.journal.state.open_batch is None


def test_failed_line_without_move_is_finished(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "queue")
    a = sp.take(put(tmp_path / "inbox" / "a.jsonl"), True)
    sp.journal.append("failed", name=a, reason="bad")
    sp2 = Spool(tmp_path / "queue")
    sp2.reconcile()
    assert sp2.where(a) == "failed"
    assert (sp2.folder("failed") / f"{a}.error.txt").read_text().strip() == f"{a}: bad"


def test_duplicate_of_failed_file_is_retrained(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "queue")
    a = sp.take(put(tmp_path / "inbox" / "a.jsonl"), True)
    sp.fail(a, "crashed")
    b = sp.take(put(tmp_path / "inbox" / "a.jsonl"), True)
    assert sp.where(b) == "waiting"
