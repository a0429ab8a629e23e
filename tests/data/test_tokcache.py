"""Files tokenized ahead (data/tokcache.py, prepare.fill_cache): taken by the run they were for, never by another."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, chat, make_cfg, smol_tokenizer, write_jsonl
from ultimate_trainer.data import prepare as data
from ultimate_trainer.data import tokcache


def _records(n: int, tag: str) -> list[dict]:
    return [chat(f"{tag} question {i}?", f"{tag} answer {i}.") for i in range(n)]


def _same(a: data.Prepared, b: data.Prepared) -> None:
    """Two preparations give the run the same data: tokens, held-out examples, reports."""
    assert len(a.train) == len(b.train) and [a.train[i] for i in range(len(a.train))] == \
        [b.train[i] for i in range(len(b.train))]
    assert a.heldout_encoded == b.heldout_encoded
    assert [(e.messages, e.source) for e in a.heldout] == [(e.messages, e.source) for e in b.heldout]
    strip = lambda r: {k: v for k, v in r.to_json().items() if k != "created_at"}  # noqa: E731
    assert {k: strip(v) for k, v in a.reports.items()} == {k: strip(v) for k, v in b.reports.items()}


def test_a_run_takes_the_files_tokenized_ahead_and_gets_the_same_data(tmp_path):
    tok = smol_tokenizer()
    eval_file = write_jsonl(tmp_path / "eval.jsonl", _records(5, "eval"))
    # b copies two examples of the eval file: they are held out, whether tokenized ahead or not
    a = write_jsonl(tmp_path / "a.jsonl", _records(40, "alpha"))
    b = write_jsonl(tmp_path / "b.jsonl", _records(30, "beta") + _records(2, "eval"))
    cfg = make_cfg(tmp_path, eval_file=str(eval_file), heldout_fraction=0.2)
    cache = tmp_path / "cache"
    made = data.fill_cache([a, b], tok, cfg, cache)
    assert len(made) == 3  # the eval file, a, b
    assert not list(cache.glob(f"{tokcache.TMP_PREFIX}*"))

    plain = data.prepare([a, b], tok, cfg, tmp_path / "plain")
    ahead = data.prepare([a, b], tok, cfg, tmp_path / "ahead", cache_dir=cache)
    assert ahead.cache_hits == [str(eval_file), str(a), str(b)] and plain.cache_hits == []
    assert len(ahead.cache_used) == 2  # the eval file's entry stays for the next run
    _same(ahead, plain)
    assert ahead.reports[str(b)].heldout_duplicates == 2


def test_files_given_with_the_manifest_hash_are_not_hashed_again(tmp_path, monkeypatch):
    """The prefetch child keys its entries by the daemon's hashes (core/manifest.py): it never hashes."""
    from ultimate_trainer.core.manifest import digest

    tok = smol_tokenizer()
    a = write_jsonl(tmp_path / "a.jsonl", _records(20, "alpha"))
    cfg = make_cfg(tmp_path)
    cache = tmp_path / "cache"
    entry = digest(a)  # what the daemon's journal holds for the file

    def no_hash(path):
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr(tokcache, "file_sha256", no_hash)
    assert len(data.fill_cache([entry], tok, cfg, cache)) == 1
    ahead = data.prepare([entry], tok, cfg, tmp_path / "ahead", cache_dir=cache)
    assert ahead.cache_hits == [str(a)] and ahead.reports[str(a)].sha256 == entry.sha256
    monkeypatch.undo()
    _same(ahead, data.prepare([a], tok, cfg, tmp_path / "plain"))


def test_a_wrong_or_stale_hint_is_not_used(tmp_path):
    tok = smol_tokenizer()
    a = write_jsonl(tmp_path / "a.jsonl", _records(20, "alpha"))
    b = write_jsonl(tmp_path / "b.jsonl", _records(20, "beta"))
    cfg = make_cfg(tmp_path)
    cache = tmp_path / "cache"
    data.fill_cache([a], tok, cfg, cache)

    # the hint named other files: nothing to take
    assert data.prepare([b], tok, cfg, tmp_path / "s1", cache_dir=cache).cache_hits == []
    # the file changed after it was tokenized ahead: read again, with its new content
    write_jsonl(a, _records(25, "alpha"))
    stale = data.prepare([a], tok, cfg, tmp_path / "s2", cache_dir=cache)
    assert stale.cache_hits == [] and stale.reports[str(a)].examples == 25
    _same(stale, data.prepare([a], tok, cfg, tmp_path / "s3"))
    # another setting that changes the tokens: not taken either
    data.fill_cache([a], tok, cfg, cache)
    other = make_cfg(tmp_path, system_prompt="Another system prompt.")
    assert data.prepare([a], tok, other, tmp_path / "s4", cache_dir=cache).cache_hits == []
    assert data.prepare([a], tok, cfg, tmp_path / "s5", cache_dir=cache).cache_hits == [str(a)]


def test_a_killed_prefetch_leaves_no_entry_a_run_would_take(tmp_path, builtin_model_dir):
    big = write_jsonl(tmp_path / "big.jsonl", _records(30000, "big"))
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text('{"paths": {"root": "%s"}}' % tmp_path)
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "ultimate_trainer.trainer.prefetch", "--cache", str(cache),
                             "--base", str(builtin_model_dir), "--config", str(cfg_path), "--", str(big)],
                            cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(cache.glob(f"{tokcache.TMP_PREFIX}*/store/input_ids.int32")):
            assert proc.poll() is None and time.monotonic() < deadline, "the prefetch never started its entry"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [p.name for p in cache.iterdir() if not p.name.startswith(tokcache.TMP_PREFIX)] == []
    from ultimate_trainer.core import config
    from ultimate_trainer.model.loading import load_tokenizer

    cfg = config.load(cfg_path)
    tok = load_tokenizer(str(builtin_model_dir))
    small = write_jsonl(tmp_path / "small.jsonl", _records(5, "small"))
    assert data.prepare([big], tok, cfg, tmp_path / "run", cache_dir=cache).cache_hits == []
    data.fill_cache([small], tok, cfg, cache)  # the next prefetch clears what the killed one left
    assert not list(cache.glob(f"{tokcache.TMP_PREFIX}*"))


def test_old_entries_nobody_used_are_pruned(tmp_path):
    cache = tmp_path / "cache"
    (cache / "old").mkdir(parents=True)
    (cache / "new").mkdir()
    import os

    os.utime(cache / "old", (time.time() - tokcache.MAX_AGE_SECONDS - 10,) * 2)
    tokcache.prune(cache)
    assert sorted(p.name for p in cache.iterdir()) == ["new"]
    assert Path(cache / "new").is_dir()
