#!/usr/bin/env python3
"""Training tokens/s of the built-in model on this machine: LoRA and QLoRA, baseline beside project.

    python bench/train_throughput.py [--steps 24] [--batch 8] [--modes lora,qlora] [--packing on,off]

For each mode (LoRA on the fp32 base, QLoRA on the 4-bit NF4 base), in separate processes:

- baseline: a bare PEFT loop (forward, backward, AdamW step) over the same batches, no Trainer,
  no status files, no checkpoints: the floor of what this CPU can do;
- project: the real ``train.py`` CLI on the same examples (Trainer, status heartbeat, history,
  no evaluation), its tokens/s read from ``status/training_status.json`` (trained, non-padding
  tokens over the last logged steps; model loading excluded), once per ``training.packing`` value.

Both skip the first two steps (warm-up of the kernels) and count non-padding tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_data(path: Path, n: int) -> None:
    import random

    rng = random.Random(0)
    words = "alpha beta gamma delta river stone cloud paper light orbit maple copper signal garden".split()
    with open(path, "w") as f:
        for i in range(n):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(8, 16)))
            a = " ".join(rng.choice(words) for _ in range(rng.randint(6, 12)))
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")


def common_sets(batch: int, four_bit: bool, root: Path) -> list[str]:
    return ["base_model=smollm2-135m-instruct", f"load_in_4bit={'true' if four_bit else 'false'}",
            f"paths.root={root}", f"paths.model_cache={REPO / 'models' / 'cache'}",
            "lora.r=16", "lora.alpha=32", "lora.dropout=0.0", f"training.batch_size={batch}",
            "training.gradient_accumulation_steps=1", "training.gradient_checkpointing=false",
            "training.max_seq_length=256", "training.warmup_steps=0", "eval_steps=0", "save_steps=100000",
            "data.heldout_fraction=0.0", "training.device=cpu", "training.rehearsal_fraction=0",
            "training.replay_fraction=0"]


def baseline(data: Path, batch: int, steps: int, four_bit: bool) -> float:
    """A bare PEFT loop on the project's own tokenization of the same file."""
    import torch

    from ultimate_trainer.core import config
    from ultimate_trainer.data import prepare as data_mod
    from ultimate_trainer.data.collate import Collator
    from ultimate_trainer.model.loading import attach_lora, load_base_model, load_tokenizer, resolve_base

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config.load(None, common_sets(batch, four_bit, Path(tmp)))
        path = resolve_base(cfg)
        tok = load_tokenizer(path)
        prepared = data_mod.prepare([data], tok, cfg, Path(tmp) / "store", None)
        model = attach_lora(cfg, load_base_model(cfg, path, quantize=four_bit, device="cpu"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        collate = Collator(tok)
        model.train()
        tokens, t0 = 0, None
        for step in range(steps):
            if step == 2:
                tokens, t0 = 0, time.perf_counter()
            b = collate([prepared.train[(step * batch + i) % len(prepared.train)] for i in range(batch)])
            loss = model(**b).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
            opt.step()
            opt.zero_grad()
            tokens += int(b["attention_mask"].sum())
        return tokens / (time.perf_counter() - t0)


def project(data: Path, batch: int, steps: int, four_bit: bool, packing: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(REPO / "train.py"), str(data), "--config", str(REPO / "config.json"),
               "--max-steps", str(steps), "--set", f"training.packing={packing}"]
        for s in common_sets(batch, four_bit, Path(tmp)):
            cmd += ["--set", s]
        subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
        steps_log = [json.loads(x) for x in (Path(tmp) / "status/history/steps.jsonl").read_text().splitlines()]
        # tokens/s of the last logged step covers the window of the last 20 steps (warm-up excluded below).
        return float(steps_log[-1]["tokens_per_second"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--modes", default="lora,qlora")
    ap.add_argument("--packing", default="on,off", help="training.packing values to run train.py with")
    ap.add_argument("--worker", choices=["baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--four-bit", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker == "baseline":
        print(json.dumps({"tokens_per_second": baseline(args.data, args.batch, args.steps, args.four_bit)}))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "bench.jsonl"
        make_data(data, args.batch * (args.steps + 2))
        rows = []
        for mode in args.modes.split(","):
            four_bit = mode == "qlora"
            cmd = [sys.executable, __file__, "--worker", "baseline", "--data", str(data), "--batch", str(args.batch),
                   "--steps", str(args.steps)] + (["--four-bit"] if four_bit else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            base = json.loads(out)["tokens_per_second"]
            for packing in args.packing.split(","):
                rows.append((mode, packing, base, project(data, args.batch, args.steps, four_bit, packing)))
        print(f"built-in model (SmolLM2-135M-Instruct), batch {args.batch}, {args.steps} steps, {os.cpu_count()} cores")
        print(f"{'mode':8} {'packing':8} {'baseline tok/s (bare PEFT loop)':>32} {'project tok/s (train.py)':>26} "
              f"{'ratio':>7}")
        for mode, packing, base, proj in rows:
            print(f"{mode:8} {packing:8} {base:32.1f} {proj:26.1f} {proj / base:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
