"""Daily consolidation: merge the current LoRA adapter into the base weights.

    python -m ultimate_trainer.trainer.consolidation [--config PATH] [--set K=V ...] [--checkpoint DIR] [--files-json F]

The daemon runs this as a child process (its memory never stays in the daemon). It writes
``models/consolidated/<YYYYmmdd-HHMMSS>/``: the merged model (safetensors, config, generation
config), the tokenizer and, last, ``manifest.json``. The folder is built in a hidden temp sibling
and renamed into place, so it is complete or absent.

The base is loaded exactly as it was trained (4-bit NF4 when the checkpoint says so) and then
dequantized, so the merge equals what was trained; an adapter is never merged into 4-bit weights.
The merged weights are bfloat16 on CUDA and float32 on the CPU. The trainer then continues on the
merged model with a fresh adapter, keeping the global step (see ultimate_trainer/checkpoints.py).

A stop (SIGTERM from the daemon, ^C) is honoured within seconds: the gate's generation ends at the
next token, the layer-by-layer merge at the next tensor, the other stages at the next stage
boundary; the half-built temp folder is removed, nothing is adopted, and the process exits
``STOPPED`` (143, as if killed by SIGTERM) so that the daemon never takes it for a finished merge.
Each stage, and the gate's scoring batch by batch, is logged with its progress and ETA, and shown
in ``status/consolidation_status.json`` (``MergeStatus``; this child is its one writer), which the
daemon's status and the live page carry while the merge runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable

from ultimate_trainer.core.checkpoints import MANIFEST, REFUSED_DIR, CheckpointInfo, current_checkpoints, list_complete
from ultimate_trainer.core.exitcodes import Exit
from ultimate_trainer.core import spool
from ultimate_trainer.core.config import Config, add_arguments
from ultimate_trainer.core.status import CONSOLIDATION_STATUS, SCHEMA_VERSION, atomic_write_json
from ultimate_trainer.core.times import now_iso
from ultimate_trainer.core.config import config_or_none
from ultimate_trainer.core.logs import setup_logging
from ultimate_trainer.core.progress import Progress, Stopped
from ultimate_trainer.model.loading import ModelError
from ultimate_trainer.model.merging import merge_layerwise

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

STOPPED = 128 + 15  # exit code of a merge ended by a stop: nothing written
STAGES = ("load and dequantize the base", "score the base (gate)", "merge", "score the candidate (gate)", "save")


class ConsolidationError(RuntimeError):
    pass


class MergeStatus:
    """``status/consolidation_status.json`` while the merge runs and after it (docs/STATUS.md).

    ``stage``: the stage under way (``STAGES``: ``done`` of ``total``, its ``name``). ``progress``:
    the phase under way, the same object as ``training_status.json``'s (core/progress.py): the gate
    scoring a model prompt by prompt, the layer-by-layer merge tensor by tensor, each with its ETA;
    between such phases, the stage itself (``phase`` ``consolidation: <stage>``, no ETA: stages
    differ too much in length for one). ``state``: ``running``, then ``adopted``, ``refused``,
    ``stopped`` or ``failed``. A write that fails (full disk) is logged once and never stops the merge.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.doc: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "state": "running", "pid": os.getpid(),
                                    "started_at": now_iso(), "updated_at": now_iso(), "finished_at": None,
                                    "checkpoint": None, "global_step": None, "stage": None, "progress": None,
                                    "result": None}
        self._warned = False
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        self.doc["updated_at"] = now_iso()
        try:
            atomic_write_json(self.path, self.doc)
        except OSError as e:
            if not self._warned:
                log.warning("%s: cannot write (%s); the merge goes on", self.path, e)
                self._warned = True

    def update(self, **fields: Any) -> None:
        self.doc.update(fields)
        self.write()

    def stage(self, snap: dict[str, Any]) -> None:
        """The stages' ``Progress`` moved: a new stage is under way (or all are done)."""
        done, total = snap["done"], snap["total"]
        name = STAGES[done] if done < total else "done"
        self.update(stage={"done": done, "total": total, "name": name},
                    progress={**snap, "phase": f"consolidation: {name}", "eta_seconds": None})

    def phase(self, snap: dict[str, Any]) -> None:
        """A phase inside a stage (gate scoring, layer-by-layer merge) moved."""
        self.update(progress=snap)

    def finish(self, state: str, result: str | None = None) -> None:
        self.update(state=state, result=result, progress=None, finished_at=now_iso())


