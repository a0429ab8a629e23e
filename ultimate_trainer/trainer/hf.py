"""The Hugging Face Trainer wiring of a run: its ``TrainingArguments`` and callbacks.

Which callbacks a run has, in which order and what each contributes, reads in one place:
``recipe.train``.

- ``RunCallback`` keeps ``training_status.json`` and ``history/steps.jsonl`` current, turns a stop
  request into "save, then stop" and makes sure the run's last step is saved.
- ``EvalCallback`` answers the held-out prompts every ``eval_steps`` and records the scores.
- ``SealCallback`` seals every checkpoint right after the Trainer wrote it (``on_save``): fsync,
  then the ``ut_checkpoint.json`` marker, so a checkpoint is complete or ignored.
- ``ContinuousTrainer`` differs from ``Trainer`` only in its loss, which reads in one method:
  packed rows made model-ready, the chunked loss (model/loss.py), the rehearsal lines' loss (the
  base's distribution distilled, ``training.rehearsal_loss``) and their weight (the retention-aware
  controller's share within a run), which a callback cannot provide.

With several processes (``distributed.py``) every rank runs these callbacks; rank 0 alone writes
status, history and markers and evaluates, and the stop decision is taken together.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import TrainerControl, TrainerState

from ultimate_trainer.core import checkpoints as ck
from ultimate_trainer.core.config import Config
from ultimate_trainer.core.records import CheckpointMarker
from ultimate_trainer.core.progress import Stopped
from ultimate_trainer.model import scoring as evaluation
from ultimate_trainer.data.collate import marked_only, packed_inputs
from ultimate_trainer.model import attention
from ultimate_trainer.model.loss import (chunked_causal_lm_loss, has_teacher, supports_chunked_loss,
                                         weighted_causal_lm_loss)
from ultimate_trainer.trainer import distributed
from ultimate_trainer.trainer.control_rule import ControllerState
from ultimate_trainer.trainer.plan import RunPlan
from ultimate_trainer.trainer.reporter import StatusReporter, Throughput

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ultimate_trainer.core.progress import Progress
    from ultimate_trainer.data.collate import Collator
    from ultimate_trainer.data.formats import Example
    from ultimate_trainer.model.scoring import AccuracyTracker
    from ultimate_trainer.trainer.guard import GuardCallback

log = logging.getLogger(__name__)


class ContinuousTrainer(Trainer):
    """A Trainer whose loss understands packed rows and never materialises the full logits."""

    def __init__(self, *args: Any, cfg: Config, loss_observers: list[Callable[[torch.Tensor], None]] | None = None,
                 token_weights: Callable[[], tuple[float, float]] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.cfg = cfg
        self.loss_observers = list(loss_observers or [])  # told each training micro-batch's loss (the guard)
        self.token_weights = token_weights  # (rehearsal, other) now: the retention-aware controller's
        self._distills: bool | None = None  # decided at the first training batch (``distills``)
        # The plain loss (each target token's cross-entropy once) of the micro-batches since the last log, the
        # step it started after, and whether the objective trained differed from it (``log``).
        self._plain_sum: torch.Tensor | None = None
        self._plain_since = 0
        self._objective_differs = False

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        """The step's loss, all of it here: packed inputs made model-ready, then the chunked loss
        (model/loss.py) or the Trainer's own; each training micro-batch's loss is told to the observers.

        A padding-free row gets its examples' boundaries, packed rows their block-diagonal mask, for
        the model's attention kind (data/collate.py, model/attention.py). With several ranks ``model``
        is the DDP/FSDP/DeepSpeed wrapper, whose own forward must run (it syncs the gradients): the
        chunked loss, which calls the model's parts, is left out there.
        """
        inner = getattr(model, "module", model)  # under DDP/FSDP/DeepSpeed the model's attributes are its module's
        attn = getattr(getattr(inner, "config", None), "_attn_implementation", None)
        inputs = dict(inputs)
        marks = inputs.pop("rehearsal_mask", None)  # the model never sees it
        distill = marks if model.training and marks is not None and self.distills(model) else None
        teacher_inputs = marked_only(inputs, distill) if distill is not None else None  # the rehearsal lines alone
        made_ready = functools.partial(packed_inputs, attn_implementation=attn,
                                       dtype=getattr(inner, "dtype", torch.float32),
                                       takes_boundaries=attention.takes_boundaries(attn))
        inputs = made_ready(inputs)
        teacher_inputs = made_ready(teacher_inputs) if teacher_inputs is not None else None
        weights = self._weights(marks) if model.training else None
        chunked = self.cfg.training.chunked_loss and self.accelerator.num_processes == 1 and model.training \
            and not return_outputs and supports_chunked_loss(model)
        plain = None  # the loss with every target token's cross-entropy counted once, when it is not the one trained
        if (weights is not None or distill is not None) and not return_outputs:
            result, plain = weighted_causal_lm_loss(model, inputs, weights, num_items_in_batch, chunked,
                                                    distill_mask=distill, teacher_inputs=teacher_inputs)
            result, plain = self._across_ranks(result, num_items_in_batch), self._across_ranks(plain, num_items_in_batch)
        elif chunked:
            result = chunked_causal_lm_loss(model, inputs, num_items_in_batch)
        else:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            loss = (plain if plain is not None else result[0] if return_outputs else result).detach()
            for observe in self.loss_observers:  # the guard judges the plain loss
                observe(loss)
            if self._plain_sum is None:
                self._plain_sum, self._plain_since = loss.float(), self.state.global_step
            else:
                self._plain_sum = self._plain_sum + loss.float()
            self._objective_differs |= plain is not None
        return result

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, whose ``loss`` is the plain cross-entropy of the steps since the last log
        (every target token once, averaged over ranks as the Trainer averages its own), so that a chart
        of it reads beside the validation loss; when the loss trained differed (the controller's weights,
        the distilled rehearsal lines' KL), that one is ``objective`` beside it."""
        steps = self.state.global_step - self._plain_since
        if "loss" in logs and self._plain_sum is not None and steps > 0:
            from transformers.trainer_pt_utils import nested_gather

            # One gather on every rank whatever its own batches held (a rank without rehearsal lines trained
            # the plain loss while another did not): [plain loss, whether the objective differed], averaged.
            mine = torch.stack([self._plain_sum.reshape(()), torch.tensor(float(self._objective_differs),
                                                                           device=self._plain_sum.device)])
            plain, differs = nested_gather(mine.unsqueeze(0), self.args.parallel_mode).mean(0).tolist()
            if differs > 0:
                logs = {**logs, "objective": logs["loss"], "loss": plain / steps}
        if "loss" in logs:
            self._plain_sum, self._objective_differs = None, False
        super().log(logs, start_time)


    def _across_ranks(self, loss: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
        """``loss`` as the Trainer's own ``compute_loss`` scales it: with ``num_items_in_batch`` counted over all
        ranks, times the number of ranks, which DDP's gradient average then undoes (without it, a loss computed
        here would train at 1/world_size of the rate)."""
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            return loss * self.accelerator.num_processes
        return loss

    def distills(self, model: torch.nn.Module) -> bool:
        """Whether the rehearsal lines train towards the base's distribution (``speed.rehearsal_loss``),
        which needs a model with an adapter to switch off."""
        if self._distills is None:
            from ultimate_trainer.trainer.speed import rehearsal_loss

            wanted = self.cfg.training.rehearsal_loss == "distill"
            self._distills = rehearsal_loss(self.cfg, self.accelerator.num_processes) == "distill" \
                and has_teacher(model)
            if wanted and not self._distills:
                log.warning("rehearsal: its lines train on the base's answers (cross-entropy), not its distribution: "
                            "%s", "FSDP/DeepSpeed shard the model" if has_teacher(model) else "the model has no adapter")
        return self._distills

    def _weights(self, rehearsal_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Each token's loss weight (the controller's rehearsal share within the run), None when all are 1."""
        if rehearsal_mask is None or self.token_weights is None:
            return None
        rehearsal, other = self.token_weights()
        if rehearsal == 1.0 and other == 1.0:
            return None
        return torch.where(rehearsal_mask.bool(), rehearsal, other).to(torch.float32)


class ConfiguredLearningRate(TrainerCallback):
    """``training.learning_rate`` as configured now, also when a run resumes a checkpoint.

    The scheduler saved in a checkpoint carries the learning rate of the run that saved it
    (``base_lrs``, the optimizer's ``initial_lr``), and loading it would keep that rate for every
    later run whatever the configuration says. At the start of a run the configured rate replaces
    it; the schedule's position (warm-up done, the factor at this step) is kept."""

    def __init__(self, learning_rate: float, scale: float = 1.0):
        self.learning_rate, self.scale = learning_rate * scale, scale  # scale: the retention-aware controller's

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       optimizer: torch.optim.Optimizer | None = None, lr_scheduler: Any = None, **kw: Any):
        sched = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper, when there is one
        lambdas = getattr(sched, "lr_lambdas", None)
        if optimizer is None or lambdas is None or list(sched.base_lrs) == [self.learning_rate] * len(lambdas):
            return
        log.info("learning rate %s from the configuration%s (the checkpoint's schedule had %s)", self.learning_rate,
                 f" x {self.scale:g}, the retention-aware controller's scale" if self.scale != 1.0 else "",
                 sched.base_lrs[0])
        sched.base_lrs = [self.learning_rate] * len(lambdas)
        for group, factor in zip(optimizer.param_groups, lambdas):
            group["initial_lr"] = self.learning_rate
            group["lr"] = self.learning_rate * factor(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in optimizer.param_groups]


class SealCallback(TrainerCallback):
    """Makes every checkpoint complete-or-absent and self-describing, and reports the ``saving`` state.

    ``marker`` is what every checkpoint of the run says of it (``recipe.run_marker``); the step's own
    fields (global step, run step, whether it ends the run) are set here, from ``plan``, at each save,
    and the retention-aware controller's state as it is then (``control``, which its callback updates).
    """

    def __init__(self, reporter: StatusReporter, marker: CheckpointMarker, plan: RunPlan,
                 control: ControllerState | None = None):
        self.reporter, self.marker, self.plan, self.control = reporter, marker, plan, control

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if control.should_save:  # the Trainer saves right after this step's callbacks
            self.reporter.begin_phase("saving")

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        distributed.barrier()  # every rank has written its part (its RNG state) before rank 0 seals
        if not state.is_world_process_zero:
            return
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        marker = self.marker.at(state.global_step, self.plan.run_step(state.global_step))
        if self.control is not None:
            marker = dataclasses.replace(marker, controller=self.control.to_json())
        ck.mark_complete(path, marker)
        self.reporter.refresh_checkpoints()
        self.reporter.end_phase("saving")
        log.info("saved %s", path.name)


class RunCallback(TrainerCallback):
    def __init__(self, reporter: StatusReporter, stop: Any, plan: RunPlan, files: list[str], guard: GuardCallback,
                 throughput: Throughput, world: distributed.World | None = None):
        self.reporter, self.stop, self.plan = reporter, stop, plan
        self.guard = guard  # guard.GuardCallback: its ``stability`` goes into each step's line
        self.world = world or distributed.World()
        self.start_step, self.total_steps = plan.start_step, plan.total_steps
        self.steps_per_epoch, self.files, self.run_id = plan.steps_per_epoch, files, plan.run_id
        self.throughput = throughput
        self.t0 = time.monotonic()

    def run_step(self, state: TrainerState) -> int:
        return self.plan.run_step(state.global_step)

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
        if self.world.size > 1:
            # One collective a step: all ranks stop after the same step if any was asked to (and rank 0
            # learns every rank's memory for the status file).
            ranks = distributed.gather({**distributed.rank_report(self.world), "stop": self.stop.requested})
            self.stop.requested = any(r.pop("stop") for r in ranks)
            self.reporter.update(ranks=ranks)
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
            **({"objective": logs["objective"]} if "objective" in logs else {}),
            "learning_rate": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens_per_second": round(tps, 1) if tps else self.reporter.get("tokens_per_second"),
        }
        stability = self.guard.stability  # kept current by the guard (trainer/guard.py)
        skipped = stability.get("last_anomaly") or {}
        extra: dict[str, Any] = {}
        if skipped.get("global_step") == state.global_step:
            # The guard skipped this step's update. The Trainer logs a non-finite loss as 0.0 (or an average):
            # the record gets the real one, null when it is not a number (its text beside it).
            extra = {"skipped": True, "anomaly": skipped.get("kind")}
            fields.pop("objective", None)  # the Trainer's stand-in for a non-finite one: not a figure of this step
            for k in ("loss", "grad_norm"):
                real = skipped.get(k)
                fields[k] = real if isinstance(real, (int, float)) else None
                if isinstance(real, str):
                    extra[f"{k}_text"] = real
        objective = fields.get("objective")
        self.reporter.update(**{k: v for k, v in fields.items() if k != "objective"})
        log.info("step %d (run %d/%d) loss %s%s lr %.3g grad_norm %s tok/s %s%s", state.global_step,
                 self.run_step(state), self.total_steps,
                 extra.get("loss_text") or (None if fields["loss"] is None else round(fields["loss"], 4)),
                 "" if objective is None else f" (objective {objective:.4g})",
                 fields["learning_rate"] or 0.0,
                 None if fields["grad_norm"] is None else round(fields["grad_norm"], 3), fields["tokens_per_second"],
                 " (update skipped)" if extra else "")
        self.reporter.log_step({"global_step": state.global_step, "run_id": self.run_id,
                                "epoch": round(self.run_step(state) / self.steps_per_epoch, 4),
                                "files": self.files, **fields, **extra, "loss_slope": stability.get("loss_slope"),
                                "stability_score": stability.get("score"), "anomalies": stability.get("anomalies"),
                                "shares": stability.get("shares")})


