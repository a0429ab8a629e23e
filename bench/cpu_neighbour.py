#!/usr/bin/env python3
"""Seconds per training step alone and next to a busy neighbour, before and after the thread policy.

    python bench/cpu_neighbour.py [--steps 8] [--batch 8] [--tokens 60]

Four cells, each a fresh trainer subprocess running LoRA steps (forward, backward, AdamW) on the
built-in model's architecture (SmolLM2-135M shape, random weights, fp32), ``batch`` x ``tokens``
like the demo:

- policy **before**: OpenMP's defaults (one thread per core, spinning waits);
- policy **after**: passive OpenMP waits plus the trainer's ``ThreadGovernor``, which sets the
  thread count to the cores other processes leave free, re-measured every 2 s;
- policy **governor**: the ``ThreadGovernor`` alone, with OpenMP's default (spinning) waits: what
  ``train.py`` does (``core/threads.py``);
- **alone**, or **with a neighbour**: a single-threaded ``numpy`` matmul loop busy on one core for
  the whole measurement.

It prints the median seconds per step (first two steps skipped) and the slowdown each policy suffers
from the neighbour; the goal is a slowdown in proportion to the CPU lost (about 2x on 2 cores),
not 10-25x. A few minutes on a 2-core CPU; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NEIGHBOUR = ("import numpy as np\n"
             "a = np.random.rand(600, 600)\n"
             "while True:\n"
             "    a = (a @ a) / 600.0\n")


def worker(policy: str, steps: int, batch: int, tokens: int) -> dict:
    if policy == "after":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # passive waits + the governor
    elif policy == "governor":
        os.environ.pop("OMP_WAIT_POLICY", None)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    governor = None
    if policy in ("after", "governor"):
        from ultimate_trainer.trainer.speed import ThreadGovernor

        governor = ThreadGovernor(interval=2.0)
        governor.on_train_begin(SimpleNamespace(use_cpu=True), None, None)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=16, lora_alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 49152, (batch, tokens))
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        if governor is not None:
            governor.on_step_end(None, None, None)
    return {"sec_per_step": statistics.median(times[2:]), "threads_at_end": torch.get_num_threads()}


def cell(policy: str, neighbour: bool, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS")}
    busy = None
    if neighbour:
        busy = subprocess.Popen([sys.executable, "-c", NEIGHBOUR],
                                env={**env, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        time.sleep(1.0)
    try:
        cmd = [sys.executable, __file__, "--worker", policy, "--steps", str(args.steps), "--batch", str(args.batch),
               "--tokens", str(args.tokens)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=60)
    ap.add_argument("--policies", default="before,after,governor")
    ap.add_argument("--worker", choices=["before", "after", "governor"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch, args.tokens)))
        return 0
    policies = args.policies.split(",")
    results = {(p, n): cell(p, n, args) for p in policies for n in (False, True)}
    print(f"LoRA steps, SmolLM2-135M shape (random), fp32, batch {args.batch} x {args.tokens} tokens, "
          f"{os.cpu_count()} cores; median of {args.steps} steps")
    print(f"{'policy':8} {'alone s/step':>13} {'neighbour s/step':>17} {'slowdown':>9} {'threads (alone/nb)':>19}")
    for p in policies:
        a, n = results[(p, False)], results[(p, True)]
        print(f"{p:8} {a['sec_per_step']:13.2f} {n['sec_per_step']:17.2f} {n['sec_per_step'] / a['sec_per_step']:8.1f}x "
              f"{a['threads_at_end']:>9}/{n['threads_at_end']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
