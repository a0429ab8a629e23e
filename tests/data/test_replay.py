"""Replay: a few lines of files trained before (the manifest's sources), drawn by the run id, never held-out ones."""

from __future__ import annotations

from pathlib import Path

from conftest import chat, smol_tokenizer, write_jsonl
from ultimate_trainer.core import config as config_mod
from ultimate_trainer.core.manifest import Manifest, digest, done_sources
from ultimate_trainer.data import prepare
from ultimate_trainer.data.replay import heldout_examples, replay_count, split_lines, write_replay


def cfg_for(root: Path, **sets: object) -> config_mod.Config:
    return config_mod.load(None, [f"paths.root={root}", "data.heldout_fraction=0.2", "data.heldout_max_per_file=30",
                                  *(f"{k}={v}" for k, v in sets.items())])


SEED = "abcdef0123456789"
OTHER_SEED = "0123456789abcdef"


def manifest(new: Path, done: Path) -> Manifest:
    """The run of ``new`` with ``done``'s files as replay sources, as the daemon or train.py describes it."""
    return Manifest([digest(new)], done_sources(done))


def setup(tmp_path: Path) -> tuple[Path, Path]:
    done = tmp_path / "queue" / "done"
    write_jsonl(done / "old.jsonl", [chat(f"old question {i}", f"old answer {i}") for i in range(300)])
    write_jsonl(done / "older.jsonl", [chat(f"older question {i}", f"older answer {i}") for i in range(100)])
    new = write_jsonl(tmp_path / "new.jsonl", [chat(f"new question {i}", f"new answer {i}") for i in range(60)])
    return done, new


def test_replay_is_a_fraction_of_the_run_deterministic_and_never_held_out(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, **{"training.replay_fraction": 0.2})
    done, new = setup(tmp_path)
    r = write_replay(manifest(new, done), cfg, tmp_path / "r1.jsonl", SEED)
    assert replay_count(60, 0.2) == 15 and r is not None and r.lines == 15
    assert sum(r.sources.values()) == 15 and set(r.sources) <= {"old.jsonl", "older.jsonl"}
    again = write_replay(manifest(new, done), cfg, tmp_path / "r2.jsonl", SEED)
    assert (tmp_path / "r1.jsonl").read_bytes() == (tmp_path / "r2.jsonl").read_bytes()  # resume: same lines
    write_replay(manifest(new, done), cfg, tmp_path / "r3.jsonl", OTHER_SEED)
    assert (tmp_path / "r3.jsonl").read_bytes() != (tmp_path / "r1.jsonl").read_bytes()
    assert again is not None
    held = {raw for f in done.iterdir() for _, raw, _, h in split_lines(f, cfg) if h}
    assert len(held) > 20  # the rule did hold lines out
    replayed = (tmp_path / "r1.jsonl").read_bytes().splitlines()
    assert not set(replayed) & held


def test_no_replay_when_off_or_nothing_done_or_same_file(tmp_path: Path) -> None:
    done, new = setup(tmp_path)
    assert write_replay(manifest(new, done), cfg_for(tmp_path, **{"training.replay_fraction": 0}), tmp_path / "r",
                        SEED) is None
    cfg = cfg_for(tmp_path, **{"training.replay_fraction": 0.1})
    assert write_replay(manifest(new, tmp_path / "missing"), cfg, tmp_path / "r", SEED) is None
    # A done file with the run's own content is not replayed (the run trains it anyway).
    only = tmp_path / "only"
    write_jsonl(only / "copy.jsonl", [chat(f"new question {i}", f"new answer {i}") for i in range(60)])
    assert write_replay(manifest(new, only), cfg, tmp_path / "r", SEED) is None


def test_prepare_trains_the_replay_after_the_run_files_without_holding_any_out(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, **{"training.replay_fraction": 0.2, "training.max_seq_length": 128})
    done, new = setup(tmp_path)
    r = write_replay(manifest(new, done), cfg, tmp_path / "replay.jsonl", SEED)
    assert r is not None
    alone = prepare.prepare([new], smol_tokenizer(), cfg, tmp_path / "s1")
    mixed = prepare.prepare([new], smol_tokenizer(), cfg, tmp_path / "s2", replay_file=r.path)
    assert mixed.replay_examples == r.lines == 15
    assert len(mixed.train) == len(alone.train) + 15
    assert len(mixed.heldout) == len(alone.heldout)  # nothing of the replay is asked at evaluation
    assert list(mixed.reports) == [str(new)]  # no report for the replay file


def test_heldout_examples_for_the_gate_come_from_every_file_in_turn(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path)
    done, _ = setup(tmp_path)
    got = heldout_examples(sorted(done.iterdir()), cfg, 10)
    assert len(got) == 10 and {e.source.split(":")[0] for e in got} == {"old.jsonl", "older.jsonl"}
    held = {f"{f.name}:{n}" for f in done.iterdir() for n, _, _, h in split_lines(f, cfg) if h}
    assert all(e.source in held for e in got)  # only lines prepare held out: never trained on


def test_replay_sources_come_from_what_is_recorded_not_a_second_hash(tmp_path: Path) -> None:
    """The manifest's sources take the journal's hash and line count while the size agrees; a file the
    journal does not describe (or whose size changed) is hashed once, at the boundary."""
    done, _ = setup(tmp_path)
    old = done / "old.jsonl"
    known = {"old.jsonl": ("f" * 64, old.stat().st_size, 7)}
    by_name = {e.path.name: e for e in done_sources(done, known)}
    assert (by_name["old.jsonl"].sha256, by_name["old.jsonl"].lines) == ("f" * 64, 7)
    assert by_name["older.jsonl"] == digest(done / "older.jsonl") and by_name["older.jsonl"].lines == 100
    stale = {"old.jsonl": ("f" * 64, old.stat().st_size + 1, 7)}
    assert done_sources(done, stale)[0] == digest(old)


def test_a_manifest_reads_back_what_it_wrote(tmp_path: Path) -> None:
    done, new = setup(tmp_path)
    m = manifest(new, done)
    assert Manifest.read(m.write(tmp_path / "m.json")) == m and m.lines == 60


def test_split_lines_holds_out_what_prepare_held_out_tiny_files_and_eval_file_included(tmp_path: Path) -> None:
    """One rule (data/heldout.py): a file whose every line falls in the held-out share is trained whole by
    prepare, so replay may draw it and the gate never asks it; the eval file is held out whole."""
    import json

    from ultimate_trainer.data.heldout import is_heldout

    cfg = cfg_for(tmp_path, **{"data.heldout_fraction": 0.5, "training.max_seq_length": 128})
    held = [r for r in (chat(f"q{i}", "a") for i in range(200)) if is_heldout(json.dumps(r).encode(), 0.5)][:2]
    tiny = write_jsonl(tmp_path / "tiny.jsonl", held)
    assert [h for *_, h in split_lines(tiny, cfg)] == [False, False]
    report = prepare.prepare([tiny], smol_tokenizer(), cfg, tmp_path / "s").reports[str(tiny)]
    assert report.train_examples == 2 and report.heldout_examples == 0
    assert heldout_examples([tiny], cfg, 10) == []
    assert [h for *_, h in split_lines(tiny, cfg, all_heldout=True)] == [True, True]
    assert len(heldout_examples([tiny], cfg, 10, eval_file=tiny)) == 2