def evaluation_due(step: int, max_steps: int, every: int) -> bool:
    """Whether to evaluate after optimizer step ``step`` of a run ending at ``max_steps``.

    At the end of every run, so that each run's result is known, and every ``every`` steps, except
    a scheduled evaluation less than half an interval before the run's end: the end's evaluation
    follows it too closely to tell anything new (a 106-step run evaluates at 25, 50, 75 and 106,
    not also at 100). ``every`` 0: never."""
    if not every:
        return False
    return step >= max_steps or (step % every == 0 and 2 * (max_steps - step) >= every)


def interleave_by_file(examples: list[Example], limit: int) -> list[Example]:
    """Up to ``limit`` examples taken round-robin across their files, so every file is asked."""
    by_file: dict[str, list[Example]] = {}
    for ex in examples:
        by_file.setdefault(ex.source.rsplit(":", 1)[0], []).append(ex)
    out: list[Example] = []
    queues = list(by_file.values())
    while len(out) < limit and any(queues):
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop(0))
    return out


class EvalCallback(TrainerCallback):
    """Greedy answers to the held-out prompts, scored, every ``eval_steps``, at the end of each run, and
    once at the very start."""

    def __init__(self, cfg: Config, reporter: StatusReporter, tokenizer: PreTrainedTokenizerBase,
                 heldout: list[Example], heldout_encoded: list[Any], collator: Collator, tracker: AccuracyTracker,
                 run_id: str, stop: Any,
                 throughput: Throughput | None = None):
        self.cfg, self.reporter, self.tokenizer = cfg, reporter, tokenizer
        self.heldout = interleave_by_file(heldout, cfg.eval.max_prompts)
        # Validation loss over an even sample, so that 64 files x 50 held-out lines stay cheap.
        cap = cfg.eval.val_loss_max_examples
        stride = max(1, -(-len(heldout_encoded) // cap))
        self.heldout_encoded, self.collator = heldout_encoded[::stride][:cap], collator
        self.tracker, self.run_id, self.stop = tracker, run_id, stop
        self.throughput = throughput
        self.model: PreTrainedModel | None = None
        self.last_accuracy: float | None = None  # the last evaluation's held-out accuracy, percent (the controller's)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: PreTrainedModel | None = None, **kw: Any):
        self.model = model
        if not state.is_world_process_zero:  # rank 0 evaluates; the others wait at the next step's collective
            return
        if self.cfg.eval.at_start and self.cfg.eval_steps and self.tracker.evaluations == 0 and self.heldout:
            self.evaluate(state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: PreTrainedModel | None = None, **kw: Any):
        due = evaluation_due(state.global_step, state.max_steps, self.cfg.eval_steps)
        if due and not self.stop.requested and state.is_world_process_zero:
            self.model = model or self.model
            try:
                self.evaluate(state.global_step)
            except Stopped as e:  # RunCallback, next, saves the steps trained and ends the run
                log.warning("%s: not recorded", e)

    def evaluate(self, global_step: int) -> None:
        """One evaluation; a stop during it raises ``Stopped`` (within a generated token) and records nothing."""
        if not self.heldout and not self.heldout_encoded:
            return
        from ultimate_trainer.model.loading import inference_kernels

        with self.reporter.phase("evaluating"), \
                self.reporter.progress("evaluation", len(self.heldout), "prompts", self.stop.stopped) as progress:
            t0 = time.monotonic()
            with inference_kernels(self.model):  # once for generation and validation loss together
                self._evaluate(global_step, progress)
            if self.throughput is not None:
                self.throughput.exclude(time.monotonic() - t0)

    def _evaluate(self, global_step: int, progress: Progress | None = None) -> None:
        ev = self.cfg.eval
        t0 = time.monotonic()
        answers = evaluation.generate_answers(self.model, self.tokenizer, [e.prompt_messages for e in self.heldout],
                                              ev.max_new_tokens, ev.batch_size, progress)
        t1 = time.monotonic()
        examples = []
        for ex, generated in zip(self.heldout, answers):
            correct = evaluation.score(ev.matcher, generated, ex.expected)
            examples.append({"global_step": global_step, "prompt": ex.prompt_text, "expected": ex.expected,
                             "generated": generated, "correct": correct, "matcher": ev.matcher, "source": ex.source,
                             "skill": getattr(ex, "skill", None)})
        val_loss = None
        if ev.val_loss and self.heldout_encoded:
            val_loss = evaluation.validation_loss(self.model, self.heldout_encoded, ev.batch_size, self.collator,
                                                  max_tokens=self.cfg.training.max_seq_length, progress=progress)
        t2 = time.monotonic()
        self.tracker.add_evaluation([e["correct"] for e in examples])
        snap = self.tracker.snapshot()
        correct = sum(e["correct"] for e in examples)
        summary = {"global_step": global_step, "run_id": self.run_id, "correct": correct, "total": len(examples),
                   "accuracy": round(100.0 * correct / len(examples), 2) if examples else None,
                   "val_loss": val_loss, **{k: snap[k] for k in ("overall", "last_20", "last_50", "trend")},
                   "seconds": {"generation": round(t1 - t0, 3), "val_loss": round(t2 - t1, 3)}}
        self.reporter.log_evaluation(summary, examples)
        self.last_accuracy = summary["accuracy"]
        self.reporter.update(accuracy=snap, val_loss=val_loss if val_loss is not None else self.reporter.get("val_loss"))
        log.info("eval at step %d: %d/%d correct, overall %s%%, val_loss %s", global_step, correct,
                 len(examples), snap["overall"], None if val_loss is None else round(val_loss, 4))


def training_arguments(cfg: Config, output_dir: Path, max_steps: int, device: str, dtype: torch.dtype,
                       world_size: int = 1, engine: dict[str, Any] | None = None,
                       micro_batch: int | None = None) -> TrainingArguments:
    """The Trainer's arguments; ``world_size`` ranks share each step's accumulation when it divides.

    ``micro_batch``: dataset items per forward pass when not ``training.batch_size`` (1 for
    padding-free rows, each of which already holds ``batch_size`` examples).
    """
    import torch

    t = cfg.training
    per_rank_accumulation, _ = distributed.accumulation(t.gradient_accumulation_steps, world_size)
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=micro_batch or t.batch_size,
        gradient_accumulation_steps=per_rank_accumulation,
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
        ddp_timeout=t.collective_timeout_seconds,
        ddp_backend=None if world_size <= 1 else ("nccl" if device == "cuda" else "gloo"),
        **(engine or {}),
    )


def write_bootstrap(model: PreTrainedModel, directory: Path, global_step: int, args: TrainingArguments) -> Path:
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
