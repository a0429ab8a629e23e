"""Ultimate Trainer: continuous QLoRA fine-tuning fed from an inbox folder.

One sub-package per process, over a shared ground floor (docs/ARCHITECTURE.md)::

    core/      config, logging, the status-file contract (atomic writes, history, exit codes,
               times) and checkpoints: used by every process, imports nothing above it
    data/      JSONL formats, loss masking, the streamed token store, sample data
    model/     base model loading (built-in GGUF, local folder, Hub cache; 4-bit; LoRA), scoring
    trainer/   the train.py process: one run as a recipe, its Trainer callbacks, the daily merge
    daemon/    the daemon.py process: inbox, spool, journal, the trainer child, consolidation timing
    web/       monitor_server.py (:8080) and memory_stats_api.py (:8081)
    workbench/ workbench.py (:8082): chat with, compare and evaluate checkpoints; lineage
    demo.py    make demo

Imports run downward only (pyproject.toml, tests/test_architecture.py). Importing the package
is cheap: ``core``, ``daemon`` and ``web`` never import torch.
"""

__version__ = "0.2.0"
