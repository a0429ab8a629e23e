"""``train.py --tune FILES``: a short, bounded search over learning rate x LoRA rank (docs/TUNING.md).

- ``report.py``: the candidates, their results, the rule that picks the best, the table and the
  JSON report (no torch);
- ``scratch.py``: the search's scratch folder under ``paths.work``, and the sweep of a crashed one;
- ``search.py``: the search itself: one start point, the files' held-out slice, each candidate
  trained for a few dozen steps and scored on that slice and on the probe.
"""
