"""Tokenized files kept for a later run: what the worker's prefetch leaves for the next run (docs/DATA.md).

While the trainer worker trains one run, the files of the run queued after it can be tokenized in
the background (``prepare.fill_cache``, started by trainer/worker.py) into a cache folder; when that
run comes, ``prepare(..., cache_dir=...)`` takes each file it finds there instead of tokenizing it.

An entry is one file's share of a run, under a key that covers everything its tokens depend on:

- the file's content (SHA-256) and name (examples are named ``file:line``),
- the tokenizer (its whole definition and chat template), the data settings and the code of the data
  package (a new version never reads an older entry),
- the held-out examples met before it in the run (the eval file, earlier files: copies of them are
  held out), and whether it is the eval file (all held out).

So a wrong hint, a file that changed, another tokenizer or setting simply finds no entry and is
tokenized as usual. An entry is written in a ``.tmp-`` folder and renamed into place once complete:
a killed prefetch leaves no entry a run would trust (``.tmp-`` folders are removed by the next
prefetch). Entries a run used are removed after it; any other is removed after ``MAX_AGE_SECONDS``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any

from ultimate_trainer.core.config import Config

FORMAT = 1
ENTRY_FILE = "entry.pkl"  # written last, inside the .tmp- folder
STORE = "store"
TMP_PREFIX = ".tmp-"
MAX_AGE_SECONDS = 24 * 3600
_fingerprints: dict[int, tuple[Any, str]] = {}  # id(tokenizer) -> (tokenizer, its fingerprint)
_code: str | None = None


def _code_hash() -> str:
    global _code
    if _code is None:
        h = hashlib.sha256()
        for path in sorted(Path(__file__).parent.glob("*.py")):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
        _code = h.hexdigest()
    return _code


def fingerprint(tokenizer: Any, cfg: Config) -> str | None:
    """What, besides a file, its tokens depend on; None when the tokenizer cannot be pinned down (no cache)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    known = _fingerprints.get(id(tokenizer))
    if known is None or known[0] is not tokenizer:
        template = getattr(tokenizer, "chat_template", None)
        h = hashlib.sha256(backend.to_str().encode())
        h.update(json.dumps([template if isinstance(template, str) else repr(template), tokenizer.eos_token_id,
                             type(tokenizer).__name__]).encode())
        known = _fingerprints[id(tokenizer)] = (tokenizer, h.hexdigest())
    d = cfg.data
    settings = [d.system_prompt, d.max_line_bytes, d.heldout_fraction, d.heldout_max_per_file, d.overlong,
                cfg.training.max_seq_length]
    return hashlib.sha256(json.dumps([FORMAT, _code_hash(), known[1], settings]).encode()).hexdigest()


def file_sha256(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def entry_key(fp: str, path: Path, sha256: str, all_heldout: bool, seen_heldout: set[bytes]) -> str:
    h = hashlib.sha256(json.dumps([fp, path.name, sha256, all_heldout]).encode())
    for key in sorted(seen_heldout):
        h.update(key)
    return h.hexdigest()


def load(cache_dir: Path, key: str) -> dict[str, Any] | None:
    """The entry's saved state (report, held-out examples, held-out keys after it) or None; its store is
    ``cache_dir/key/store``."""
    try:
        with open(Path(cache_dir) / key / ENTRY_FILE, "rb") as f:
            entry = pickle.load(f)
    except (OSError, pickle.PickleError, EOFError, AttributeError, ImportError):
        return None
    return entry if isinstance(entry, dict) and entry.get("format") == FORMAT else None


def tmp_dir(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"{TMP_PREFIX}{key}-{os.getpid()}"


def commit(cache_dir: Path, key: str, tmp: Path, entry: dict[str, Any]) -> bool:
    """Write ``entry`` into ``tmp`` (which holds its store) and rename it into place; False if one is there."""
    with open(tmp / ENTRY_FILE, "wb") as f:
        pickle.dump({"format": FORMAT, **entry}, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.rename(tmp, Path(cache_dir) / key)
    except OSError:  # another prefetch made it first
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True


def remove(cache_dir: Path, keys: list[str]) -> None:
    for key in keys:
        shutil.rmtree(Path(cache_dir) / key, ignore_errors=True)


def prune(cache_dir: Path, now: float | None = None) -> None:
    """Remove unfinished entries (only while no other prefetch writes) and entries nobody used in time."""
    now = time.time() if now is None else now
    for p in Path(cache_dir).iterdir() if Path(cache_dir).is_dir() else []:
        try:
            old = now - p.stat().st_mtime > MAX_AGE_SECONDS
        except OSError:
            continue
        if p.name.startswith(TMP_PREFIX) or old:
            shutil.rmtree(p, ignore_errors=True)
