"""The Hugging Face Trainer wiring for one run: arguments, the continuous-training trainer, callbacks.

- ``ContinuousTrainer`` seals every checkpoint (fsync, then the ``ut_checkpoint.json`` marker) and
  reports the ``saving`` state around it.
- ``RunCallback`` keeps ``training_status.json`` and ``history/steps.jsonl`` current, turns a stop
  request into "save, then stop" and makes sure the run's last step is saved.
- ``EvalCallback`` answers the held-out prompts every ``eval_steps`` and records the scores.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, TrainerControl, TrainerState

from ultimate_trainer.core import checkpoints as ck
from ultimate_trainer.core import lineage
from ultimate_trainer.core.times import now_iso
from ultimate_trainer.model import scoring as evaluation
from ultimate_trainer.core.config import Config
from ultimate_trainer.trainer.reporter import StatusReporter, Throughput

log = logging.getLogger(__name__)


class ContinuousTrainer(Trainer):
    """A Trainer whose checkpoints are complete-or-absent and self-describing."""

    def __init__(self, *args: Any, reporter: StatusReporter, checkpoint_meta: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.reporter = reporter
        self.checkpoint_meta = checkpoint_meta  # callable(global_step) -> dict for the marker

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        previous = self.reporter.data["state"]
        self.reporter.set_state("saving")
        super()._save_checkpoint(model, trial)
        path = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        ck.mark_complete(path, self.checkpoint_meta(self.state.global_step))
        self.reporter.refresh_checkpoints()
        self.reporter.set_state(previous if previous != "saving" else "training")
        log.info("saved %s", path.name)


class RunCallback(TrainerCallback):
    def __init__(self, reporter: StatusReporter, stop: Any, start_step: int, done_steps: int, total_steps: int,
                 steps_per_epoch: int, files: list[str], run_id: str):
        self.reporter, self.stop = reporter, stop
        self.start_step, self.done_steps, self.total_steps = start_step, done_steps, total_steps
        self.steps_per_epoch, self.files, self.run_id = steps_per_epoch, files, run_id
        self.throughput = Throughput()
        self.t0 = time.monotonic()

    def run_step(self, state: TrainerState) -> int:
        return self.done_steps + state.global_step - self.start_step

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self.t0 = time.monotonic()
        self.throughput.add(state.num_input_tokens_seen or 0)
        self.reporter.set_state("training", global_step=state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        steps_this_call = state.global_step - self.start_step
        left = state.max_steps - state.global_step
        elapsed = time.monotonic() - self.t0
        self.reporter.update(
            global_step=state.global_step,
            run_step=self.run_step(state),
            epoch=round(self.run_step(state) / self.steps_per_epoch, 4),
            eta_seconds=round(elapsed / steps_this_call * left, 1) if steps_this_call else None,
        )
        if state.global_step >= state.max_steps:
            control.should_save = True  # every run ends with a checkpoint
        if self.stop.requested:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kw: Any):
        logs = logs or {}
        if "loss" not in logs:
            return
        tps = self.throughput.add(state.num_input_tokens_seen or 0)
        fields = {
            "loss": logs.get("loss"),
            "learning_rate": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens_per_second": round(tps, 1) if tps else self.reporter.data.get("tokens_per_second"),
        }
        self.reporter.update(**fields)
        log.info("step %d (run %d/%d) loss %.4f lr %.3g grad_norm %s tok/s %s", state.global_step,
                 self.run_step(state), self.total_steps, fields["loss"], fields["learning_rate"] or 0.0,
                 None if fields["grad_norm"] is None else round(fields["grad_norm"], 3), fields["tokens_per_second"])
        self.reporter.log_step({"global_step": state.global_step, "run_id": self.run_id,
                                "epoch": round(self.run_step(state) / self.steps_per_epoch, 4),
                                "files": self.files, **fields})


VAL_LOSS_PER_PROMPT = 4


def interleave_by_file(examples: list[Any], limit: int) -> list[Any]:
    """Up to ``limit`` examples taken round-robin across their files, so every file is asked."""
    by_file: dict[str, list[Any]] = {}
    for ex in examples:
        by_file.setdefault(ex.source.rsplit(":", 1)[0], []).append(ex)
    out: list[Any] = []
    queues = list(by_file.values())
    while len(out) < limit and any(queues):
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop(0))
    return out


class EvalCallback(TrainerCallback):
    """Greedy answers to the held-out prompts, scored, every ``eval_steps`` (and once at the very start)."""

    def __init__(self, cfg: Config, reporter: StatusReporter, tokenizer: Any, heldout: list[Any],
                 heldout_encoded: list[Any], collator: Any, tracker: Any, run_id: str, stop: Any,
                 throughput: Throughput | None = None):
        self.cfg, self.reporter, self.tokenizer = cfg, reporter, tokenizer
        self.heldout = interleave_by_file(heldout, cfg.eval.max_prompts)
        # Validation loss over an even sample, so that 64 files x 50 held-out lines stay cheap.
        cap = VAL_LOSS_PER_PROMPT * cfg.eval.max_prompts
        stride = max(1, -(-len(heldout_encoded) // cap))
        self.heldout_encoded, self.collator = heldout_encoded[::stride][:cap], collator
        self.tracker, self.run_id, self.stop = tracker, run_id, stop
        self.throughput = throughput
        self.model: Any = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, **kw: Any):
        self.model = model
        if self.cfg.eval.at_start and self.cfg.eval_steps and self.tracker.evaluations == 0 and self.heldout:
            self.evaluate(state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: Any = None, **kw: Any):
        every = self.cfg.eval_steps
        if every and state.global_step % every == 0 and not self.stop.requested:
            self.model = model or self.model
            self.evaluate(state.global_step)

    def evaluate(self, global_step: int) -> None:
        if not self.heldout and not self.heldout_encoded:
            return
        previous = self.reporter.data["state"]
        self.reporter.set_state("evaluating")
        t0 = time.monotonic()
        ev = self.cfg.eval
        answers = evaluation.generate_answers(self.model, self.tokenizer, [e.prompt_messages for e in self.heldout],
                                              ev.max_new_tokens, ev.batch_size)
        examples = []
        for ex, generated in zip(self.heldout, answers):
            correct = evaluation.score(ev.matcher, generated, ex.expected)
            examples.append({"global_step": global_step, "prompt": ex.prompt_text, "expected": ex.expected,
                             "generated": generated, "correct": correct, "matcher": ev.matcher, "source": ex.source,
                             "skill": getattr(ex, "skill", None)})
        val_loss = None
        if ev.val_loss and self.heldout_encoded:
            val_loss = evaluation.validation_loss(self.model, self.heldout_encoded, ev.batch_size, self.collator)
        self.tracker.add_evaluation([e["correct"] for e in examples])
        snap = self.tracker.snapshot()
        correct = sum(e["correct"] for e in examples)
        summary = {"global_step": global_step, "run_id": self.run_id, "correct": correct, "total": len(examples),
                   "accuracy": round(100.0 * correct / len(examples), 2) if examples else None,
                   "val_loss": val_loss, **{k: snap[k] for k in ("overall", "last_20", "last_50", "trend")}}
        self.reporter.log_evaluation(summary, examples)
        self.reporter.update(accuracy=snap, val_loss=val_loss if val_loss is not None else
                             self.reporter.data.get("val_loss"))
        self.reporter.set_state(previous if previous != "evaluating" else "training")
        if self.throughput is not None:
            self.throughput.exclude(time.monotonic() - t0)
        log.info("eval at step %d: %d/%d correct, overall %s%%, val_loss %s", global_step, correct,
                 len(examples), snap["overall"], None if val_loss is None else round(val_loss, 4))


def training_arguments(cfg: Config, output_dir: Path, max_steps: int, device: str, dtype: Any) -> TrainingArguments:
    import torch

    t = cfg.training
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm if t.max_grad_norm > 0 else 1e9,
        optim=t.optimizer,
        seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=None,  # every checkpoint is kept; pruning is an explicit daemon command
        eval_strategy="no",  # held-out evaluation is EvalCallback's job (generation + scoring)
        train_sampling_strategy="sequential",  # the run plan already ordered the examples
        ignore_data_skip=True,  # never fast-forward: the data of a new run is not the data of the last
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        report_to="none",
        use_cpu=device == "cpu",
        bf16=device == "cuda" and dtype == torch.bfloat16,
        fp16=device == "cuda" and dtype == torch.float16,
        disable_tqdm=not sys.stderr.isatty(),
        save_only_model=False,
    )


def _write_bootstrap(model: Any, directory: Path, global_step: int, args: TrainingArguments) -> Path:
    """A start folder for the Trainer after a consolidation: the fresh adapter and the global step only.

    With no optimizer/scheduler files in it, the Trainer starts those afresh (warm-up included).
    """
    import shutil

    from transformers.trainer_callback import TrainerState

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    model.save_pretrained(str(directory))
    state = TrainerState(global_step=global_step, train_batch_size=args.per_device_train_batch_size,
                         logging_steps=args.logging_steps, save_steps=args.save_steps, eval_steps=args.save_steps,
                         stateful_callbacks=[TrainerControl()])
    state.save_to_json(str(directory / "trainer_state.json"))
    return directory


def build_and_train(cfg: Config, *, files: list[Path], prepared: Any, tokenizer: Any, base_path: str,
                    start: ck.StartPoint, plan: Any, steps_now: int, hashes: list[str],
                    reporter: StatusReporter, stop: Any) -> None:
    """Load the model and adapter for ``start``, then train ``steps_now`` steps of ``plan``."""
    import torch

    from ultimate_trainer.data.prepare import Collator
    from ultimate_trainer.model.loading import attach_lora, compute_dtype, load_base_model, pick_device

    device = pick_device(cfg)
    dtype = compute_dtype(cfg, device)
    reporter.set_state("loading", device=device)
    model = load_base_model(cfg, base_path, quantize=cfg.load_in_4bit, device=device)
    resume_dir: Path | None = None
    if start.kind == "checkpoint":
        model = attach_lora(cfg, model, adapter_dir=str(start.checkpoint.path))
        resume_dir = start.checkpoint.path
    else:
        torch.manual_seed(cfg.training.seed)  # the fresh adapter's init is reproducible
        model = attach_lora(cfg, model)
    stop.check()

    collator = Collator(tokenizer)
    tracker = evaluation.AccuracyTracker.from_history(
        cfg.path("status") / "history" / "examples.jsonl", cfg.path("status") / "history" / "evals.jsonl",
        margin_last_20=cfg.eval.margin_last_20, margin_last_50=cfg.eval.margin_last_50,
        margin_trend=cfg.eval.margin_trend)
    reporter.update(accuracy=tracker.snapshot())
    file_entries = lineage.run_files(files, prepared.reports, now_iso())  # what train.py --lineage reads
    parent = {"kind": start.kind, "name": (start.consolidation.path.name if start.consolidation else
                                           start.checkpoint.name if start.checkpoint else None)}

    def checkpoint_meta(global_step: int) -> dict[str, Any]:
        run_step = plan.done_steps + global_step - start.global_step
        return {"global_step": global_step, "run_id": plan.run_id, "run_step": run_step,
                "run_total_steps": plan.total_steps, "run_complete": run_step >= plan.total_steps,
                "files": file_entries, "run_started_at": file_entries[0]["trained_at"] if file_entries else None,
                "parent": parent, "base_model": str(base_path), "base_model_name": cfg.base_model,
                "load_in_4bit": cfg.load_in_4bit, "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha}}

    names = [f.name for f in files]
    run_cb = RunCallback(reporter, stop, start.global_step, plan.done_steps, plan.total_steps,
                         plan.steps_per_epoch, names, plan.run_id)
    eval_cb = EvalCallback(cfg, reporter, tokenizer, prepared.heldout, prepared.heldout_encoded, collator,
                           tracker, plan.run_id, stop, run_cb.throughput)
    args = training_arguments(cfg, cfg.path("checkpoints"), start.global_step + steps_now, device, dtype)
    if start.kind != "checkpoint" and start.global_step > 0:
        resume_dir = _write_bootstrap(model, cfg.path("work") / "bootstrap", start.global_step, args)
    trainer = ContinuousTrainer(
        model=model, args=args, train_dataset=prepared.train.select(plan.remaining_order),
        data_collator=collator, processing_class=tokenizer, callbacks=[eval_cb, run_cb],
        reporter=reporter, checkpoint_meta=checkpoint_meta,
    )
    trainer.remove_callback(PrinterCallback)  # RunCallback logs each step in one readable line
    log.info("run %s: %d examples, steps %d..%d of the run (global %d -> %d), base %s",
             plan.run_id, len(prepared.train), plan.done_steps, plan.done_steps + steps_now,
             start.global_step, start.global_step + steps_now, base_path)
    trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
