#!/usr/bin/env python3
"""Live training monitor on http://127.0.0.1:8080/ (reads status/ only). See docs/MONITORING.md."""

import sys

from ultimate_trainer.web.monitor import main

if __name__ == "__main__":
    sys.exit(main())
