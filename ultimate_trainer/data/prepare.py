"""Input files -> a streamed, memory-mapped training set, held-out examples and per-file reports.

``prepare()`` reads each JSONL file as bytes, line by line (so a line that is not UTF-8 is one bad
line, not a crashed run; a line longer than ``data.max_line_bytes`` is skipped without being held in
memory), or each JSON array file item by item (``jsonarray``: a file whose first byte is ``[``),
parses each record (``formats``), puts it aside for evaluation or for training, and
tokenizes ``data.tokenize_chunk_size`` records at a time (``encoding.encode_batch``). Each chunk is
appended to a ``TokenStore`` on disk and dropped, so memory does not grow with the file.

Held-out split: the rule of data/heldout.py (the SHA-1 share of each raw line, at most
``data.heldout_max_per_file`` per file, copies of held-out examples, tiny files trained whole),
applied as the file is read; ``data.eval_file`` is read first and held out whole.

See docs/DATA.md for formats, masking and the report.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np

from ultimate_trainer.core import status
from ultimate_trainer.core.times import now_iso
from ultimate_trainer.core.config import Config
from ultimate_trainer.core.manifest import FileEntry
from ultimate_trainer.core.records import FileReport
from ultimate_trainer.data import encoding, reasoning, tokcache
from ultimate_trainer.data.formats import FORMATS, BadLine, Example, decode_line, parse_record
from ultimate_trainer.data.heldout import COPY, HELD_OUT, HeldOut
from ultimate_trainer.data.jsonarray import is_array, iter_items
from ultimate_trainer.data.tokenstore import TokenStore, TokenStoreWriter

log = logging.getLogger(__name__)

MAX_BAD_IN_REPORT = 1000
MAX_BAD_LOGGED = 10
MAX_WARNINGS = 20
_READ_BLOCK = 1 << 20
_BOM = b"\xef\xbb\xbf"


@dataclass
class Prepared:
    """Everything a run needs from its files."""

    train: TokenStore
    heldout: list[Example] = field(default_factory=list)  # eval prompts (text format excluded)
    heldout_encoded: list[tuple[list[int], list[int]]] = field(default_factory=list)  # for val loss
    reports: dict[str, FileReport] = field(default_factory=dict)  # by file path as given (core/records.py)
    unusable: list[tuple[str, str]] = field(default_factory=list)  # (file, one-line reason, no file name)
    replay_examples: int = 0  # lines of earlier files replayed into ``train`` (data/replay.py), stored last
    rehearsal_examples: int = 0  # the base's own answers rehearsed (trainer/rehearsal/prompts.py), stored after the replay
    cache_hits: list[str] = field(default_factory=list)  # files whose tokens came from the cache (data/tokcache.py)
    cache_used: list[str] = field(default_factory=list)  # those entries' keys, the eval file's excepted

    @property
    def bad_lines(self) -> int:
        return sum(r.bad_lines for r in self.reports.values())


def iter_lines(f: BinaryIO, max_line_bytes: int, digest: Any = None) -> Iterator[tuple[int, bytes | None, int]]:
    """``(line number, raw bytes without the line end, byte length)`` for each line of a binary file.

    A line longer than ``max_line_bytes`` is read through in blocks and yielded as ``None`` (its
    length still given), so one huge line never sits in memory. A last line without a newline is a line.
    """
    lineno = 0
    while True:
        raw = f.readline(max_line_bytes + 1)
        if not raw:
            return
        if digest is not None:
            digest.update(raw)
        lineno += 1
        if raw.endswith(b"\n"):
            raw = raw[:-1]
        elif len(raw) > max_line_bytes:
            size = len(raw)
            while True:
                rest = f.readline(_READ_BLOCK)
                if digest is not None:
                    digest.update(rest)
                size += len(rest)
                if not rest or rest.endswith(b"\n"):
                    size -= rest.endswith(b"\n")
                    break
            yield lineno, None, size
            continue
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if lineno == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        yield lineno, raw, len(raw)


class _FileReader:
    """Reads one file into the shared writer / held-out lists; fills in its report."""

    def __init__(self, path: Path, tokenizer: Any, cfg: Config, writer: TokenStoreWriter, out: Prepared,
                 seen_heldout: set[bytes], pool: ThreadPoolExecutor, all_heldout: bool = False,
                 never_heldout: bool = False, sha256: str | None = None):
        self.path, self.tokenizer, self.cfg, self.writer, self.out = path, tokenizer, cfg, writer, out
        self.seen_heldout, self.all_heldout = seen_heldout, all_heldout
        self.rule = HeldOut(cfg.data, seen_heldout, all_heldout, never_heldout)
        self.report = FileReport(file=str(path), formats={f: 0 for f in FORMATS})
        self.heldout_here: list[tuple[Example, tuple[list[int], list[int]]]] = []
        self.duplicates = 0
        self.warned: dict[str, list[int]] = {}  # warning kind -> [examples, first line]
        self.reasoning = 0  # usable examples with a reasoning trace
        self.pool = pool
        self.sha256 = sha256  # known from the run's manifest: the file is not hashed again
        self.pending: tuple[encoding.Rendered, Future] | None = None

    def where(self, n: int) -> str:
        """``file:3`` for a line, ``file:item 3`` for an array item."""
        return f"{self.path.name}:{n}" if self.report.unit == "line" else f"{self.path.name}:item {n}"

    def bad(self, line: int, reason: str) -> None:
        r = self.report
        r.bad_lines += 1
        if len(r.bad) < MAX_BAD_IN_REPORT:
            r.bad.append({r.unit: line, "reason": reason})
        if r.bad_lines <= MAX_BAD_LOGGED:
            log.warning("%s: %s", self.where(line), reason)

    def warn(self, ex: Example) -> None:
        """Collect per-example warnings (template placeholders) into a few per-file lines."""
        for kind in ex.warnings:  # e.g. "template placeholder {{name}}"
            self.warned.setdefault(kind, [0, ex.line])[0] += 1

    def _warnings(self) -> list[str]:
        unit = self.report.unit
        return [f"{kind}: {n} example{'s' if n != 1 else ''} (first at {unit} {first}), trained verbatim: fill "
                f"it in before training if it is not meant literally" for kind, (n, first) in
                list(self.warned.items())[:MAX_WARNINGS]]

    def flush(self, chunk: list[Example]) -> None:
        """Render ``chunk`` and hand it to the tokenizer thread; finish the chunk handed over before it.

        The Rust tokenizer releases the GIL: while it tokenizes one chunk, this thread reads, parses
        and renders the next (at most two chunks are in flight, so memory stays flat).
        """
        if chunk:
            rendered = encoding.render_batch(self.tokenizer, chunk)
            job = self.pool.submit(encoding.tokenize, self.tokenizer, rendered)
        self.drain()
        if chunk:
            self.pending = (rendered, job)

    def drain(self) -> None:
        """Finish the chunk in flight, if any: its examples go to the store or the held-out list."""
        if self.pending is None:
            return
        (rendered, job), self.pending = self.pending, None
        d = self.cfg.data
        done = encoding.finish_chunk(self.tokenizer, rendered, job.result(), self.cfg.training.max_seq_length,
                                     d.overlong)
        train = []
        for i, (ex, res) in enumerate(zip(rendered.examples, done.results)):
            if isinstance(res, BadLine):
                self.bad(ex.line, str(res))
                continue
            self.report.examples += 1
            self.report.formats[ex.fmt] += 1
            if ex.has_reasoning:
                self.reasoning += 1
            self.warn(ex)
            if ex.extra.get("duplicate_of_heldout"):
                self.duplicates += 1  # held out already: neither trained nor asked twice
            elif ex.heldout:
                self.heldout_here.append((ex, done.pair(i)))
            else:
                train.append(res)
        self.writer.append_slices(done.ids, done.mask, train)
        self.report.train_examples += len(train)

    def _records(self, f: BinaryIO, digest: Any) -> Iterator[tuple[int, bytes, Any]]:
        """``(line or item number, bytes that identify it, JSON value or BadLine)``; blank lines skipped."""
        if is_array(f):
            self.report.unit = "item"
            yield from iter_items(f, digest)
            return
        max_bytes = self.cfg.data.max_line_bytes
        for lineno, raw, size in iter_lines(f, max_bytes, digest):
            self.report.lines = lineno
            if raw is None:
                yield lineno, b"", BadLine(f"line longer than {max_bytes} bytes ({size} bytes)")
            elif raw.strip():  # blank lines are allowed (counted in `lines`, not as bad)
                try:
                    yield lineno, raw, decode_line(raw, max_bytes)
                except BadLine as e:
                    yield lineno, raw, e

    def run(self) -> FileReport:
        """Read the file; its report, as written to ``reports/``."""
        d = self.cfg.data
        digest = hashlib.sha256() if self.sha256 is None else None
        chunk: list[Example] = []
        try:
            with open(self.path, "rb") as f:
                for n, raw, value in self._records(f, digest):
                    if self.report.unit == "item":
                        self.report.lines = n  # items read, for an array
                    try:
                        if isinstance(value, BadLine):
                            raise value
                        ex = parse_record(value, d.system_prompt)
                    except BadLine as e:
                        self.bad(n, str(e))
                        continue
                    ex.source, ex.line = self.where(n), n
                    decision = self.rule.decide(raw, ex)
                    if decision == COPY:
                        # The same example is already held out (eval file, another file, a duplicate
                        # line): training on this copy would leak it, whatever the cap says.
                        ex.heldout = True
                        ex.extra["duplicate_of_heldout"] = True
                    elif decision == HELD_OUT:
                        ex.heldout = True
                    chunk.append(ex)
                    if len(chunk) >= d.tokenize_chunk_size:
                        self.flush(chunk)
                        chunk = []
                self.flush(chunk)
                self.drain()
                self.report.size_bytes = f.tell()
        except OSError as e:
            self.report.error = f"cannot read: {e.strerror or e}"
            self.drain()  # what was read before the error counts, as a chunk flushed before it did
        finally:
            if self.pending is not None:  # an exception left a chunk in flight: let it end, drop it
                self.pending[1].exception()
                self.pending = None
        self.report.sha256 = self.sha256 if digest is None else digest.hexdigest()
        self.report.warnings = self._warnings()
        if self.reasoning:
            # How this base sees reasoning (its chat template's field, or the <think> convention): recorded
            # with the file, so a run's data says what was trained (data/reasoning.py).
            self.report.reasoning = {"examples": self.reasoning, "rendered_as": reasoning.convention(self.tokenizer)}
            log.info("%s: %d examples with reasoning, rendered %s", self.path.name, self.reasoning,
                     self.report.reasoning["rendered_as"])
        self._settle_heldout()
        self._finish()
        return self.report

    def _settle_heldout(self) -> None:
        if self.rule.tiny_file(self.report.train_examples, len(self.heldout_here)):
            # Every usable line of this (tiny) file fell in the held-out share: train on them instead.
            self.writer.append([enc for _, enc in self.heldout_here])
            self.report.train_examples += len(self.heldout_here)
            for ex, _ in self.heldout_here:
                self.rule.release(ex)
            self.heldout_here = []
        for ex, enc in self.heldout_here:
            self.out.heldout_encoded.append(enc)
            if ex.evaluable:  # text, tool use and untrained final turns have no answer to compare
                self.out.heldout.append(ex)
        self.report.heldout_examples = len(self.heldout_here) + self.duplicates
        self.report.heldout_duplicates = self.duplicates

    def _finish(self) -> None:
        r = self.report
        r.bad.sort(key=lambda b: b[r.unit])  # reasons found at tokenization come in line order too
        r.usable = r.error is None and r.examples > 0
        if r.error is None and not r.usable:
            first = r.bad[0] if r.bad else {}
            if self.path.suffix == ".json" and r.unit == "line" and first.get("line") == 1 \
                    and first["reason"].startswith("invalid JSON"):
                # A pretty-printed object, most likely: say what a .json file has to hold.
                r.error = ("not a JSON array of records ([{...}, ...]) nor JSON Lines (one object per line): "
                           f"line 1: {first['reason']}")
            elif r.bad_lines:
                unit = r.unit
                r.error = (f"no usable example ({r.bad_lines} bad {unit}s; first: "
                           f"{unit} {first[unit]}: {first['reason']})")
            else:
                r.error = "no usable example (the file is empty)"
        r.created_at = now_iso()
        r.schema_version = status.SCHEMA_VERSION


def prepare(files: list[Path] | list[FileEntry], tokenizer: Any, cfg: Config, store_dir: Path,
            status_dir: Path | None = None, replay_file: Path | None = None,
            rehearsal_file: Path | None = None, cache_dir: Path | None = None) -> Prepared:
    """Stream, split and tokenize ``files`` (and ``data.eval_file``) into a TokenStore at ``store_dir``.

    Reports go to ``status_dir/reports/<name>.report.json`` when ``status_dir`` is given. Files with
    no usable example are listed in ``Prepared.unusable`` as (path, one-line reason without the file
    name); the caller decides what to do (train.py exits 3).

    ``replay_file`` (``data/replay.py``) is read last: its lines are trained (never held out, unless
    they copy a held-out example of this run) and it gets no report; ``rehearsal_file``
    (``trainer/rehearsal/prompts.py``) after it, the same way.

    ``cache_dir`` (data/tokcache.py): a file whose entry is there (what ``fill_cache`` left for this
    run) is taken from it instead of being read and tokenized again; the result is the same.

    ``files`` given as the run manifest's entries (core/manifest.py) carry their SHA-256: the report
    and the cache key take it, and no file is hashed here.
    """
    writer = TokenStoreWriter(Path(store_dir))
    out = Prepared(train=None)  # type: ignore[arg-type]  # set once the writer closes
    inputs = _inputs(files, cfg)
    seen_heldout: set[bytes] = set()
    pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
    fp = tokcache.fingerprint(tokenizer, cfg) if cache_dir is not None else None
    try:
        for path, all_heldout, sha in inputs:
            report = _from_cache(path, all_heldout, fp, Path(cache_dir), writer, out, seen_heldout, sha) if fp else None
            if report is None:
                log.info("reading %s%s", path, " (eval file)" if all_heldout else "")
                report = _FileReader(path, tokenizer, cfg, writer, out, seen_heldout, pool, all_heldout,
                                     sha256=sha).run()
            out.reports[str(path)] = report
            if not report.usable:
                reason = f"eval file: {report.error}" if all_heldout else str(report.error)
                out.unusable.append((str(path), reason))
                log.error("%s: %s", path.name, reason)
            else:
                log.info("%s: %d examples (%d train, %d held out), %d bad lines", path.name, report.examples,
                         report.train_examples, report.heldout_examples, report.bad_lines)
            if status_dir is not None:
                status.atomic_write_json(status.report_path(status_dir, path), report.to_json())
        if replay_file is not None:
            rep = _FileReader(Path(replay_file), tokenizer, cfg, writer, out, seen_heldout, pool,
                              never_heldout=True).run()
            out.replay_examples = rep.train_examples
        if rehearsal_file is not None:
            rep = _FileReader(Path(rehearsal_file), tokenizer, cfg, writer, out, seen_heldout, pool,
                              never_heldout=True).run()
            out.rehearsal_examples = rep.train_examples
    except BaseException:
        writer.abort()  # no meta.json: a half-built store must never pass for a complete one
        raise
    finally:
        pool.shutdown()
    out.train = writer.close()
    return out


def _from_cache(path: Path, all_heldout: bool, fp: str, cache_dir: Path, writer: TokenStoreWriter, out: Prepared,
                seen_heldout: set[bytes], sha: str | None = None) -> dict[str, Any] | None:
    """Add ``path``'s share from its cache entry, as ``_FileReader.run`` would have; None when there is none."""
    sha = sha or tokcache.file_sha256(path)
    if sha is None:
        return None
    key = tokcache.entry_key(fp, path, sha, all_heldout, seen_heldout)
    entry = tokcache.load(cache_dir, key)
    if entry is None:
        return None
    try:
        store = TokenStore.open(cache_dir / key / tokcache.STORE)
    except (OSError, ValueError):
        return None
    writer.append_store(store)
    out.heldout.extend(entry["heldout"])
    out.heldout_encoded.extend(entry["heldout_encoded"])
    seen_heldout.clear()
    seen_heldout.update(entry["seen_after"])
    out.cache_hits.append(str(path))
    if not all_heldout:
        out.cache_used.append(key)
    log.info("%s: tokens from the prefetch cache", path.name)
    return FileReport.from_json({**entry["report"], "file": str(path), "created_at": now_iso()}, path)


