"""One rank of the guard's two-process test (tests/trainer/test_guard.py), run by torchrun.

    torchrun --nproc-per-node=2 tests/_guard_ranks.py MODEL_DIR OUT_DIR poisoned|never

Five steps of one example per rank (rank r trains the examples at 2*step + r). ``poisoned``: rank 1's
example of step 3 is word salad, which only rank 1 sees; ``never``: step 3 is left out, both
ranks' examples. Each rank saves its adapter, its optimizer state and the losses it saw itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import torch
    from transformers import AutoTokenizer

    from _guard_helpers import normal_records, salad_records
    from ultimate_trainer.core import config
    from ultimate_trainer.data.collate import Collator
    from ultimate_trainer.model.loading import attach_lora, load_base_model
    from ultimate_trainer.trainer import hf
    from ultimate_trainer.trainer.distributed import World
    from ultimate_trainer.trainer.guard import GuardCallback
    from ultimate_trainer.trainer.reporter import StatusReporter

    model_dir, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    world = World.from_env()
    cfg = config.from_dict({
        "paths": {"root": str(out)}, "load_in_4bit": False, "save_steps": 1000,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training": {"batch_size": 1, "gradient_accumulation_steps": 1, "learning_rate": 1e-2, "warmup_steps": 0,
                     "lr_scheduler": "constant", "max_seq_length": 128, "gradient_checkpointing": False,
                     "device": "cpu", "chunked_loss": False},
        "guard": {"min_history": 2, "min_run_steps": 2}})
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in normal_records(10, seed=3)]
    salad = tok.apply_chat_template(salad_records(1, tok)[0]["messages"], tokenize=False)
    if mode == "poisoned":
        texts[2 * 2 + 1] = salad  # step 3 (0-based 2), rank 1
    else:
        del texts[4:6]  # step 3, both ranks
    data = [{"input_ids": tok.encode(t), "labels": tok.encode(t)} for t in texts]
    torch.manual_seed(0)
    model = attach_lora(cfg, load_base_model(cfg, str(model_dir), quantize=False, device="cpu"))
    reporter = StatusReporter(out / "status", out / "ckpt", 60, 0, live=world.is_main)
    described = lambda step: {"files": ["t.jsonl"], "examples": []}  # noqa: E731
    args = hf.training_arguments(cfg, out / "trainer", len(data) // world.size, "cpu", torch.float32, world.size)
    guard = GuardCallback(cfg.guard, reporter, described, "run", world=world)
    seen: list[float] = []
    trainer = hf.ContinuousTrainer(model=model, args=args, train_dataset=data, data_collator=Collator(tok),
                                   callbacks=[guard], cfg=cfg,
                                   loss_observers=[lambda loss: seen.append(float(loss)), guard.observe_loss])
    trainer.train()
    opt = trainer.optimizer
    opt = getattr(opt, "optimizer", opt)
    state = [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
             for g in opt.param_groups for p in g["params"] if p in opt.state]
    torch.save({"adapter": {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k},
                "optimizer": state, "seen": seen, "skipped": sorted(guard.skipped)},
               out / f"rank{world.rank}.pt")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
