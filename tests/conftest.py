"""Shared fixtures: the built-in model's cache, a tiny random model with a real chat template, projects.

Unit tests train tiny randomly initialised Llama models built from a config (no download); a few
end-to-end tests (marked ``e2e``) use the real built-in SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parent.parent
MODEL_CACHE = REPO / "models" / "cache"  # shared by every test and by `make demo`: converted once

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def builtin_model_dir() -> Path:
    """The built-in model converted to safetensors (first use converts the GGUF, ~20 s)."""
    from ultimate_trainer.model.loading import ensure_builtin_cache

    return ensure_builtin_cache(MODEL_CACHE)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, builtin_model_dir: Path) -> Path:
    """A 2-layer, 64-wide random Llama with the built-in model's real tokenizer and ChatML template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-model")
    tok = AutoTokenizer.from_pretrained(builtin_model_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_jsonl(path: Path, records: list[Any]) -> Path:
    """Write records (dicts as JSON, str/bytes as-is) one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for r in records:
            if isinstance(r, bytes):
                f.write(r + b"\n")
            elif isinstance(r, str):
                f.write(r.encode() + b"\n")
            else:
                f.write(json.dumps(r).encode() + b"\n")
    return path


def chat(user: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


@pytest.fixture
def make_project(tmp_path: Path) -> Callable[..., Path]:
    """A project root in a temp dir with a config.json (defaults + overrides); returns the config path."""

    def make(base_model: str | Path, root: Path | None = None, **overrides: Any) -> Path:
        root = root or tmp_path / "project"
        root.mkdir(parents=True, exist_ok=True)
        data: dict[str, Any] = {
            "base_model": str(base_model),
            "load_in_4bit": False,
            "eval_steps": 2,
            "save_steps": 3,
            "paths": {"root": str(root), "model_cache": str(MODEL_CACHE)},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "training": {"batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
                         "warmup_steps": 0, "max_seq_length": 256, "gradient_checkpointing": False,
                         "device": "cpu"},
            "data": {"heldout_fraction": 0.2, "heldout_max_per_file": 4},
            "eval": {"max_prompts": 4, "max_new_tokens": 8, "batch_size": 4},
            "status": {"interval_seconds": 0.5},
        }
        for key, value in overrides.items():
            node = data
            parts = key.split("__")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = value
        path = root / "config.json"
        path.write_text(json.dumps(data, indent=2))
        return path

    return make


def run_train(config_path: Path, *files: Path, extra: list[str] | None = None, timeout: float = 600,
              **popen: Any) -> subprocess.CompletedProcess:
    """Run the real train.py CLI in a subprocess."""
    cmd = [sys.executable, str(REPO / "train.py"), *map(str, files), "--config", str(config_path), *(extra or [])]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, **popen)


def spawn_train(config_path: Path, *files: Path) -> subprocess.Popen:
    """Start the real train.py CLI in the background (for tests that signal or kill it)."""
    cmd = [sys.executable, str(REPO / "train.py"), *map(str, files), "--config", str(config_path)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
