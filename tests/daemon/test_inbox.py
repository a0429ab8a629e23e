"""Inbox flattening, stable-file detection and the spool moves (no trainer involved)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ultimate_trainer.daemon.inbox import Inbox, Spool, StabilityTracker, unique_name


class FakeClock:
    """Stepped by the test, so stability is decided without sleeping."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def write(p: Path, text: str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")
    return p


LINE = '{"text": "hello"}\n'


def test_same_name_in_several_folders_and_root_gets_counters(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    write(inbox / "data.jsonl", LINE)
    write(inbox / "a" / "data.jsonl", LINE + LINE)
    write(inbox / "b" / "c" / "data.jsonl", LINE * 3)
    res = Inbox(inbox, 0).scan()
    names = sorted(p.name for p in res.ready)
    assert names == ["data.jsonl", "data_1.jsonl", "data_2.jsonl"]
    sizes = sorted((inbox / n).stat().st_size for n in names)
    assert sizes == [len(LINE), 2 * len(LINE), 3 * len(LINE)]  # nothing overwritten
    assert not (inbox / "a").exists() and not (inbox / "b").exists()  # emptied folders removed


def test_deep_nesting_unicode_and_spaces(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    deep = inbox / "x" / "y" / "z" / "w" / "v"
    write(deep / "données été 2026.jsonl", LINE)
    write(inbox / "my run" / "日本語 file.jsonl", LINE)
    res = Inbox(inbox, 0).scan()
    assert sorted(p.name for p in res.ready) == ["données été 2026.jsonl", "日本語 file.jsonl"]
    assert all(p.parent == inbox for p in res.ready)
    assert list(inbox.iterdir()) and not (inbox / "x").exists()


def test_non_jsonl_files_are_left_alone_and_keep_their_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    inbox = tmp_path / "inbox"
    write(inbox / "sub" / "notes.txt", "hi")
    write(inbox / "sub" / "good.jsonl", LINE)
    write(inbox / "readme.md", "x")
    ib = Inbox(inbox, 0)
    res = ib.scan()
    assert [p.name for p in res.ready] == ["good.jsonl"]
    assert (inbox / "sub" / "notes.txt").exists() and (inbox / "readme.md").exists()
    assert {p.name for p in res.ignored} == {"notes.txt", "readme.md"}
    ib.scan()
    assert sum("notes.txt" in r.message for r in caplog.records) == 1  # reported once


def test_symlink_pointing_outside_is_reported_and_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside / "secret.jsonl", LINE)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    os.symlink(outside / "secret.jsonl", inbox / "link.jsonl")
    os.symlink(outside, inbox / "linkdir")
    res = Inbox(inbox, 0).scan()
    assert res.ready == []
    assert {p.name for p in res.ignored} == {"link.jsonl", "linkdir"}
    assert (outside / "secret.jsonl").exists() and (inbox / "link.jsonl").is_symlink()


def test_temporary_names_are_ignored(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    for n in (".hidden.jsonl", "x.jsonl.tmp", "y.jsonl.part", "z.jsonl~"):
        write(inbox / n, LINE)
    res = Inbox(inbox, 0).scan()
    assert res.ready == [] and res.ignored == []


def test_file_written_slowly_is_not_taken_before_complete(tmp_path: Path) -> None:
    clock = FakeClock()
    inbox = tmp_path / "inbox"
    f = write(inbox / "slow.jsonl", '{"text": "par')  # unterminated line
    ib = Inbox(inbox, stable_seconds=5, clock=clock)
    assert ib.scan().ready == []
    clock.t += 10
    res = ib.scan()
    assert res.ready == [] and [p.name for p in res.incomplete] == ["slow.jsonl"]
    with open(f, "a") as fh:
        fh.write('tial"}\n{"text": "more"}\n')
    clock.t += 1
    assert ib.scan().ready == []  # changed: the clock starts again
    clock.t += 4.9
    assert ib.scan().ready == []
    clock.t += 0.2
    assert [p.name for p in ib.scan().ready] == ["slow.jsonl"]


def test_stability_tracker_notices_same_size_rewrite(tmp_path: Path) -> None:
    clock = FakeClock()
    p = write(tmp_path / "a.jsonl", LINE)
    tr = StabilityTracker(2, clock)
    assert not tr.is_stable(p.stat())
    clock.t += 3
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    assert not tr.is_stable(p.stat())
    clock.t += 3
    assert tr.is_stable(p.stat())


def test_unique_name_counts_up() -> None:
    taken = {"a.jsonl", "a_1.jsonl"}
    assert unique_name("a.jsonl", taken.__contains__) == "a_2.jsonl"
    assert unique_name("b.jsonl", taken.__contains__) == "b.jsonl"


def test_spool_take_journals_hash_and_detects_duplicates(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    sp = Spool(tmp_path / "queue")
    a = sp.take(write(inbox / "a.jsonl", LINE), skip_duplicates=True)
    b = sp.take(write(inbox / "a.jsonl", LINE), skip_duplicates=True)  # same name, same bytes
    assert (a, b) == ("a.jsonl", "a_1.jsonl")
    assert sp.where(a) == "waiting" and sp.where(b) == "done"
    assert (sp.folder("done") / "a_1.jsonl.duplicate.txt").read_text().startswith("a_1.jsonl: byte-identical to a.jsonl")
    c = sp.take(write(inbox / "c.jsonl", LINE), skip_duplicates=False)
    assert sp.where(c) == "waiting"
    assert sp.journal.state.files[a].sha256 == sp.journal.state.files[c].sha256


def test_failed_file_gets_error_text_and_is_never_deleted(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "queue")
    n = sp.take(write(tmp_path / "inbox" / "bad.jsonl", "not json\n"), skip_duplicates=True)
    sp.start_batch("b1", [n])
    assert sp.where(n) == "processing"
    sp.fail(n, "no usable example")
    assert (sp.folder("failed") / n).read_text() == "not json\n"
    assert "no usable example" in (sp.folder("failed") / f"{n}.error.txt").read_text()


def test_json_arrays_are_taken_once_closed_other_json_reported(tmp_path: Path, caplog) -> None:
    inbox = tmp_path / "inbox"
    write(inbox / "alpaca.json", '[\n  {"instruction": "a", "output": "b"}\n]\n')
    write(inbox / "lines.json", LINE * 2)  # JSON Lines under a .json name (datasets' to_json)
    write(inbox / "open.json", '[\n  {"instruction": "a", "output": "b"},\n')
    write(inbox / "object.json", '{\n  "data": []\n}\n')
    write(inbox / "notes.txt", "x")
    with caplog.at_level("WARNING"):
        res = Inbox(inbox, 0).scan()
    assert sorted(p.name for p in res.ready) == ["alpaca.json", "lines.json"]
    assert [p.name for p in res.incomplete] == ["open.json"]
    assert sorted(p.name for p in res.ignored) == ["notes.txt", "object.json"]
    assert "JSON array not closed with ] (still being written?)" in caplog.text
    assert "a .json file must hold a JSON array of records" in caplog.text
    assert "not a .jsonl or .json file" in caplog.text
    spool = Spool(tmp_path / "queue")
    spool.take(inbox / "alpaca.json", skip_duplicates=False)
    assert spool.names_in("waiting") == ["alpaca.json"]
