#!/usr/bin/env python3
"""train.py against TRL's SFTTrainer, same data, model and settings, in one run.

    python bench/train_vs_trl.py [--examples 120] [--batch 8] [--max-len 1024]

- **Data**: chat examples shaped like Alpaca (written by the bench, seeded): a short question, an
  answer of lognormal length (median ~170 tokens with the chat template, a long tail past 1,000).
- **Model**: the built-in SmolLM2-135M-Instruct, fp32 base on the CPU, LoRA r16 / alpha 32 on all
  seven projections, no dropout, batch 8, lr 2e-4, no gradient checkpointing, one epoch over the
  same examples, same maximum length.
- **TRL**: ``SFTTrainer`` with a ``peft_config`` and TRL's defaults otherwise (no packing, padding to
  the longest in each batch), in a throwaway venv ``.bench-venv/`` (gitignored) that sees the
  project's ``.venv`` packages and adds ``trl`` pinned below, installed with ``--no-deps`` so it can
  never replace torch or transformers. TRL never enters the project's requirements.
- **train.py**: the real CLI with the project's defaults (``training.packing=auto``, chunked loss).

Printed per trainer: optimizer steps, seconds per step, non-padding tokens per second (trained
tokens over training time, model loading excluded), and the loss of each final adapter on the same
32 held-back examples (assistant tokens only, the same code for both), then the tokens/s ratio.
Both train 8 examples a step (train.py: one padding-free row of 8 examples), so both make the same
number of optimizer updates; compare tokens/s and the held-out loss.
About 10 minutes on a 2-core CPU at the defaults.
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
TRL_VERSION = "1.16.0"
VENV = REPO / ".bench-venv"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_data(path: Path, n: int, seed: int) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    words = ("the of and to a in is that for it as with was on be by this are or from at an which have not "
             "river stone cloud paper light orbit maple copper signal garden method result value system "
             "model answer question because however therefore example process data time number").split()
    with open(path, "w") as f:
        for _ in range(n):
            q = " ".join(rng.choice(words, int(np.clip(rng.lognormal(np.log(18), 0.6), 4, 200))))
            a = " ".join(rng.choice(words, int(np.clip(rng.lognormal(np.log(120), 0.9), 5, 1400))))
            f.write(json.dumps({"messages": [{"role": "user", "content": q.capitalize() + "?"},
                                             {"role": "assistant", "content": a.capitalize() + "."}]}) + "\n")


def ensure_venv() -> Path:
    """``.bench-venv`` with the project's packages visible and trl added (no dependency resolution)."""
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(VENV)], check=True)
        site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        ours = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        Path(site, "project-venv.pth").write_text(ours + "\n")
    check = subprocess.run([str(py), "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
    if check.stdout.strip() != TRL_VERSION:
        site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site,
                        f"trl=={TRL_VERSION}"], check=True)
    return py


def trl_worker(data: Path, out: Path, batch: int, max_len: int) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from ultimate_trainer.core import config
    from ultimate_trainer.model.loading import resolve_base

    base = resolve_base(config.load(None, [f"paths.model_cache={REPO / 'models' / 'cache'}",
                                           "base_model=smollm2-135m-instruct"]))
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)

    class Clock(TrainerCallback):
        start = None

        def on_train_begin(self, *a, **k):
            self.start = time.perf_counter()

    clock = Clock()
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=batch, num_train_epochs=1, learning_rate=2e-4,
                     lr_scheduler_type="constant", warmup_steps=0, max_length=max_len, logging_steps=1,
                     save_strategy="no", report_to="none", use_cpu=True, seed=42, gradient_checkpointing=False,
                     include_num_input_tokens_seen="non_padding", disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, processing_class=tok, callbacks=[clock],
                         train_dataset=load_dataset("json", data_files=str(data), split="train"),
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                                task_type="CAUSAL_LM"))
    trainer.train()
    seconds = time.perf_counter() - clock.start
    trainer.model.save_pretrained(str(out / "adapter"))
    steps = trainer.state.global_step
    return {"steps": steps, "seconds": seconds, "tokens": int(trainer.state.num_input_tokens_seen),
            "adapter": str(out / "adapter")}


def project_run(data: Path, root: Path, batch: int, max_len: int) -> dict:
    sets = ["base_model=smollm2-135m-instruct", "load_in_4bit=false", f"paths.root={root}",
            f"paths.model_cache={REPO / 'models' / 'cache'}", "lora.r=16", "lora.alpha=32", "lora.dropout=0.0",
            f"training.batch_size={batch}", "training.gradient_accumulation_steps=1", "training.learning_rate=2e-4",
            "training.lr_scheduler=constant", "training.gradient_checkpointing=false", "training.warmup_steps=0",
            f"training.max_seq_length={max_len}", "data.overlong=truncate", "eval_steps=0", "save_steps=100000",
            "data.heldout_fraction=0.0", "training.device=cpu", "training.rehearsal_fraction=0",
            "training.replay_fraction=0"]
    cmd = [sys.executable, str(REPO / "train.py"), str(data), "--config", str(REPO / "config.json")]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    from ultimate_trainer.core import checkpoints as ck

    steps = [json.loads(x) for x in (root / "status/history/steps.jsonl").read_text().splitlines()]
    status = json.loads((root / "status/training_status.json").read_text())
    final = ck.newest_complete(root / "checkpoints")
    # Seconds: from the trainer's own clock in trainer_state.json (train_runtime), model loading excluded.
    state = json.loads((final.path / "trainer_state.json").read_text())
    return {"steps": final.global_step, "seconds": None, "tokens": int(state.get("num_input_tokens_seen") or 0),
            "adapter": str(final.path), "tokens_per_second_status": status.get("tokens_per_second"),
            "first": steps[0]["time"], "last": steps[-1]["time"]}