def fill_cache(files: list[Path] | list[FileEntry], tokenizer: Any, cfg: Config, cache_dir: Path) -> list[str]:
    """Tokenize ``files`` (and ``data.eval_file`` first) as a run of them would, into cache entries that
    ``prepare(files, ..., cache_dir=cache_dir)`` then takes (data/tokcache.py); the keys of new entries.

    ``files`` given as manifest entries (core/manifest.py; the daemon's journal hashed them) key their
    entries by that SHA-256 and are not hashed here. A file given by path alone is hashed, and gets no
    entry when it changes while it is read; a file that cannot be read gets none either.
    """
    fp = tokcache.fingerprint(tokenizer, cfg)
    if fp is None:
        return []
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokcache.prune(cache_dir)
    made: list[str] = []
    seen_heldout: set[bytes] = set()
    with ThreadPoolExecutor(1, thread_name_prefix="tokenize") as pool:
        for path, all_heldout, known in _inputs(files, cfg):
            sha = known or tokcache.file_sha256(path)
            if sha is None:
                return made  # the files after it would be keyed by held-out examples it never gave
            key = tokcache.entry_key(fp, path, sha, all_heldout, seen_heldout)
            entry = tokcache.load(cache_dir, key)
            if entry is not None:
                seen_heldout = set(entry["seen_after"])
                continue
            tmp = tokcache.tmp_dir(cache_dir, key)
            writer = TokenStoreWriter(tmp / tokcache.STORE)
            part = Prepared(train=None)  # type: ignore[arg-type]
            try:
                report = _FileReader(path, tokenizer, cfg, writer, part, seen_heldout, pool, all_heldout,
                                     sha256=known).run()
            except BaseException:
                writer.abort()
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            writer.close()
            if report.error is not None or report.sha256 != sha:
                shutil.rmtree(tmp, ignore_errors=True)  # unreadable, or changed while read: no entry
                return made
            if tokcache.commit(cache_dir, key, tmp, {"report": report.to_json(), "heldout": part.heldout,
                                                     "heldout_encoded": part.heldout_encoded,
                                                     "seen_after": set(seen_heldout)}):
                made.append(key)
            log.info("%s: tokenized ahead for the next run", path.name)
    return made


