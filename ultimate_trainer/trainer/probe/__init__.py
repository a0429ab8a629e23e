"""The base-knowledge probe: how much of what the base knew a training run keeps (the forgetting guard).

- ``questions.py``: the probe file, questions with checkable answers (no torch);
- ``scoring.py``: a model scored on the probe, and on held-out examples (the merge gate uses both);
- ``callback.py``: the probe while training (a Trainer callback): the baseline, retention, its trend.
"""
