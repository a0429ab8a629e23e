"""Shared fixtures: the built-in model's cache, a tiny random model with a real chat template, projects.

Unit tests train tiny randomly initialised Llama models built from a config (no download); a few
end-to-end tests (marked ``e2e``) use the real built-in SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "artifacts"  # screenshots of the browser tests
CHROMIUM = Path("/usr/bin/chromium")  # Debian's; Playwright drives it (it cannot download its own here)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# Parallel workers (pytest-xdist, pytest.ini's ``-n``) each keep to one OpenMP thread, and so do the trainers
# they start: two 2-thread processes on 2 cores spin at each other's barriers (core/threads.py), one thread
# each shares the cores fairly. Set before torch is imported; a user's own OMP_NUM_THREADS wins.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
if str(REPO) not in sys.path:  # `pytest` (unlike `python -m pytest`) does not put the repository root there
    sys.path.insert(0, str(REPO))

from ultimate_trainer.core import config  # noqa: E402
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


# Qwen2.5-7B-Instruct's distinguishing traits (its config.json), kept by the tiny Qwen2 below.
QWEN_VOCAB = 152064  # the output layer's rows (the tokenizer has fewer: padded for the GPU, like Qwen's)
QWEN_ROPE_THETA = 1e6


def tiny_qwen2_config(tok: Any, layers: int = 2) -> Any:
    """A tiny Qwen2: q/k/v biases, 7:1 grouped-query heads (7B: 28:4), untied embeddings, rope theta 1e6,
    the 152,064-row output layer; only the width and depth are small."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=QWEN_VOCAB, hidden_size=56, intermediate_size=112, num_hidden_layers=layers,
                       num_attention_heads=7, num_key_value_heads=1, max_position_embeddings=1024,
                       tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": QWEN_ROPE_THETA},
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


@pytest.fixture(scope="session")
def qwen2_model_dir(tmp_path_factory: pytest.TempPathFactory, builtin_model_dir: Path) -> Path:
    """A tiny random Qwen2 (``tiny_qwen2_config``) with a ChatML tokenizer (the built-in model's)."""
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("tiny-qwen2")
    tok = AutoTokenizer.from_pretrained(builtin_model_dir)
    torch.manual_seed(0)
    Qwen2ForCausalLM(tiny_qwen2_config(tok)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(params=["llama", "qwen2"])
def arch_model_dir(request: pytest.FixtureRequest) -> Path:
    """The tiny Llama and the tiny Qwen2 in turn: what the built-in model goes through, at Qwen's architecture too."""
    return request.getfixturevalue("tiny_model_dir" if request.param == "llama" else "qwen2_model_dir")


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


def chat(user: str, answer: str, system: str | None = None, **extra: Any) -> dict[str, Any]:
    """One chat example (optionally with a system message and extra top-level fields)."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": msgs, **extra}


@functools.lru_cache(maxsize=1)
def smol_tokenizer() -> Any:
    """The built-in model's real tokenizer (and ChatML template), read from its GGUF, once per session."""
    from transformers import AutoTokenizer

    from ultimate_trainer.model.loading import builtin_gguf_path

    gguf = builtin_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def make_cfg(tmp_path: Path, **data: Any) -> config.Config:
    """A config rooted at tmp_path with ``data.*`` overrides and a short max length."""
    raw = {"paths": {"root": str(tmp_path)}, "data": data, "training": {"max_seq_length": 256},
           "eval": {"max_new_tokens": 16}}
    return config.from_dict(raw)


class UnstableTemplate:
    """A tokenizer whose template renders earlier turns differently once a later turn exists."""

    chat_template = "unstable"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        body = "".join(f"[{m['role']}:{m['content']}]" for m in messages)
        return f"<{len(messages)}>" + body + ("[assistant:" if add_generation_prompt else "")


def wait_for(predicate: Callable[[], bool], timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``predicate`` until it holds; fail when ``proc`` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def sigkill_when(proc: subprocess.Popen, predicate: Callable[[], bool], timeout: float = 120.0) -> None:
    """SIGKILL ``proc`` as soon as ``predicate()`` holds (a crash at a chosen point)."""
    try:
        wait_for(predicate, timeout=timeout, proc=proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def newest_step(checkpoints: Path) -> int:
    """Global step of the newest complete checkpoint under ``checkpoints`` (0 when none)."""
    from ultimate_trainer.core.checkpoints import newest_complete

    newest = newest_complete(checkpoints)
    return newest.global_step if newest else 0


def step_losses(root: Path, objective: bool = False) -> dict[int, float]:
    """Loss per global step of a project; a step logged again after a crash keeps its last line (docs/STATUS.md).

    ``objective``: the loss trained (``objective``, where it differed from the plain ``loss``)."""
    out = {}
    for line in (root / "status" / "history" / "steps.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["global_step"]] = rec.get("objective", rec["loss"]) if objective else rec["loss"]
    return out


def optimizer_step(ckpt: Path) -> float:
    """Adam's step counter in a checkpoint's optimizer state."""
    import torch

    state = torch.load(ckpt / "optimizer.pt", weights_only=False)["state"]
    return float(next(iter(state.values()))["step"])


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
                         "device": "cpu", "rehearsal_fraction": 0.0},  # tests/trainer/test_rehearsal.py turns it on
            "data": {"heldout_fraction": 0.2, "heldout_max_per_file": 4},
            "eval": {"max_prompts": 4, "max_new_tokens": 8, "batch_size": 4, "probe_max_new_tokens": 8},
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


def seed_rehearsal(config_path: Path, lines: list[dict[str, Any]]) -> Path:
    """Put ``lines`` where the project's runs find the base's rehearsal answers (none is generated then)."""
    from ultimate_trainer.trainer.rehearsal.prompts import cache_path, load_prompts
    from ultimate_trainer.model.loading import resolve_base

    cfg = config.load(str(config_path), [])
    return write_jsonl(cache_path(cfg, resolve_base(cfg), load_prompts(cfg)), lines)


def run_train(config_path: Path, *files: Path, extra: list[str] | None = None, timeout: float = 600,
              **popen: Any) -> subprocess.CompletedProcess:
    """Run the real train.py CLI in a subprocess."""
    cmd = [sys.executable, str(REPO / "train.py"), *map(str, files), "--config", str(config_path), *(extra or [])]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, **popen)


def spawn_train(config_path: Path, *files: Path) -> subprocess.Popen:
    """Start the real train.py CLI in the background (for tests that signal or kill it)."""
    cmd = [sys.executable, str(REPO / "train.py"), *map(str, files), "--config", str(config_path)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, driven by Playwright: one per test module (the browser tests)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()
