"""kvtier's logger setup: one stderr handler on the "kvtier" logger, level from KVTIER_LOG_LEVEL (INFO).

vLLM configures only its own "vllm" logger, so without this kvtier's INFO lines (load failures, restored
blocks, layouts) would be dropped in the engine and worker processes.
"""

from __future__ import annotations

import logging
import os


def setup_logging() -> logging.Logger:
    logger = logging.getLogger("kvtier")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("(kvtier pid=%(process)d) %(levelname)s %(asctime)s %(message)s",
                                               datefmt="%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("KVTIER_LOG_LEVEL", "INFO").upper())
        logger.propagate = False
    return logger
