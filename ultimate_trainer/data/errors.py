"""The one exception of the reader: a line (or array item) that cannot be used, and why."""

from __future__ import annotations


class BadLine(ValueError):
    """A line that cannot be used; ``str(exc)`` is the one-line reason shown in the report."""
