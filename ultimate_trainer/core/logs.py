"""The one log format of every entry point: timestamped lines on stderr."""

from __future__ import annotations

import logging
import warnings


def setup_logging(level: int | str = logging.INFO, prefix: str = "") -> None:
    """``prefix`` tells processes apart that share one stderr (``[rank 1] ``)."""
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)-7s {prefix}%(name)s: %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S")
    # Library chatter that says nothing to a user watching a run: bitsandbytes' note that an optional
    # CPU kernel package is absent, transformers' tensor-parallel plan check on a single device.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("transformers.distributed.tensor_parallel").setLevel(logging.ERROR)
    for name in ("httpx", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
