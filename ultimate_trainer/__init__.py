"""Ultimate Trainer: continuous QLoRA fine-tuning fed from an inbox folder.

Modules (each named for what it does):

- ``config``      typed configuration loaded from ``config.json`` (+ ``--set`` overrides)
- ``status``      the files in ``status/``: atomic writes, history logs, safe reads (the process contract)
- ``data``        JSONL formats, bad-line reports, held-out split, streaming tokenization
- ``model``       base model resolution (built-in GGUF, local dir, Hub cache), 4-bit loading, LoRA
- ``checkpoints`` complete-or-absent checkpoints and the choice of where to resume
- ``evaluation``  answer matchers, accuracy windows and trends, greedy generation
- ``training``    one training run: setup, resume, train with eval/save callbacks, final save
- ``inbox``       the spool: flattening, stable-file intake, journal
- ``daemon``      the long-running supervisor that feeds ``train.py``
- ``consolidation`` daily merge of the adapter into the base
- ``stats``       RAM/GPU sampling and OOM risk
- ``web``         the Flask apps behind ports 8080 and 8081

Importing the package is cheap: nothing here imports torch; modules that need it import it themselves.
"""

__version__ = "0.1.0"
