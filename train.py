#!/usr/bin/env python3
"""Fine-tune the model on JSONL files, continuing from the last checkpoint.

    python train.py FILE.jsonl [FILE ...] [--config PATH] [--set KEY=VALUE ...] [--max-steps N] [--dry-run]
    python train.py --lineage [CHECKPOINT | CONSOLIDATION | FILE | all]
    python train.py --tune FILE.jsonl [FILE ...] [--lrs LR,...] [--ranks R,...] [--steps N] [--budget S] [--write-config PATH]

Exit codes: 0 trained (or stopped cleanly), 1 failure, 2 configuration, 3 data, 4 model (docs/STATUS.md).
"""

import sys

from ultimate_trainer.trainer.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
