"""What a long-lived trainer keeps loaded from one run to the next: the tokenizer and the model.

A run done by ``train.py`` loads both, trains and exits. The worker (``trainer/worker.py``) hands
every run the same ``Session``; the run's phases ask it for the tokenizer and the model instead of
loading them, and it reloads only when what it holds is not what the run starts from:

- another base (after a consolidation, or ``base_model`` changed): tokenizer and model;
- a start point that is not a checkpoint (the very first run, the first run after a consolidation):
  a fresh adapter is needed, so the model is loaded as ``train.py`` would;
- a model setting changed (``load_in_4bit``, ``quantization``, the device, gradient checkpointing,
  the LoRA modules or dropout) or the checkpoint's adapter has another shape than the one held.

Otherwise the model object is reused as it is: the Trainer of the next run loads the checkpoint's
adapter weights into it (``load_adapter``), and the optimizer, scheduler and RNG state from the
checkpoint's files, exactly as a fresh ``train.py`` does after loading; so a run gives the same
result either way (tests/trainer/test_worker.py checks it).
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ultimate_trainer.core.config import Config

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def model_key(cfg: Config, base_path: str) -> str:
    """The settings a loaded model depends on; a change means loading it again."""
    t, q = cfg.training, cfg.quantization
    return json.dumps({"base": str(base_path), "4bit": cfg.load_in_4bit, "quant": [q.quant_type, q.double_quant,
                       q.compute_dtype], "device": t.device, "gc": t.gradient_checkpointing,
                       "lora": [sorted(cfg.lora.target_modules), cfg.lora.dropout]}, sort_keys=True)


def adapter_shape(checkpoint: Path | None, cfg: Config) -> tuple[int, float]:
    """``(r, alpha)`` of the adapter a run resumes (from its checkpoint), or of a fresh one (from cfg)."""
    if checkpoint is not None:
        saved = json.loads((Path(checkpoint) / "adapter_config.json").read_text())
        return int(saved.get("r", 0)), float(saved.get("lora_alpha", 0))
    return cfg.lora.r, float(cfg.lora.alpha)


@dataclass
class Session:
    """The loaded parts one worker carries from run to run."""

    base_path: str = ""
    tokenizer: PreTrainedTokenizerBase | None = None
    model: PeftModel | None = None  # base + adapter
    device: str = "cpu"
    key: str = ""
    shape: tuple[int, float] | None = None
    pristine: bool = False  # a fresh adapter nothing has trained yet: it serves a run that starts fresh
    loads: list[str] = field(default_factory=list)  # why each model load happened, for logs and tests

    def tokenizer_for(self, base_path: str) -> PreTrainedTokenizerBase:
        from ultimate_trainer.model.loading import load_tokenizer

        if self.tokenizer is None or self.base_path != base_path:
            self.drop()
            self.tokenizer, self.base_path = load_tokenizer(base_path), base_path
        return self.tokenizer

    def reusable(self, cfg: Config, base_path: str, start_kind: str, checkpoint: Path | None) -> str | None:
        """None when the held model can serve this run; else why it must be loaded."""
        if self.model is None:
            return "nothing loaded yet"
        if start_kind != "checkpoint" and not (start_kind == "fresh" and self.pristine):
            return f"the run starts from a {start_kind} point (a fresh adapter)"
        if self.key != model_key(cfg, base_path):
            return "the base or a model setting changed"
        if self.shape != adapter_shape(checkpoint, cfg):
            return "the checkpoint's adapter has another shape"
        return None

    def hold(self, cfg: Config, base_path: str, model: PeftModel, device: str, checkpoint: Path | None, why: str) -> None:
        self.model, self.device, self.key = model, device, model_key(cfg, base_path)
        self.shape = adapter_shape(checkpoint, cfg)
        self.pristine = checkpoint is None
        self.loads.append(why)

    def training(self) -> None:
        """A run starts training the held model: its adapter is no longer a fresh one."""
        self.pristine = False

    def drop(self) -> None:
        """Forget the model (a failed run may have left it half-updated; a new base replaces it)."""
        if self.model is None:
            return
        self.model, self.key, self.shape, self.pristine = None, "", None, False
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is there whenever a model was
            pass
