"""JSON array files (``[{...}, {...}]``, LLaMA-Factory's native form), streamed one item at a time.

``ijson`` parses the array incrementally, so memory holds one item, never the file. An item that is
not usable is reported as ``file:item N``; malformed JSON ends the file at that point (a streaming
parser cannot find the next item after a syntax error), reported on the item where it happened,
with the items before it kept.

How a file is read is decided by its first non-blank byte, not its name: ``[`` is an array; anything
else is JSON Lines (datasets' ``to_json`` writes JSON Lines under ``.json``).
"""

from __future__ import annotations

import json
from typing import Any, BinaryIO, Iterator

import ijson

from ultimate_trainer.data.errors import BadLine

_BOM = b"\xef\xbb\xbf"
_SNIFF = 1 << 16


def is_array(f: BinaryIO) -> bool:
    """True when the file's first non-blank byte (after a UTF-8 byte-order mark) is ``[``; rewinds ``f``."""
    head = f.read(_SNIFF)
    f.seek(0)
    if head.startswith(_BOM):
        head = head[len(_BOM):]
    return head.lstrip()[:1] == b"["


class _Reader:
    """A binary reader that feeds a digest and skips a leading byte-order mark (ijson rejects it)."""

    def __init__(self, f: BinaryIO, digest: Any):
        self.f, self.digest, self.first = f, digest, True
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if self.digest is not None:
            self.digest.update(data)
        self.pos += len(data)
        if self.first and data:  # (ijson first reads 0 bytes, to see whether the file is binary)
            self.first = False
            if data.startswith(_BOM):
                data = data[len(_BOM):]
        return data


def iter_items(f: BinaryIO, digest: Any = None) -> Iterator[tuple[int, bytes, Any]]:
    """``(item number, canonical bytes, value or BadLine)`` for each item of a top-level JSON array.

    The canonical bytes (the item re-serialised with sorted keys) identify the item for the held-out
    split, whatever its spacing in the file.
    """
    n = 0
    reader = _Reader(f, digest)
    try:
        for value in ijson.items(reader, "item", use_float=True):
            n += 1
            yield n, json.dumps(value, sort_keys=True, ensure_ascii=False).encode(), value
    except ijson.JSONError as e:
        msg = e.args[0] if e.args else ""
        msg = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)  # yajl hands bytes
        reason = msg.strip().splitlines()[0].rstrip(".") if msg.strip() else type(e).__name__
        yield n + 1, b"", BadLine(f"invalid JSON after item {n}: {reason[:160]}; the rest of the file is not read")
    except UnicodeDecodeError as e:
        yield n + 1, b"", BadLine(f"not UTF-8 after item {n} (byte 0x{e.object[e.start]:02x}); the rest of the "
                                  f"file is not read")
    if digest is not None:  # hash what the parser did not need to read (trailing blanks)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
