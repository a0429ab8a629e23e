"""Daily consolidation: merge the current LoRA adapter into the base weights.

    python -m ultimate_trainer.trainer.consolidate [--config PATH] [--set K=V ...] [--checkpoint DIR] [--files-json F]

The daemon runs this as a child process (its memory never stays in the daemon). It writes
``models/consolidated/<YYYYmmdd-HHMMSS>/``: the merged model (safetensors, config, generation
config), the tokenizer and, last, ``manifest.json``. The folder is built in a hidden temp sibling
and renamed into place, so it is complete or absent.

The base is loaded exactly as it was trained (4-bit NF4 when the checkpoint says so) and then
dequantized, so the merge equals what was trained; an adapter is never merged into 4-bit weights.
The merged weights are bfloat16 on CUDA and float32 on the CPU. The trainer then continues on the
merged model with a fresh adapter, keeping the global step (see ultimate_trainer/checkpoints.py).

A stop (SIGTERM from the daemon, ^C) is honoured within seconds: the gate's generation ends at the
next token, the other stages end at the next stage boundary; the half-built temp folder is removed,
nothing is adopted, and the process exits ``STOPPED`` (143, as if killed by SIGTERM) so that the
daemon never takes it for a finished merge. Each stage, and the gate's scoring batch by batch, is
logged with its progress and ETA.
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
from typing import Any, Callable

from ultimate_trainer.core.checkpoints import MANIFEST, REFUSED_DIR, CheckpointInfo, current_checkpoints, list_complete
from ultimate_trainer.core.exitcodes import Exit
from ultimate_trainer.core.config import Config, add_arguments
from ultimate_trainer.core.status import atomic_write_json
from ultimate_trainer.core.times import now_iso
from ultimate_trainer.core.config import config_or_none
from ultimate_trainer.core.logs import setup_logging
from ultimate_trainer.core.progress import Progress, Stopped

log = logging.getLogger(__name__)

STOPPED = 128 + 15  # exit code of a merge ended by a stop: nothing written
STAGES = ("load and dequantize the base", "score the base (gate)", "merge", "score the candidate (gate)", "save")


class ConsolidationError(RuntimeError):
    pass


def _merged_dtype(device: str) -> Any:
    import torch

    return torch.bfloat16 if device == "cuda" else torch.float32


def merge_checkpoint(cfg: Config, ckpt: CheckpointInfo, device: str | None = None,
                     before_merge: Callable[[Any], None] | None = None, stages: Progress | None = None) -> tuple[Any, str]:
    """Base as trained + the checkpoint's adapter, merged into full-precision weights. Returns (model, base path).

    ``before_merge`` is handed the base with the adapter attached, unmerged (the gate scores the base
    with the adapter switched off there). ``stages`` counts the stages (``STAGES``) and may stop them.
    """
    from peft import PeftModel

    from ultimate_trainer.model.loading import load_base_model, pick_device, resolve_base

    device = device or pick_device(cfg)
    base_path = ckpt.meta.get("base_model") or resolve_base(cfg)
    quantized = bool(ckpt.meta.get("load_in_4bit", cfg.load_in_4bit))
    dtype = _merged_dtype(device)
    base = load_base_model(cfg, str(base_path), quantize=quantized, device=device)
    if quantized:
        base = base.dequantize(dtype=dtype)  # the exact weights the 4-bit layers computed with
        if hasattr(base.config, "quantization_config"):
            del base.config.quantization_config
    base = base.to(dtype)
    model = PeftModel.from_pretrained(base, str(ckpt.path), is_trainable=False)
    _stage_done(stages)
    if before_merge is not None:
        before_merge(model)
    _stage_done(stages)
    merged = model.merge_and_unload()
    _stage_done(stages)
    merged.config.use_cache = True  # the loader switched it off for training
    return merged, str(base_path)


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
                device: str | None = None, should_stop: Callable[[], bool] | None = None) -> tuple[Path, bool]:
    """Write one consolidation of ``checkpoint`` (default: the newest on the current base).

    Returns its folder and whether it was adopted. With ``consolidation.gate`` the candidate is
    scored against the current base first (trainer/gate.py); a refused one is written under
    ``models/consolidated/.refused/`` with ``adopted: false`` and the reason in its manifest, where no
    run starts from it. ``should_stop``: asked at every generated token and stage; ``Stopped`` is
    raised then, with nothing written.
    """
    current = current_checkpoints(cfg.path("checkpoints"), cfg.path("models"))
    ckpt = checkpoint or (current[-1] if current else None)
    if ckpt is None:
        raise ConsolidationError(f"no complete checkpoint in {cfg.path('checkpoints')}: nothing to consolidate")
    t0 = time.monotonic()
    log.info("merging %s (global step %d) into its base", ckpt.path.name, ckpt.global_step)
    stages = Progress("consolidation", len(STAGES), "stages", should_stop=should_stop, log_every=0.0)
    gate = Gate(cfg, ckpt, should_stop) if cfg.consolidation.gate else None
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
        merged.save_pretrained(tmp, safe_serialization=True)
        _save_tokenizer(base_path, ckpt, tmp)
        dtype = str(next(merged.parameters()).dtype).removeprefix("torch.")
        atomic_write_json(tmp / MANIFEST, {
            "schema_version": 1, "source_checkpoint": ckpt.path.name, "global_step": ckpt.global_step,
            "base_model": base_path, "base_model_name": ckpt.meta.get("base_model_name", cfg.base_model),
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
    """Scores the base (adapter off) before the merge and the merged candidate after it (trainer/gate.py)."""

    def __init__(self, cfg: Config, ckpt: CheckpointInfo, should_stop: Callable[[], bool] | None = None):
        from ultimate_trainer.model.loading import load_tokenizer, resolve_base
        from ultimate_trainer.trainer import gate

        self.cfg, self.gate, self.should_stop = cfg, gate, should_stop
        self.inputs = gate.gate_inputs(cfg)
        self.tokenizer = load_tokenizer(str(ckpt.meta.get("base_model") or resolve_base(cfg)))
        self.base: dict[str, Any] = {}

    def _progress(self, what: str) -> Progress:
        n = len(self.inputs.examples) + (len(self.inputs.probe.items) if self.inputs.probe else 0)
        return Progress(f"gate: {what}", n, "prompts", should_stop=self.should_stop)

    def score_base(self, model: Any) -> None:
        with model.disable_adapter():
            self.base = self.gate.score_model(model, self.tokenizer, self.cfg, self.inputs, self._progress("the base"))

    def judge(self, merged: Any) -> dict[str, Any]:
        candidate = self.gate.score_model(merged, self.tokenizer, self.cfg, self.inputs, self._progress("the candidate"))
        return self.gate.decide(self.cfg, self.inputs, self.base, candidate)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Merge the newest adapter into the base (docs/DAEMON.md).")
    add_arguments(ap)
    ap.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder to merge (default: the newest complete one)")
    ap.add_argument("--files-json", metavar="F", help='JSON {"files": [...]}: files trained since the last consolidation')
    args = ap.parse_args(argv)
    setup_logging()
    cfg = config_or_none(args)
    if cfg is None:
        return 2
    ckpt = None
    if args.checkpoint:
        want = Path(args.checkpoint).resolve()
        ckpt = next((c for c in list_complete(want.parent) if c.path.resolve() == want), None)
        if ckpt is None:
            print(f"{args.checkpoint}: not a complete checkpoint (no ut_checkpoint.json)", file=sys.stderr)
            return 2
    files: list[str] = []
    if args.files_json:
        try:
            files = list(json.loads(Path(args.files_json).read_text(encoding="utf-8")).get("files", []))
        except (OSError, ValueError, AttributeError) as e:
            log.warning("%s: unreadable (%s); manifest lists no files", args.files_json, e)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("%s received: stopping the consolidation (nothing is adopted)", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        _, adopted = consolidate(cfg, ckpt, files, should_stop=stop.is_set)
    except ConsolidationError as e:
        log.error("%s", e)
        return 1
    except Stopped as e:
        log.warning("consolidation stopped (%s); nothing written, the current base stays", e)
        return STOPPED
    return Exit.OK if adopted else Exit.REFUSED


if __name__ == "__main__":
    raise SystemExit(main())