def _merged_dtype(device: str) -> torch.dtype:
    import torch

    return torch.bfloat16 if device == "cuda" else torch.float32


def _trained_4bit(cfg: Config, ckpt: CheckpointInfo) -> bool:
    """Whether the checkpoint's adapter was trained on the 4-bit base (a marker without it: as configured)."""
    saved = ckpt.marker.load_in_4bit
    return bool(cfg.load_in_4bit if saved is None else saved)


def merge_checkpoint(cfg: Config, ckpt: CheckpointInfo, device: str | None = None,
                     before_merge: Callable[[Any], None] | None = None, stages: Progress | None = None) -> tuple[Any, str]:
    """Base as trained + the checkpoint's adapter, merged into full-precision weights. Returns (model, base path).

    ``before_merge`` is handed the base with the adapter attached, unmerged (the gate scores the base
    with the adapter switched off there). ``stages`` counts the stages (``STAGES``) and may stop them.
    """
    from ultimate_trainer.model.loading import load_merged, pick_device, resolve_base

    device = device or pick_device(cfg)
    base_path = ckpt.marker.base_model or resolve_base(cfg)
    quantized = _trained_4bit(cfg, ckpt)
    merged = load_merged(cfg, str(base_path), str(ckpt.path), quantized=quantized, device=device,
                         dtype=_merged_dtype(device), before_merge=before_merge,
                         on_stage=lambda: _stage_done(stages))
    return merged, str(base_path)


# --------------------------------------------------------------------------- layer by layer

def full_precision_bytes(base_path: str, dtype: torch.dtype) -> int:
    """Bytes the merged model takes in ``dtype``: parameters counted from the base's config on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_path)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def merge_fits_in_memory(base_path: str, dtype: torch.dtype, device: str) -> bool:
    """Whether the whole-model merge fits: two full-precision copies (the dequantized base and the
    merged one exist together for a moment) under 80% of the memory available now."""
    import psutil
    import torch

    need = 2 * full_precision_bytes(base_path, dtype)
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return need < 0.8 * free
    return need < 0.8 * psutil.virtual_memory().available


def _judge_unmerged(cfg: Config, ckpt: CheckpointInfo, base_path: str, device: str, gate: "Gate | None",
                    stages: Progress) -> dict[str, Any] | None:
    """The gate's verdict on base + adapter unmerged, loaded as trained (4-bit when it was): no full-precision copy."""
    import gc

    from peft import PeftModel

    from ultimate_trainer.model.loading import load_base_model

    if gate is None:
        for _ in range(3):
            _stage_done(stages)
        return None
    quantized = _trained_4bit(cfg, ckpt)
    model = PeftModel.from_pretrained(load_base_model(cfg, base_path, quantize=quantized, device=device),
                                      str(ckpt.path), is_trainable=False)
    _stage_done(stages)
    gate.score_base(model)
    _stage_done(stages)
    _stage_done(stages)  # nothing merged in memory: the merge is written layer by layer at the save
    try:
        return gate.judge(model)
    finally:
        del model
        gc.collect()


def _stage_done(stages: Progress | None) -> None:
    if stages is not None:
        stages.advance()
        stages.check()


def _save_tokenizer(base_path: str, ckpt: CheckpointInfo, out: Path) -> None:
    from transformers import AutoTokenizer

    for src in (base_path, str(ckpt.path)):
        try:
            AutoTokenizer.from_pretrained(src).save_pretrained(out)
            return
        except (OSError, ValueError, TypeError):
            continue
    raise ConsolidationError(f"no tokenizer found in {base_path} or {ckpt.path}")


