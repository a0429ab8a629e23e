"""Train continuously on whatever lands in inbox/: ``python daemon.py [--once] [--consolidate-now] [--stop]``.

See docs/DAEMON.md.
"""

import sys

from ultimate_trainer.daemon.cli import main

if __name__ == "__main__":
    sys.exit(main())
