#!/usr/bin/env python3
"""Model workbench on http://127.0.0.1:8082/: chat with and compare checkpoints, evaluate them,
the history per skill and file, and each model's lineage. See docs/WORKBENCH.md."""

import sys

from ultimate_trainer.workbench.app import main

if __name__ == "__main__":
    sys.exit(main())
