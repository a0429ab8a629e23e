"""The model workbench (``workbench.py``, port 8082): chat with and compare checkpoints, evaluate
them side by side, browse the training history per skill and file, and trace each model's lineage.

It reads checkpoints, consolidations and ``status/`` and writes only its own result cache and the
page's uploads (both under ``<paths.work>/workbench/``; guard.py says what may come in). Torch is
imported when a model is first asked for, never at start.
"""
