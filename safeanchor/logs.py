"""Console and file output of the pipeline, through the standard `logging` module.

Every module logs with its own `logging.getLogger(__name__)`, all under the "safeanchor" logger.
A library user configures logging as for any library (nothing is printed until they do, apart
from warnings). The workflows call `setup()` once, which prints INFO records as plain lines on
stdout; on a distributed worker only rank 0 prints (the others would repeat its lines).
`to_file(path)` sends the records to a file for a while (a comparison cell's log).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = "safeanchor"
_MARK = "_safeanchor_handler"


def _rank() -> int:
    """This process's rank in a torch.distributed group (0 outside one)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except (ImportError, RuntimeError):
        pass
    return int(os.environ.get("RANK", "0") or 0)


class RankZero(logging.Filter):
    """Passes records on rank 0 only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _rank() == 0


def setup(level: int = logging.INFO, stream=None) -> logging.Handler:
    """Plain lines on stdout (or `stream`) for the "safeanchor" loggers, rank 0 only; idempotent:
    a second call replaces the handler the first one added."""
    logger = logging.getLogger(ROOT)
    for h in list(logger.handlers):
        if getattr(h, _MARK, False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(RankZero())
    setattr(handler, _MARK, True)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # a host's root handlers (Ray's, a notebook's) would print each line again
    return handler


@contextmanager
def to_file(path: str | Path, console: bool = False) -> Iterator[None]:
    """Append the "safeanchor" records to `path` while the block runs; `console`: keep the
    console handler too (default: the file alone, e.g. a comparison cell on a shared driver)."""
    logger = logging.getLogger(ROOT)
    old = (list(logger.handlers), logger.level, logger.propagate)
    if not console:
        for h in old[0]:
            logger.removeHandler(h)
    fh = logging.FileHandler(path, mode="a", encoding="utf-8")
    fh.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(fh)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(fh)
        fh.close()
        for h in old[0]:
            if h not in logger.handlers:
                logger.addHandler(h)
        logger.setLevel(old[1])
        logger.propagate = old[2]
