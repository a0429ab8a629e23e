#!/usr/bin/env python3
"""Memory/GPU stats API on http://127.0.0.1:8081/api/memory_stats (reads status/ only). See docs/MONITORING.md."""

import sys

from ultimate_trainer.web.stats_api import main

if __name__ == "__main__":
    sys.exit(main())