def eval_loss(adapter: str, data: Path, max_len: int) -> float:
    """Assistant-token loss of base + ``adapter`` on ``data`` (the project's encoding and loss)."""
    import torch
    from peft import PeftModel

    from ultimate_trainer.core import config
    from ultimate_trainer.data import prepare as data_mod
    from ultimate_trainer.data.collate import Collator
    from ultimate_trainer.model.loading import load_tokenizer, resolve_base
    from ultimate_trainer.model.scoring import validation_loss

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config.load(None, [f"paths.model_cache={REPO / 'models' / 'cache'}", "base_model=smollm2-135m-instruct",
                                 f"training.max_seq_length={max_len}", "data.overlong=truncate",
                                 "data.heldout_fraction=0.0"])
        base = resolve_base(cfg)
        tok = load_tokenizer(base)
        store = data_mod.prepare([data], tok, cfg, Path(tmp) / "s", None).train
        from transformers import AutoModelForCausalLM

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
        encoded = [(store[i]["input_ids"], store[i]["labels"]) for i in range(len(store))]
        return float(validation_loss(model.eval(), encoded, 4, Collator(tok)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=120)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=1024, help="TRL's default max_length (2,048: 24 GB is not enough)")
    ap.add_argument("--worker", choices=["trl", "eval"], help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker == "trl":
        print(json.dumps(trl_worker(args.data, args.out, args.batch, args.max_len)))
        return 0
    if args.worker == "eval":
        print(json.dumps({"loss": eval_loss(str(args.out), args.data, args.max_len)}))
        return 0

    py = ensure_venv()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, held = tmp / "train.jsonl", tmp / "held.jsonl"
        make_data(train, args.examples, seed=0)
        make_data(held, 32, seed=1)
        common = ["--batch", str(args.batch), "--max-len", str(args.max_len), "--data", str(train)]
        out = subprocess.run([str(py), __file__, "--worker", "trl", "--out", str(tmp / "trl"), *common],
                             check=True, capture_output=True, text=True)
        trl = json.loads(out.stdout.strip().splitlines()[-1])
        ours = project_run(train, tmp / "project", args.batch, args.max_len)
        state = json.loads((Path(ours["adapter"]) / "trainer_state.json").read_text())
        # Every logged step carries the run's time so far: the last one is the whole run's.
        ours["seconds"] = max((h["train_runtime"] for h in state.get("log_history", []) if "train_runtime" in h),
                              default=None)
        if ours["seconds"] is None:  # fall back on the step log's clock (1 s resolution)
            from datetime import datetime

            t0, t1 = (datetime.fromisoformat(ours[k]) for k in ("first", "last"))
            ours["seconds"] = max(1.0, (t1 - t0).total_seconds())
        for name, r in (("TRL", trl), ("train.py", ours)):  # the timings, before anything else can fail
            print(f"{name}: {r['steps']} steps, {r['seconds']:.1f} s, {r['tokens']} non-padding tokens", flush=True)
        for r in (trl, ours):
            cmd = [sys.executable, __file__, "--worker", "eval", "--out", r["adapter"], "--data", str(held),
                   "--max-len", str(args.max_len)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.stderr.write(done.stderr[-3000:])
            r["loss"] = json.loads(done.stdout.strip().splitlines()[-1])["loss"] if done.returncode == 0 else float("nan")
    print(f"{args.examples} Alpaca-shaped examples, SmolLM2-135M fp32 + LoRA r16 (7 projections), batch {args.batch}, "
          f"max length {args.max_len}, {os.cpu_count()} cores")
    print(f"{'trainer':22} {'steps':>6} {'s/step':>8} {'train s':>8} {'tok/s (non-pad)':>16} {'held-out loss':>14}")
    rates = {}
    for name, r in ((f"TRL {TRL_VERSION} SFTTrainer", trl), ("train.py", ours)):
        rates[name] = r["tokens"] / r["seconds"]
        print(f"{name:22} {r['steps']:6d} {r['seconds'] / max(1, r['steps']):8.2f} {r['seconds']:8.1f} "
              f"{rates[name]:16.1f} {r['loss']:14.4f}")
    print(f"train.py / TRL tokens/s: {rates['train.py'] / rates[f'TRL {TRL_VERSION} SFTTrainer']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
