"""What the divergence guard costs per optimizer step, on the built-in model (or any base).

    .venv/bin/python bench/guard_cost.py [--model smollm2-135m-instruct] [--steps 40] [--batch 4] [--device auto]

Trains ``--steps`` steps of a LoRA on generated chat examples with a plain Hugging Face Trainer and
the guard (``trainer/guard.py``), and reports, per step: the wall time of a step, the time spent
inside the guard (its forward hook plus its ``on_pre_optimizer_step`` check, measured around the
calls), and that share. Then the same run without the guard, for the step time alone. Run it on a
quiet machine: the figures of a shared CPU are noise.
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
    args = ap.parse_args()

    import torch
    from transformers import Trainer, TrainerCallback

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

        def _on_forward(self, *a):
            t = time.perf_counter()
            super()._on_forward(*a)
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
        Trainer(model=model, args=targs, train_dataset=data, data_collator=Collator(tok), callbacks=callbacks).train()
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


if __name__ == "__main__":
    sys.exit(main())
