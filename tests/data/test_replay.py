"""Replay: a few lines of files trained before, drawn by the run id, never held-out ones."""

from __future__ import annotations

from pathlib import Path

from conftest import chat, smol_tokenizer, write_jsonl
from ultimate_trainer.core import config as config_mod
from ultimate_trainer.data import prepare
from ultimate_trainer.data.replay import heldout_examples, replay_count, split_lines, write_replay


def cfg_for(root: Path, **sets: object) -> config_mod.Config:
    return config_mod.load(None, [f"paths.root={root}", "data.heldout_fraction=0.2", "data.heldout_max_per_file=30",
                                  *(f"{k}={v}" for k, v in sets.items())])


def seed(hashes: list[str]) -> str:
    return "abcdef0123456789"


def other_seed(hashes: list[str]) -> str:
    return "0123456789abcdef"


def setup(tmp_path: Path) -> tuple[Path, Path]:
    done = tmp_path / "queue" / "done"
    write_jsonl(done / "old.jsonl", [chat(f"old question {i}", f"old answer {i}") for i in range(300)])
    write_jsonl(done / "older.jsonl", [chat(f"older question {i}", f"older answer {i}") for i in range(100)])
    new = write_jsonl(tmp_path / "new.jsonl", [chat(f"new question {i}", f"new answer {i}") for i in range(60)])
    return done, new


def test_replay_is_a_fraction_of_the_run_deterministic_and_never_held_out(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, **{"training.replay_fraction": 0.2})
    done, new = setup(tmp_path)
    r = write_replay([new], cfg, done, tmp_path / "r1.jsonl", seed)
    assert replay_count(60, 0.2) == 15 and r is not None and r.lines == 15
    assert sum(r.sources.values()) == 15 and set(r.sources) <= {"old.jsonl", "older.jsonl"}
    again = write_replay([new], cfg, done, tmp_path / "r2.jsonl", seed)
    assert (tmp_path / "r1.jsonl").read_bytes() == (tmp_path / "r2.jsonl").read_bytes()  # resume: same lines
    write_replay([new], cfg, done, tmp_path / "r3.jsonl", other_seed)
    assert (tmp_path / "r3.jsonl").read_bytes() != (tmp_path / "r1.jsonl").read_bytes()
    assert again is not None
    held = {raw for f in done.iterdir() for _, raw, _, h in split_lines(f, cfg) if h}
    assert len(held) > 20  # the rule did hold lines out
    replayed = (tmp_path / "r1.jsonl").read_bytes().splitlines()
    assert not set(replayed) & held


def test_no_replay_when_off_or_nothing_done_or_same_file(tmp_path: Path) -> None:
    done, new = setup(tmp_path)
    assert write_replay([new], cfg_for(tmp_path, **{"training.replay_fraction": 0}), done, tmp_path / "r", seed) \
        is None
    cfg = cfg_for(tmp_path, **{"training.replay_fraction": 0.1})
    assert write_replay([new], cfg, tmp_path / "missing", tmp_path / "r", seed) is None
    # A done file with the run's own content is not replayed (the run trains it anyway).
    only = tmp_path / "only"
    write_jsonl(only / "copy.jsonl", [chat(f"new question {i}", f"new answer {i}") for i in range(60)])
    assert write_replay([new], cfg, only, tmp_path / "r", seed) is None


def test_prepare_trains_the_replay_after_the_run_files_without_holding_any_out(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, **{"training.replay_fraction": 0.2, "training.max_seq_length": 128})
    done, new = setup(tmp_path)
    r = write_replay([new], cfg, done, tmp_path / "replay.jsonl", seed)
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
