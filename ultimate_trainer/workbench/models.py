"""Which models the workbench offers, and the pool that loads them.

A model key is ``base`` (the configured base model), ``latest`` (whatever training would continue
from now), ``adopted`` (the newest consolidation the gate accepted), a checkpoint folder name
(``checkpoint-120``) or ``consolidated/<name>``: resolved by ``core/checkpoints.resolve_model``, the
same resolution ``export.py`` and ``serve.py`` use. Loading and the one-generation-at-a-time rule
live in ``model/pool.py``.
"""

from __future__ import annotations

from ultimate_trainer.core import checkpoints as ck
from ultimate_trainer.core.checkpoints import ADOPTED, BASE, CONSOLIDATED, LATEST, ModelSpec
from ultimate_trainer.core.config import Config
from ultimate_trainer.model.pool import Loaded, ModelPool, resolve

__all__ = ["ADOPTED", "BASE", "CONSOLIDATED", "LATEST", "Loaded", "ModelPool", "ModelSpec", "choices", "resolve"]


def choices(cfg: Config) -> list[tuple[str, str]]:
    """``(label, key)`` pairs for the model pickers: base, latest, then checkpoints and consolidations, newest first."""
    out = [(f"base model ({cfg.base_model})", BASE), ("latest (follows new checkpoints)", LATEST)]
    for c in reversed(ck.list_complete(cfg.path("checkpoints"))):
        out.append((f"{c.name} (step {c.global_step})", c.name))
    for c in reversed(ck.list_consolidations(cfg.path("models"))):
        out.append((f"consolidated {c.path.name} (step {c.global_step})", CONSOLIDATED + c.path.name))
    return out
