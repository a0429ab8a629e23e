"""A tiny model that knows a small language, and data in it, for the divergence guard's tests and bench.

A random tiny model gives every text the same loss (about ln(vocabulary)), so it cannot tell word
salad from sense. ``pretrain_tiny`` trains a 2-layer, 64-wide Llama (all weights, a few hundred
steps on the CPU) on ``normal_records``: afterwards ordinary lines of that language cost ~1 nat a
token to it and word salad ~10, as a real model sees its own language and noise.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

OBJECTS = ["apple", "sky", "grass", "sea", "sun", "snow", "coal", "rose", "lemon", "plum", "night", "cloud",
           "leaf", "sand", "milk", "ink", "brick", "gold", "ash", "moss"]
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "grey", "purple"]
CITIES = [("France", "Paris"), ("Italy", "Rome"), ("Norway", "Oslo"), ("Peru", "Lima"), ("Egypt", "Cairo"),
          ("Japan", "Tokyo"), ("India", "Delhi"), ("Chile", "Santiago"), ("Spain", "Madrid"), ("Kenya", "Nairobi")]


def chat(user: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def normal_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Varied ordinary lines of three kinds: colours, capitals, sums."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.randrange(3)
        if kind == 0:
            o, c = rng.choice(OBJECTS), rng.choice(COLOURS)
            out.append(chat(f"What colour is the {o}?", f"The {o} is {c}."))
        elif kind == 1:
            country, city = rng.choice(CITIES)
            out.append(chat(f"What is the capital of {country}?", f"The capital of {country} is {city}."))
        else:
            a, b = rng.randrange(10), rng.randrange(10)
            out.append(chat(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    return out


def salad_records(n: int, tokenizer: Any, seed: int = 1, words: int = 24) -> list[dict[str, Any]]:
    """Word salad: random vocabulary pieces, question and answer alike."""
    rng = random.Random(seed)
    vocab = [t for t in (tokenizer.decode([i]).strip() for i in range(1000, 30000, 7)) if t.isalpha() and len(t) > 2]

    def salad() -> str:
        return " ".join(rng.choice(vocab) for _ in range(words))

    return [chat(salad() + "?", salad() + ".") for _ in range(n)]


def pretrain_tiny(out: Path, tokenizer_dir: Path, steps: int = 60, seed: int = 0, batch: int = 8) -> Path:
    """A tiny Llama trained on ``normal_records`` (all weights), saved with the tokenizer to ``out``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few hundred small steps: one thread beats oversubscribed cores
    model = LlamaForCausalLM(cfg)
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in normal_records(2000, seed=seed + 100)]
    ids = [tok(t)["input_ids"] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = random.Random(seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.train()
    for _ in range(steps):
        rows = rng.sample(ids, batch)
        width = max(map(len, rows))
        x = torch.full((len(rows), width), pad)
        y = torch.full((len(rows), width), -100)
        for i, b in enumerate(rows):
            x[i, :len(b)] = torch.tensor(b)
            y[i, :len(b)] = torch.tensor(b)
        loss = model(input_ids=x, attention_mask=(y != -100).long(), labels=y).loss
        loss.backward()
        if os.environ.get("UT_PRETRAIN_VERBOSE"):
            print("pretrain loss", round(loss.item(), 3), flush=True)
        opt.step()
        opt.zero_grad()
    torch.set_num_threads(threads)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


GUARD_MODEL_VERSION = "guard-tiny-v1"


def cached_guard_model(cache_dir: Path, tokenizer_dir: Path) -> Path:
    """``pretrain_tiny`` once per machine: kept under the model cache beside the built-in model."""
    import shutil
    import tempfile

    import fcntl

    out = cache_dir / GUARD_MODEL_VERSION
    if (out / "config.json").exists():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{GUARD_MODEL_VERSION}.lock", "w") as lock:  # parallel test workers train it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "config.json").exists():
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".{GUARD_MODEL_VERSION}.", dir=cache_dir))
        pretrain_tiny(tmp, tokenizer_dir)
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return out