def consolidate(cfg: Config, checkpoint: CheckpointInfo | None = None, files_since_last: list[str] | None = None,
                device: str | None = None, trained: list[Path] | None = None,
                should_stop: Callable[[], bool] | None = None, layerwise: bool | None = None,
                status: MergeStatus | None = None) -> tuple[Path, bool]:
    """Write one consolidation of ``checkpoint`` (default: the newest on the current base).

    ``trained``: the files trained so far, newest first (the daemon's ``queue/done``), whose held-out
    examples the gate asks.

    Returns its folder and whether it was adopted. With ``consolidation.gate`` the candidate is
    scored against the current base first (gate.py); a refused one is written under
    ``models/consolidated/.refused/`` with ``adopted: false`` and the reason in its manifest, where no
    run starts from it. ``should_stop``: asked at every generated token and stage; ``Stopped`` is
    raised then, with nothing written.

    ``layerwise`` (default: when two full-precision copies would not fit in memory): the gate scores
    the base and the candidate as the 4-bit (or plain) base with the adapter off and on, unmerged, as
    training computed them, and ``model/merging.merge_layerwise`` writes the merge one tensor at a time.

    ``status``: where the stage and the phase under way are shown (``MergeStatus``).
    """
    current = current_checkpoints(cfg.path("checkpoints"), cfg.path("models"))
    ckpt = checkpoint or (current[-1] if current else None)
    if ckpt is None:
        raise ConsolidationError(f"no complete checkpoint in {cfg.path('checkpoints')}: nothing to consolidate")
    t0 = time.monotonic()
    log.info("merging %s (global step %d) into its base", ckpt.path.name, ckpt.global_step)
    if status is not None:
        status.update(checkpoint=ckpt.path.name, global_step=ckpt.global_step)
    stages = Progress("consolidation", len(STAGES), "stages", should_stop=should_stop, log_every=0.0,
                      on_update=status.stage if status else None)
    phase = status.phase if status else None
    gate = Gate(cfg, ckpt, trained or [], should_stop, phase) if cfg.consolidation.gate else None
    from ultimate_trainer.model.loading import pick_device, resolve_base

    device = device or pick_device(cfg)
    base_path = str(ckpt.marker.base_model or resolve_base(cfg))
    stored_4bit = "quantization_config" in json.loads((Path(base_path) / "config.json").read_text())
    if layerwise is None:
        # A base stored in 4-bit: transformers cannot save its dequantized form (the load's weight
        # conversions have no inverse), and reading its shards is the cheaper merge anyway.
        layerwise = stored_4bit or not merge_fits_in_memory(base_path, _merged_dtype(device), device)
    if layerwise:
        log.info("merging layer by layer (%s)", "the base is stored in 4-bit" if stored_4bit else
                 f"two full-precision copies of {base_path} would not fit in memory")
        merged = None
        verdict = _judge_unmerged(cfg, ckpt, base_path, device, gate, stages)
    else:
        merged, base_path = merge_checkpoint(cfg, ckpt, device, before_merge=gate.score_base if gate else None,
                                             stages=stages)
        verdict = gate.judge(merged) if gate else None
    _stage_done(stages)
    adopted = verdict is None or verdict["adopted"]
    root = cfg.path("models") / "consolidated" / ("" if adopted else REFUSED_DIR)
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    final = root / stamp
    i = 1
    while final.exists():
        final, i = root / f"{stamp}-{i}", i + 1
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        if merged is None:
            tmp.mkdir(parents=True)
            from ultimate_trainer.model.loading import compute_dtype

            trained_4bit = _trained_4bit(cfg, ckpt)
            requantize = {"quant_type": cfg.quantization.quant_type, "double_quant": cfg.quantization.double_quant,
                          "dtype": compute_dtype(cfg, device)} if trained_4bit and not stored_4bit else None
            merge_layerwise(base_path, ckpt.path, tmp, _merged_dtype(device), requantize=requantize,
                            should_stop=stages.should_stop, on_update=phase)
            dtype = str(_merged_dtype(device)).removeprefix("torch.")
        else:
            merged.save_pretrained(tmp, safe_serialization=True)
            dtype = str(next(merged.parameters()).dtype).removeprefix("torch.")
        _save_tokenizer(base_path, ckpt, tmp)
        atomic_write_json(tmp / MANIFEST, {
            "schema_version": 1, "source_checkpoint": ckpt.path.name, "global_step": ckpt.global_step,
            "base_model": base_path, "base_model_name": ckpt.marker.base_model_name or cfg.base_model,
            "files_since_last": list(files_since_last or []), "dtype": dtype,
            "seconds": round(time.monotonic() - t0, 1), "adopted": adopted, "gate": verdict,
            "created_at": now_iso()})
        stages.check()  # the last moment a stop leaves nothing behind
        os.rename(tmp, final)
        stages.advance()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own half-written temp folder, never a complete one
        raise
    if adopted:
        log.info("consolidated into %s in %.1f s", final, time.monotonic() - t0)
    else:
        log.warning("consolidation refused (kept in %s): %s", final, verdict["reason"])  # type: ignore[index]
    return final, adopted


