#!/usr/bin/env python3
"""Peak memory of one training step at ``max_seq_length`` 2,048: the model's own loss vs the chunked loss.

    python bench/loss_memory.py [--seq 2048] [--batch 1] [--vocabs 49152,152064]

Each cell is a fresh subprocess (peak RSS is per process) that builds the built-in model's
architecture (SmolLM2-135M: 30 layers, hidden 576) with random weights and the given vocabulary
size (49,152 is its own; 152,064 is Qwen2.5's), fp32 on the CPU, attaches LoRA r16 on all seven
projections, and runs one forward + backward of ``batch`` rows of ``seq`` tokens, every token a
target (the worst case for the logits). It reports peak RSS (``getrusage``), the RSS before the
step (model loaded) and the step's seconds. Takes 1-3 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def worker(vocab: int, seq: int, batch: int, chunked: bool) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from ultimate_trainer.model.loss import chunked_causal_lm_loss

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=max(8192, seq),
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM"))
    model.train()
    ids = torch.randint(0, vocab, (batch, seq))
    inputs = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    before = rss_mb()
    t0 = time.perf_counter()
    loss = chunked_causal_lm_loss(model, inputs) if chunked else model(**inputs).loss
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"loss": float(loss), "rss_before_mb": round(before), "peak_mb": round(peak), "seconds": round(seconds, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--vocabs", default="49152,152064")
    ap.add_argument("--worker", choices=["plain", "chunked"], help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.vocab, args.seq, args.batch, args.worker == "chunked")))
        return 0
    rows = []
    for vocab in (int(v) for v in args.vocabs.split(",")):
        for kind in ("plain", "chunked"):
            cmd = [sys.executable, __file__, "--worker", kind, "--vocab", str(vocab), "--seq", str(args.seq),
                   "--batch", str(args.batch)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ})
            rows.append((vocab, kind, json.loads(out.stdout.strip().splitlines()[-1])))
    print(f"one LoRA training step, SmolLM2-135M shape, fp32 CPU, batch {args.batch} x {args.seq} tokens, "
          f"{os.cpu_count()} cores")
    print(f"{'vocab':>7} {'loss':8} {'RSS before MB':>14} {'peak RSS MB':>12} {'step-only MB':>13} {'seconds':>8} "
          f"{'loss value':>11}")
    for vocab, kind, r in rows:
        print(f"{vocab:7d} {kind:8} {r['rss_before_mb']:14d} {r['peak_mb']:12d} {r['peak_mb'] - r['rss_before_mb']:13d} "
              f"{r['seconds']:8.1f} {r['loss']:11.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
