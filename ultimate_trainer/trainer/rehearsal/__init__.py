"""Rehearsal: the base's own answers to general prompts, mixed into each run so it keeps its manners.

- ``prompts.py``: the prompts, the answers' cache, how many a run gets and which (no torch);
- ``answers.py``: the base model answering them (the worker's loaded model, or the base loaded for it).
"""