class Gate:
    """Scores the base (adapter off) before the merge and the merged candidate after it (gate.py)."""

    def __init__(self, cfg: Config, ckpt: CheckpointInfo, trained: list[Path],
                 should_stop: Callable[[], bool] | None = None,
                 on_update: Callable[[dict[str, Any]], None] | None = None):
        from ultimate_trainer.model.loading import load_tokenizer, resolve_base
        from ultimate_trainer.trainer.consolidation import gate

        self.cfg, self.gate, self.should_stop, self.on_update = cfg, gate, should_stop, on_update
        self.inputs = gate.gate_inputs(cfg, trained)
        self.tokenizer = load_tokenizer(str(ckpt.marker.base_model or resolve_base(cfg)))
        self.base: dict[str, Any] = {}

    def _progress(self, what: str) -> Progress:
        n = len(self.inputs.examples) + (len(self.inputs.probe.items) if self.inputs.probe else 0)
        return Progress(f"gate: {what}", n, "prompts", should_stop=self.should_stop, on_update=self.on_update)

    def score_base(self, model: PreTrainedModel) -> None:
        with model.disable_adapter():
            self.base = self.gate.score_model(model, self.tokenizer, self.cfg, self.inputs, self._progress("the base"))

    def judge(self, merged: Any) -> dict[str, Any]:
        candidate = self.gate.score_model(merged, self.tokenizer, self.cfg, self.inputs, self._progress("the candidate"))
        return self.gate.decide(self.cfg, self.inputs, self.base, candidate)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ultimate_trainer.trainer.consolidation",
                                 description="Merge the newest adapter into the base (docs/DAEMON.md).")
    add_arguments(ap)
    ap.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder to merge (default: the newest complete one)")
    ap.add_argument("--files-json", metavar="F", help='JSON {"files": [names trained since the last consolidation], '
                    '"trained": [paths of every trained file, newest first]} (the daemon writes it)')
    args = ap.parse_args(argv)
    setup_logging()
    cfg = config_or_none(args)
    if cfg is None:
        return Exit.CONFIG
    ckpt = None
    if args.checkpoint:
        want = Path(args.checkpoint).resolve()
        ckpt = next((c for c in list_complete(want.parent) if c.path.resolve() == want), None)
        if ckpt is None:
            print(f"{args.checkpoint}: not a complete checkpoint (no ut_checkpoint.json)", file=sys.stderr)
            return Exit.CONFIG
    files: list[str] = []
    trained: list[Path] | None = None
    if args.files_json:
        try:
            given = json.loads(Path(args.files_json).read_text(encoding="utf-8"))
            files = list(given.get("files", []))
            trained = [Path(p) for p in given["trained"]] if isinstance(given.get("trained"), list) else None
        except (OSError, ValueError, AttributeError) as e:
            log.warning("%s: unreadable (%s); manifest lists no files", args.files_json, e)
    if trained is None:  # run by hand: this entry point lists the trained files itself
        trained = spool.newest_first(cfg.path("queue") / spool.DONE)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("%s received: stopping the consolidation (nothing is adopted)", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    status = MergeStatus(cfg.path("status") / CONSOLIDATION_STATUS)
    try:
        out, adopted = consolidate(cfg, ckpt, files, trained=trained, should_stop=stop.is_set, status=status)
    except (ConsolidationError, ModelError) as e:
        log.error("%s", e)
        status.finish("failed", str(e))
        return Exit.CRASH
    except Stopped as e:
        log.warning("consolidation stopped (%s); nothing written, the current base stays", e)
        status.finish("stopped", str(e))
        return STOPPED
    except BaseException as e:
        status.finish("failed", f"{type(e).__name__}: {e}")
        raise
    status.finish("adopted" if adopted else "refused", str(out))
    return Exit.OK if adopted else Exit.REFUSED


if __name__ == "__main__":
    raise SystemExit(main())
