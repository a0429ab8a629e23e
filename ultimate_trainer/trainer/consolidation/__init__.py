"""The daily merge of the adapter into the base, gated (the daemon decides when: daemon/consolidation.py).

    python -m ultimate_trainer.trainer.consolidation [--checkpoint DIR] [--files-json F] [--config ...]

- ``merge.py``: merge the newest adapter into its base, write ``models/consolidated/<time>/``;
- ``gate.py``: score the base and the merged candidate on held-out prompts and the probe; adopt or refuse.
"""
