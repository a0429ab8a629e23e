"""``python -m ultimate_trainer.trainer.consolidation``: the merge child the daemon starts (merge.py)."""

from ultimate_trainer.trainer.consolidation.merge import main

if __name__ == "__main__":
    raise SystemExit(main())