def _inputs(files: list[Path] | list[FileEntry], cfg: Config) -> list[tuple[Path, bool, str | None]]:
    """The files a run reads, in order, each with whether it is the eval file (read first, all held out)
    and its SHA-256 when the manifest gives it."""
    inputs: list[tuple[Path, bool, str | None]] = [
        (f.path, False, f.sha256 or None) if isinstance(f, FileEntry) else (Path(f), False, None) for f in files]
    if cfg.data.eval_file:
        # Read first, so that copies of its examples in the training files are held out too.
        eval_path = Path(cfg.data.eval_file)
        inputs.insert(0, (eval_path if eval_path.is_absolute() else cfg.path("root") / eval_path, True, None))
    return inputs


def summarize(prepared: Prepared, max_len: int) -> dict[str, Any]:
    """Counts and token-length statistics for ``train.py --dry-run``.

    The counts add up: ``examples = train_examples + heldout_examples + heldout_duplicates`` (a copy
    of a held-out example is neither trained nor asked twice), and every record read is an example or
    a bad line.
    """
    lengths = prepared.train.lengths
    formats = {f: sum(r.formats.get(f, 0) for r in prepared.reports.values()) for f in FORMATS}

    def pct(q: float) -> int | None:
        return int(np.percentile(lengths, q)) if len(lengths) else None

    return {
        "files": len(prepared.reports),
        "unusable_files": [f"{Path(p).name}: {reason}" for p, reason in prepared.unusable],
        "examples": sum(r.examples for r in prepared.reports.values()),
        "train_examples": len(prepared.train),
        "heldout_examples": len(prepared.heldout_encoded),
        "heldout_duplicates": sum(r.heldout_duplicates for r in prepared.reports.values()),
        "eval_prompts": len(prepared.heldout),
        "formats": formats,
        "bad_lines": prepared.bad_lines,
        "warnings": [f"{Path(p).name}: {w}" for p, r in prepared.reports.items() for w in r.warnings],
        "reasoning": [f"{Path(p).name}: {r.reasoning['examples']} examples with reasoning, rendered "
                      f"{r.reasoning['rendered_as']}" for p, r in prepared.reports.items() if r.reasoning],
        "train_tokens": int(lengths.sum()) if len(lengths) else 0,
        "length_p50": pct(50),
        "length_p95": pct(95),
        "length_max": int(lengths.max()) if len(lengths) else None,
        "max_seq_length": max_len,
        "at_max_length": int((lengths >= max_len).sum()) if len(lengths) else 0,
    }
