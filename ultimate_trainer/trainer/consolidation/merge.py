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
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable

from ultimate_trainer.core.checkpoints import MANIFEST, REFUSED_DIR, CheckpointInfo, current_checkpoints, list_complete
from ultimate_trainer.core.exitcodes import Exit
from ultimate_trainer.core import spool
from ultimate_trainer.core.config import Config, add_arguments
from ultimate_trainer.core.status import atomic_write_json
from ultimate_trainer.core.times import now_iso
from ultimate_trainer.core.config import config_or_none
from ultimate_trainer.core.logs import setup_logging
from ultimate_trainer.core.progress import Progress, Stopped

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

STOPPED = 128 + 15  # exit code of a merge ended by a stop: nothing written
STAGES = ("load and dequantize the base", "score the base (gate)", "merge", "score the candidate (gate)", "save")


class ConsolidationError(RuntimeError):
    pass


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


def _lora_deltas(ckpt: CheckpointInfo) -> tuple[dict[str, tuple[Any, Any]], float]:
    """``{module name in the base: (A, B)}`` of the checkpoint's adapter and its scale (alpha / r, or rsLoRA's)."""
    import math

    from safetensors.torch import load_file

    conf = json.loads((ckpt.path / "adapter_config.json").read_text())
    r, alpha = conf["r"], conf["lora_alpha"]
    scale = alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in load_file(str(ckpt.path / "adapter_model.safetensors")).items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module = key.split(marker)[0].removeprefix("base_model.model.")
                pairs.setdefault(module, {})[part] = tensor
    return {m: (p["lora_A"], p["lora_B"]) for m, p in pairs.items()}, scale


def _quantized_linears(base_path: str) -> set[str]:
    """Weights bitsandbytes turns to 4-bit when this base is loaded so: every Linear but the output layer."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_path))
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def merge_layerwise(base_path: str, ckpt: CheckpointInfo, out: Path, dtype: torch.dtype,
                    stages: Progress | None = None, requantize: dict[str, Any] | None = None) -> None:
    """Base + adapter merged into ``out`` one stored tensor at a time: never a full-precision model in memory.

    Reads the base's safetensors shards as stored (NF4 weights with their quantization state, or
    plain tensors), dequantizes each 4-bit weight with bitsandbytes (the same function its layers
    compute with), adds ``scale * B @ A`` in fp32 where the adapter has the module, casts to
    ``dtype`` and writes it to the matching output shard. Peak memory: one input shard plus one
    dequantized matrix. The config is the base's without its ``quantization_config``.

    ``requantize`` (``quant_type``, ``double_quant``, ``dtype``): the base is stored in full precision
    but was trained in 4-bit; each weight the 4-bit loader quantizes goes through the same NF4
    round trip first, so the merge equals what was trained.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = Path(base_path)
    index = src / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    deltas, scale = _lora_deltas(ckpt)
    roundtrip = _quantized_linears(base_path) if requantize else set()
    used: set[str] = set()
    weight_map: dict[str, str] = {}
    total = 0
    layers = Progress("merge, layer by layer", len(shards), "shards",
                      should_stop=stages.should_stop if stages else None)
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        merged: dict[str, Any] = {}
        with safe_open(str(src / shard), framework="pt") as f:
            keys = set(f.keys())
            for key in sorted(keys):
                if ".weight." in key:  # a 4-bit weight's quantization state: read with its weight
                    continue
                tensor = f.get_tensor(key)
                state = {k.removeprefix(key + "."): f.get_tensor(k) for k in keys if k.startswith(key + ".")}
                if state:
                    from bitsandbytes.functional import QuantState, dequantize_4bit

                    tensor = dequantize_4bit(tensor, QuantState.from_dict(state, device=torch.device("cpu")))
                elif key in roundtrip:
                    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

                    q, qs = quantize_4bit(tensor.to(requantize["dtype"]), blocksize=64, quant_type=requantize["quant_type"],
                                          compress_statistics=requantize["double_quant"])
                    tensor = dequantize_4bit(q, qs)
                module = key.removesuffix(".weight")
                if key.endswith(".weight") and module in deltas:
                    a, b = deltas[module]
                    tensor = (tensor.float() + scale * (b.float() @ a.float())).to(dtype)
                    used.add(module)
                merged[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        save_file(merged, str(out / name), metadata={"format": "pt"})
        for key, t in merged.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
        del merged
        layers.advance()
        layers.check()
    missing = sorted(set(deltas) - used)
    if missing:
        raise ConsolidationError(f"the adapter of {ckpt.path.name} has modules the base has no weight for: "
                                 f"{', '.join(missing[:3])}")
    atomic_write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                            "weight_map": weight_map})
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["use_cache"] = True
    atomic_write_json(out / "config.json", config)
    if (src / "generation_config.json").is_file():
        shutil.copy2(src / "generation_config.json", out / "generation_config.json")


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
                should_stop: Callable[[], bool] | None = None, layerwise: bool | None = None) -> tuple[Path, bool]:
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
    training computed them, and ``merge_layerwise`` writes the merge one tensor at a time.
    """
    current = current_checkpoints(cfg.path("checkpoints"), cfg.path("models"))
    ckpt = checkpoint or (current[-1] if current else None)
    if ckpt is None:
        raise ConsolidationError(f"no complete checkpoint in {cfg.path('checkpoints')}: nothing to consolidate")
    t0 = time.monotonic()
    log.info("merging %s (global step %d) into its base", ckpt.path.name, ckpt.global_step)
    stages = Progress("consolidation", len(STAGES), "stages", should_stop=should_stop, log_every=0.0)
    gate = Gate(cfg, ckpt, trained or [], should_stop) if cfg.consolidation.gate else None
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
            merge_layerwise(base_path, ckpt, tmp, _merged_dtype(device), stages, requantize)
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
                 should_stop: Callable[[], bool] | None = None):
        from ultimate_trainer.model.loading import load_tokenizer, resolve_base
        from ultimate_trainer.trainer.consolidation import gate

        self.cfg, self.gate, self.should_stop = cfg, gate, should_stop
        self.inputs = gate.gate_inputs(cfg, trained)
        self.tokenizer = load_tokenizer(str(ckpt.marker.base_model or resolve_base(cfg)))
        self.base: dict[str, Any] = {}

    def _progress(self, what: str) -> Progress:
        n = len(self.inputs.examples) + (len(self.inputs.probe.items) if self.inputs.probe else 0)
        return Progress(f"gate: {what}", n, "prompts", should_stop=self.should_stop)

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
    try:
        _, adopted = consolidate(cfg, ckpt, files, trained=trained, should_stop=stop.is_set)
    except ConsolidationError as e:
        log.error("%s", e)
        return Exit.CRASH
    except Stopped as e:
        log.warning("consolidation stopped (%s); nothing written, the current base stays", e)
        return STOPPED
    return Exit.OK if adopted else Exit.REFUSED


if __name__ == "__main__":
    raise SystemExit(main())
