"""The ground floor every process stands on; it imports nothing above it.

- ``config``      typed configuration (``config.json`` + ``--set``), validated as a whole
- ``logs``        the one log format of every entry point
- ``status``      the files in ``status/``: names, atomic writes, JSONL history, safe reads
- ``times``       the ``*_at`` time format and its parser
- ``exitcodes``   what a trainer's exit code means to the daemon
- ``checkpoints`` complete-or-absent checkpoints, their marker keys, "is this run complete", the start point
- ``lineage``     which input files went into which checkpoint or consolidation
- ``hosts``       the loopback Host-header rule every server applies; is_loopback
- ``wsgi``        a WSGI app on waitress until Ctrl-C or SIGTERM (the Flask servers, serve.py)
- ``threads``     the CPU thread policy of a trainer sharing its cores
"""
