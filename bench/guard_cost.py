"""What the divergence guard costs per optimizer step, on the built-in model (or any base).

    .venv/bin/python bench/guard_cost.py [--model smollm2-135m-instruct] [--steps 40] [--batch 4] [--device auto]
    .venv/bin/python bench/guard_cost.py --rules-only [--steps 2000]

Trains ``--steps`` steps of a LoRA on generated chat examples with a plain Hugging Face Trainer and
the guard (``trainer/guard.py``), and reports, per step: the wall time of a step, the time spent
inside the guard (its forward hook plus its ``on_pre_optimizer_step`` check, measured around the
calls), and that share. Then the same run without the guard, for the step time alone. Run it on a
quiet machine: the figures of a shared CPU are noise.

The guard sees each micro-batch's loss through the Trainer subclass's loss observers
(``hf.ContinuousTrainer``), as in training. ``--rules-only`` times the spike rules alone
(``stability.SpikeRule.judge`` + ``accept`` on a full 50-step window of mixed sources, with the
earlier runs' new-file levels), which is the guard's pure-Python part: no model, seconds to run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rules-only", action="store_true", help="time the spike rules alone, per step")
    args = ap.parse_args()
    if args.rules_only:
        return rules_only(args.steps)

    import torch
    from transformers import TrainerCallback

    from ultimate_trainer.core import config
    from ultimate_trainer.data.collate import Collator
    from ultimate_trainer.model.loading import attach_lora, compute_dtype, load_base_model, load_tokenizer, \
        pick_device, resolve_base
    from ultimate_trainer.trainer import hf
    from ultimate_trainer.trainer.guard import GuardCallback
    from ultimate_trainer.trainer.reporter import StatusReporter

    tmp = Path(tempfile.mkdtemp(prefix="guard-cost-"))
    cfg = config.from_dict({"base_model": args.model, "load_in_4bit": False, "save_steps": 10**6,
                            "paths": {"root": str(tmp), "model_cache": str(Path(__file__).resolve().parents[1]
                                                                             / "models" / "cache")},
                            "training": {"batch_size": args.batch, "gradient_accumulation_steps": 1,
                                         "warmup_steps": 0, "device": args.device, "max_seq_length": 256}})
    base = resolve_base(cfg)
    tok = load_tokenizer(base)
    device = pick_device(cfg)
    texts = [f"Question {i}: what is {i} plus {i}? Answer: {2 * i}." for i in range(args.steps * args.batch)]
    data = [{"input_ids": tok.encode(t), "labels": tok.encode(t)} for t in texts]

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.t, self.times = 0.0, []

        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t)

    class TimedGuard(GuardCallback):
        spent = 0.0

        def observe_loss(self, loss):
            t = time.perf_counter()
            super().observe_loss(loss)
            self.spent += time.perf_counter() - t

        def on_pre_optimizer_step(self, *a, **k):
            t = time.perf_counter()
            super().on_pre_optimizer_step(*a, **k)
            self.spent += time.perf_counter() - t

    def run(guarded: bool) -> tuple[list[float], float]:
        torch.manual_seed(0)
        model = attach_lora(cfg, load_base_model(cfg, base, quantize=False, device=device))
        clock = StepClock()
        callbacks = [clock]
        guard = None
        if guarded:
            guard = TimedGuard(cfg.guard, StatusReporter(tmp / "status", tmp / "ck", 60, 0, live=False),
                               lambda step: {"files": [], "examples": []}, "bench")
            callbacks.append(guard)
        targs = hf.training_arguments(cfg, tmp / "out", args.steps, device, compute_dtype(cfg, device))
        hf.ContinuousTrainer(model=model, args=targs, train_dataset=data, data_collator=Collator(tok), callbacks=callbacks,
                             cfg=cfg, loss_observers=[guard.observe_loss] if guard else []).train()
        return clock.times[3:], (guard.spent if guard else 0.0)  # the first steps warm up

    with_guard, spent = run(True)
    without, _ = run(False)
    per_step_guard = spent / args.steps
    print(f"model {args.model} on {device}, batch {args.batch}, {args.steps} steps")
    print("| | median step (ms) |")
    print("|---|---|")
    print(f"| with guard | {1000 * statistics.median(with_guard):.1f} |")
    print(f"| without guard | {1000 * statistics.median(without):.1f} |")
    print(f"\ntime inside the guard: {1000 * per_step_guard:.2f} ms per step "
          f"({100 * per_step_guard / statistics.median(with_guard):.2f} % of a step)")
    return 0


def rules_only(steps: int) -> int:
    """Per step: judge + accept of the spike rules on a full window of mixed sources (no model)."""
    import random

    from ultimate_trainer.core import config
    from ultimate_trainer.trainer.stability import Observation, SpikeRule

    g = config.Config().guard
    rng = random.Random(0)

    def step() -> tuple[float, dict[str, float]]:
        share = rng.choice((0.0, 0.5, 0.7, 1.0))
        loss = share * rng.gauss(3.0, 0.2) + (1 - share) * rng.gauss(0.5, 0.05)
        return loss, {k: v for k, v in (("user", share), ("rehearsal", 1 - share)) if v}

    rule = SpikeRule(g.spike_k, g.window, g.min_history, g.min_run_steps, g.max_growth, chance=10.8,
                     new_file_growth=g.new_file_growth)
    rule.seed([Observation(*step()) for _ in range(g.window)], [3.0, 3.2, 2.9])
    wall, cpu = [], []  # CPU time too: on a shared machine the wall clock counts other processes' turns
    for _ in range(steps):
        loss, shares = step()
        t, c = time.perf_counter(), time.process_time()
        if rule.judge(loss, shares).kind is None:
            rule.accept(loss, shares)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    cpu_total = sum(cpu)
    print(f"spike rules, {steps} steps on a {g.window}-step window: wall median {1000 * statistics.median(wall):.3f} ms "
          f"a step; CPU {1000 * cpu_total / steps:.3f} ms a step on average")
    return 0


if __name__ == "__main__":
    sys.exit(main())
