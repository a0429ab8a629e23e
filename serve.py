#!/usr/bin/env python3
"""OpenAI-compatible API on http://127.0.0.1:8083/v1 over the trained models (default: the newest
adopted consolidation). See docs/SERVING.md."""

import sys

from ultimate_trainer.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
