"""The search: learning rate x LoRA rank, each candidate a few dozen steps from one start point.

In order (``Search.run``):

1. **Files** -> the run manifest (hashes, the replay sources), the run id, as ``train.py`` makes them.
2. **Start point**: what the daemon would continue from (``core/checkpoints.start_point``, read only:
   an incomplete checkpoint is not set aside here): the newest checkpoint's adapter on its base, a
   consolidation, or the base.
3. **Data**: the files read and split by the project's held-out rule (``data/heldout.py``, through
   ``data/prepare.py``) into a token store in the scratch folder, with the replay and the rehearsal
   a run of these files would mix in. Too few held-out examples to compare candidates on: exit 3.
4. **Model**, loaded once. The start point's adapter (if any) stays on it, frozen; each candidate
   gets a fresh adapter of its rank beside it (initialised from ``training.seed``) and a fresh
   optimizer, trains ``--steps`` steps of the run's own plan (the same examples in the same order
   for every candidate) with the Hugging Face Trainer and the run's loss, and is deleted after it
   is scored. So every candidate starts from the same weights, whatever ran before it.
5. **Scores**: held-out accuracy (greedy answers, ``eval.matcher``: the run's evaluation), the
   held-out loss, and retention: the probe's score / the base's (the baseline stored in
   ``status/`` when it matches the probe file, else the base scored here with every adapter off).
   The start point itself is scored first, as the reference row.

``report.py`` picks the best and prints; nothing here writes outside the scratch folder but the
JSON report (and the config file, only with ``--write-config``).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from transformers import TrainerCallback

from ultimate_trainer.core import checkpoints as ck
from ultimate_trainer.core import manifest as mf
from ultimate_trainer.core import status as st
from ultimate_trainer.core.config import Config, ConfigError
from ultimate_trainer.core.exitcodes import Exit
from ultimate_trainer.core.progress import Progress, Stopped
from ultimate_trainer.model.loading import ModelError
from ultimate_trainer.trainer.recipe import StopFlag, StopRequested, base_path_for, plan_run
from ultimate_trainer.trainer.tuning import report as rp
from ultimate_trainer.trainer.tuning import scratch

log = logging.getLogger(__name__)

MIN_HELDOUT = 5  # held-out examples with an answer below which candidates cannot be told apart
LOSS_WINDOW = 5  # a candidate's train loss: the mean of its last steps' losses
START_ADAPTER = "default"  # PEFT's name for the adapter a checkpoint is loaded as


@dataclass
class Options:
    lrs: list[float]
    ranks: list[int]
    steps: int = 30
    budget: float | None = 3600.0  # seconds; None: no limit
    prompts: int = 50
    report: Path | None = None
    write_config: Path | None = None


class TuneError(Exception):
    def __init__(self, code: Exit, message: str):
        super().__init__(message)
        self.code = code


@contextlib.contextmanager
def _tracked(phase: str, total: int, unit: str, stop: StopFlag) -> Iterator[Progress]:
    yield Progress(phase, total, unit, should_stop=stop.stopped, log_every=30.0)


def tune(cfg: Config, files: list[Path], opts: Options, stop: StopFlag) -> int:
    """The whole search in a scratch folder that is removed afterwards. Returns the exit code."""
    where = scratch.create(cfg.path("work"))
    search = Search(cfg, files, opts, stop, where)
    try:
        return search.run()
    finally:
        search.model = None
        gc.collect()
        scratch.remove(where)


class Search:
    def __init__(self, cfg: Config, files: list[Path], opts: Options, stop: StopFlag, where: Path):
        self.cfg, self.files, self.opts, self.stop, self.dir = cfg, files, opts, stop, where
        self.pairs = [(lr, r) for r in opts.ranks for lr in opts.lrs]
        self.results = [rp.Result(lr, r) for lr, r in self.pairs]
        self.start_row: rp.Result | None = None
        self.context: dict[str, Any] = {}
        self.model: Any = None
        self.has_start_adapter = False
        self.baseline: float | None = None
        self.t0 = time.monotonic()

    # ----------------------------------------------------------------- the whole
    def run(self) -> int:
        stopped = False
        try:
            for lr, r in self.pairs:
                rp.candidate_config(self.cfg, lr, r)  # a bad --lrs/--ranks value fails before anything loads
            self.prepare()
            self.stop.check()
            self.load_model()
            self.stop.check()
            self.score_start()
            stopped = self.train_candidates()
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return Exit.CONFIG
        except TuneError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.code
        except ModelError as e:
            print(f"error: {e}", file=sys.stderr)
            return Exit.MODEL
        except (StopRequested, Stopped, KeyboardInterrupt) as e:
            log.warning("search stopped%s", f" ({e})" if str(e) else "")
            stopped = True
        except MemoryError:
            print("error: out of memory (lower training.batch_size or training.max_seq_length)", file=sys.stderr)
            return Exit.CRASH
        except Exception as e:  # noqa: BLE001 - a crash outside any one candidate: the log has the traceback
            log.exception("tune failed")
            print(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
            return Exit.CRASH
        return self.finish(stopped)

    def finish(self, stopped: bool) -> int:
        warn = self.cfg.eval.retention_warn
        best, why = rp.pick_best(self.results, warn)
        if stopped:
            done = sum(r.status == rp.DONE for r in self.results)
            why = f"stopped after {done} of {len(self.results)} candidates; " + why
        self.context["seconds"] = round(time.monotonic() - self.t0, 1)
        path = self.opts.report or self.cfg.path("root") / "tune" / f"tune-{time.strftime('%Y%m%d-%H%M%S')}.json"
        rp.write_report(path, rp.report(start=self.start_row, results=self.results, best=best, why=why,
                                        context=self.context, stopped=stopped))
        print(rp.table(self.start_row, self.results, best))
        print(f"best: {self.results[best].name}" if best is not None else "best: none", f"({why})")
        print(f"report: {path}")
        if self.opts.write_config is not None:
            if best is None or stopped:
                print(f"{self.opts.write_config}: not changed ({'the search was stopped' if stopped else 'no best'})")
            else:
                b = self.results[best]
                try:
                    from ultimate_trainer.core.config_edit import set_values

                    set_values(self.opts.write_config, {"training.learning_rate": b.lr, "lora.r": b.rank})
                except (ConfigError, OSError) as e:
                    print(f"error: {self.opts.write_config}: {e}", file=sys.stderr)
                    return Exit.CONFIG
                print(f"{self.opts.write_config}: training.learning_rate = {b.lr:g}, lora.r = {b.rank}")
        if stopped:
            return Exit.OK  # the project's "stopped cleanly" (core/exitcodes.py)
        attempted = [r for r in self.results if r.status != rp.SKIPPED]
        return Exit.CRASH if attempted and all(r.status == rp.FAILED for r in attempted) else Exit.OK

    # ----------------------------------------------------------------- 1-3. files, start point, data
    def prepare(self) -> None:
        from ultimate_trainer.data import prepare
        from ultimate_trainer.data.packing import layout
        from ultimate_trainer.data.replay import write_replay
        from ultimate_trainer.model.loading import load_tokenizer
        from ultimate_trainer.trainer.rehearsal.answers import rehearsal_for

        cfg = self.cfg
        try:
            manifest = mf.for_files(self.files, cfg)
        except OSError as e:
            raise TuneError(Exit.CONFIG, f"{e.filename or ''}: cannot read ({e.strerror or e})") from None
        start = ck.start_point(cfg.path("checkpoints"), cfg.path("models"))
        trained_on = start.checkpoint.marker.base_model_name if start.checkpoint else None
        if start.kind == "checkpoint" and trained_on not in (None, cfg.base_model):
            raise TuneError(Exit.CONFIG, f"{cfg.path('checkpoints')} continues {trained_on!r} but base_model is "
                                         f"{cfg.base_model!r}")
        self.start, self.base_path = start, base_path_for(cfg, start)
        self.has_start_adapter = start.kind == "checkpoint"
        self.tokenizer = load_tokenizer(self.base_path)
        self.layout = layout(cfg.training.packing)
        run_id = manifest.run_id(cfg, self.layout, 1)
        self.stop.check()
        replay = write_replay(manifest, cfg, self.dir / "replay.jsonl", run_id)
        rehearsal = rehearsal_for(cfg, self.base_path, self.tokenizer, manifest.lines, run_id,
                                  self.dir / "rehearsal.jsonl",
                                  track=lambda total: _tracked("rehearsal answers", total, "prompts", self.stop))
        self.stop.check()
        self.prepared = prepare.prepare(manifest.files, self.tokenizer, cfg, self.dir / "store", None,
                                        replay_file=replay.path if replay else None,
                                        rehearsal_file=rehearsal.path if rehearsal else None)
        if self.prepared.unusable:
            raise TuneError(Exit.DATA, "; ".join(f"{p}: {r}" for p, r in self.prepared.unusable))
        heldout, usable = len(self.prepared.heldout), sum(r.examples for r in self.prepared.reports.values())
        if heldout < MIN_HELDOUT:
            raise TuneError(Exit.DATA, (
                f"the held-out rule (data.heldout_fraction={cfg.data.heldout_fraction}, at most "
                f"{cfg.data.heldout_max_per_file} a file) puts aside {heldout} example(s) with an answer of the "
                f"{usable} usable in the files; the search needs at least {MIN_HELDOUT} to compare candidates: "
                f"give it more lines (or --set data.heldout_fraction=...)"))
        self.plan = plan_run(len(self.prepared.train), run_id, cfg, None, self.prepared.train.lengths, self.layout)
        self.steps = min(self.opts.steps, self.plan.total_steps)
        self.warmup = min(cfg.training.warmup_steps, max(1, self.steps // 10))
        from ultimate_trainer.trainer.hf import interleave_by_file

        self.prompts = interleave_by_file(self.prepared.heldout, self.opts.prompts)
        cap = cfg.eval.val_loss_max_examples
        stride = max(1, -(-len(self.prepared.heldout_encoded) // cap))
        self.encoded = self.prepared.heldout_encoded[::stride][:cap]
        parent = start.consolidation.path.name if start.consolidation else \
            start.checkpoint.name if start.checkpoint else None
        self.context = {
            "files": [{"path": str(e.path), "sha256": e.sha256, "lines": e.lines} for e in manifest.files],
            "start_point": {"kind": start.kind, "name": parent, "global_step": start.global_step,
                      "base": str(self.base_path), "adapter": self.has_start_adapter},
            "train_examples": len(self.prepared.train), "heldout_examples": heldout,
            "heldout_prompts": len(self.prompts), "replay_examples": self.prepared.replay_examples,
            "rehearsal_examples": self.prepared.rehearsal_examples,
            "run_steps": self.plan.total_steps, "steps_per_candidate": self.steps, "warmup_steps": self.warmup,
            "budget_seconds": self.opts.budget, "retention_warn": cfg.eval.retention_warn,
            "learning_rates": self.opts.lrs, "ranks": self.opts.ranks, "lora_alpha": cfg.lora.alpha,
        }
        for r in self.results:
            r.planned_steps = self.steps
        log.info("tune: %d candidates x %d steps (of this run's %d), %d held-out prompts, start %s%s",
                 len(self.pairs), self.steps, self.plan.total_steps, len(self.prompts), start.kind,
                 f" {parent}" if parent else "")

    # ----------------------------------------------------------------- 4. the model, once
    def load_model(self) -> None:
        import torch

        from ultimate_trainer.data.collate import Collator
        from ultimate_trainer.model.loading import attach_lora, load_base_model, pick_device
        from ultimate_trainer.trainer.probe.questions import load_probe

        cfg = self.cfg
        self.device = pick_device(cfg)
        base = load_base_model(cfg, self.base_path, quantize=cfg.load_in_4bit, device=self.device)
        torch.manual_seed(cfg.training.seed)
        adapter = str(self.start.checkpoint.path) if self.has_start_adapter else None
        # Without a start adapter the PeftModel still gets one ("default", fresh), never activated: the
        # candidates are added beside it the same way in both cases.
        self.model = attach_lora(cfg, base, adapter_dir=adapter)
        self.model.set_requires_grad(START_ADAPTER, False)
        self.collator = Collator(self.tokenizer)
        self.probe = load_probe(cfg)
        self.context["device"] = self.device

    @contextlib.contextmanager
    def _active(self, candidate: str | None) -> Iterator[None]:
        """The start point's adapter (if any) and ``candidate``'s active; with neither, every adapter off."""
        names = ([START_ADAPTER] if self.has_start_adapter else []) + ([candidate] if candidate else [])
        if not names:
            with self.model.disable_adapter():
                yield
            return
        self.model.base_model.set_adapter(names)
        self.model.set_requires_grad(START_ADAPTER, False)  # set_adapter makes every active adapter trainable
        yield

    # ----------------------------------------------------------------- 5. scores
    def _score(self, label: str) -> dict[str, Any]:
        from ultimate_trainer.model.loading import inference_kernels
        from ultimate_trainer.model.scoring import validation_loss
        from ultimate_trainer.trainer.probe.scoring import retention, score_examples, score_probe

        ev = self.cfg.eval
        out: dict[str, Any] = {}
        with inference_kernels(self.model):
            p = Progress(f"tune: {label}: held-out", len(self.prompts), "prompts", should_stop=self.stop.stopped,
                         log_every=30.0)
            acc = score_examples(self.model, self.tokenizer, self.prompts, ev.matcher, ev.max_new_tokens,
                                 ev.batch_size, p)
            out.update(accuracy=acc["accuracy"], correct=acc["correct"], total=acc["total"])
            if ev.val_loss and self.encoded:
                out["val_loss"] = validation_loss(self.model, self.encoded, ev.batch_size, self.collator,
                                                  max_tokens=self.cfg.training.max_seq_length)
            if self.probe is not None:
                p = Progress(f"tune: {label}: probe", len(self.probe.items), "questions",
                             should_stop=self.stop.stopped, log_every=30.0)
                probe = score_probe(self.model, self.tokenizer, self.probe, ev.probe_max_new_tokens, ev.batch_size, p)
                out.update(retention=retention(probe["score"], self.baseline), probe_correct=probe["correct"])
        return out

    def _baseline(self) -> float | None:
        """The base's probe score: the run's stored baseline of this probe file, else scored now (adapters off)."""
        if self.probe is None:
            return None
        stored = st.read_json(self.cfg.path("status") / st.PROBE_BASELINE)
        if stored and stored.get("sha256") == self.probe.sha256 and isinstance(stored.get("score"), (int, float)):
            self.context["probe_baseline"] = {"score": stored["score"], "from": "status/history/probe_baseline.json"}
            return float(stored["score"])
        from ultimate_trainer.model.loading import inference_kernels
        from ultimate_trainer.trainer.probe.scoring import score_probe

        with self.model.disable_adapter(), inference_kernels(self.model):
            p = Progress("tune: probe baseline", len(self.probe.items), "questions", should_stop=self.stop.stopped)
            result = score_probe(self.model, self.tokenizer, self.probe, self.cfg.eval.probe_max_new_tokens,
                                 self.cfg.eval.batch_size, p)
        self.context["probe_baseline"] = {"score": result["score"], "from": "scored now (the base, adapters off)"}
        return result["score"]

    def score_start(self) -> None:
        t0 = time.monotonic()
        self.baseline = self._baseline()
        row = rp.Result(None, None, status=rp.DONE)
        with self._active(None):
            for k, v in self._score("start point").items():
                setattr(row, k, v)
        row.seconds = round(time.monotonic() - t0, 1)
        self.start_row = row
        log.info("tune: start point: held-out %s%%, retention %s", row.accuracy, row.retention)

    # ----------------------------------------------------------------- the candidates
    def train_candidates(self) -> bool:
        """Train and score each candidate; True when a stop ended the search early."""
        total = self.steps * len(self.pairs)
        progress = Progress("tune", total, "steps", should_stop=self.stop.stopped, log_every=10.0)
        spent: list[float] = []
        for i, res in enumerate(self.results):
            if self.stop.requested:
                for r in self.results[i:]:
                    r.reason = "the search was stopped before it"
                return True
            elapsed = time.monotonic() - self.t0
            if self.opts.budget is not None and spent and elapsed + sum(spent) / len(spent) > self.opts.budget:
                for r in self.results[i:]:
                    r.status, r.reason = rp.SKIPPED, f"budget of {self.opts.budget:g} s"
                log.warning("tune: the budget of %g s leaves no time for %d more candidate(s)", self.opts.budget,
                            len(self.results) - i)
                return False
            t0 = time.monotonic()
            done_before = progress.done
            try:
                self._candidate(i, res, progress)
            except (Stopped, StopRequested, KeyboardInterrupt) as e:
                res.status, res.reason = rp.STOPPED, str(e) or "stop requested"
            except Exception as e:  # noqa: BLE001 - one candidate failing (out of memory at a high rank) is reported
                log.exception("tune: candidate %s failed", res.name)
                res.status, res.reason = rp.FAILED, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            finally:
                self._drop(f"c{i}")
            res.seconds = round(time.monotonic() - t0, 1)
            spent.append(res.seconds)
            progress.advance(max(0, done_before + self.steps - progress.done))  # a short candidate's steps too
            if res.status == rp.STOPPED:
                for r in self.results[i + 1:]:
                    r.reason = "the search was stopped before it"
                return True
        return False

    def _candidate(self, i: int, res: rp.Result, progress: Progress) -> None:
        import torch
        from transformers.trainer_callback import PrinterCallback
        from transformers.trainer_utils import SaveStrategy

        from ultimate_trainer.model.loading import compute_dtype, lora_config
        from ultimate_trainer.trainer import hf, speed

        cfg = rp.candidate_config(self.cfg, res.lr, res.rank)
        name = f"c{i}"
        torch.manual_seed(cfg.training.seed)  # a candidate's adapter starts the same whatever ran before it
        self.model.add_adapter(name, lora_config(cfg))
        with self._active(name):
            args = hf.training_arguments(cfg, self.dir / name, self.steps, self.device, compute_dtype(cfg, self.device),
                                         micro_batch=self.plan.micro_batch)
            args.save_strategy, args.warmup_steps = SaveStrategy.NO, self.warmup  # scratch: nothing is saved
            args.logging_nan_inf_filter, args.disable_tqdm = False, True
            watch = _Watch(self.stop, progress, f"tune: candidate {i + 1}/{len(self.results)} ({res.name})",
                           self.steps)
            dataset, collator = speed.training_data(self.prepared.train, self.plan, self.tokenizer,
                                                    speed.rehearsal_from(self.prepared, cfg))
            trainer = hf.ContinuousTrainer(model=self.model, args=args, train_dataset=dataset, data_collator=collator,
                                           processing_class=self.tokenizer, callbacks=[watch, speed.ThreadGovernor()],
                                           cfg=cfg)
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            res.steps = trainer.state.global_step
            del trainer
            window = watch.losses[-LOSS_WINDOW:]
            res.train_loss = round(sum(window) / len(window), 4) if window and all(map(math.isfinite, window)) \
                else None
            if watch.diverged:
                res.status, res.reason = rp.DIVERGED, watch.diverged
                return
            if self.stop.requested:
                res.status, res.reason = rp.STOPPED, f"stop requested at step {res.steps}"
                return
            for k, v in self._score(res.name).items():
                setattr(res, k, v)
        res.status = rp.DONE
        log.info("tune: %s: %d steps, train loss %s, held-out %s%%, retention %s", res.name, res.steps, res.train_loss,
                 res.accuracy, res.retention)

    def _drop(self, name: str) -> None:
        if name in getattr(self.model, "peft_config", {}):
            self.model.base_model.set_adapter([START_ADAPTER])  # so that PEFT need not pick one when it goes
            self.model.set_requires_grad(START_ADAPTER, False)
            self.model.delete_adapter(name)
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass


class _Watch(TrainerCallback):
    """A candidate's steps: its losses, the progress line, a stop at the step's end, a loss that is not a number."""

    def __init__(self, stop: StopFlag, progress: Progress, phase: str, steps: int):
        self.stop, self.progress, self.phase, self.steps = stop, progress, phase, steps
        self.losses: list[float] = []
        self.diverged: str | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        self.progress.phase = f"{self.phase} step {state.global_step}/{self.steps}"
        self.progress.advance()
        if self.stop.requested:
            control.should_training_stop = True
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> Any:
        loss = (logs or {}).get("loss")
        if isinstance(loss, (int, float)):
            self.losses.append(float(loss))
            if not math.isfinite(loss):
                self.diverged = f"loss {loss} at step {state.global_step}"
                control.should_training_stop = True
        return control
