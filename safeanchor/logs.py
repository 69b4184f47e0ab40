"""Console and file output of the pipeline, through the standard `logging` module.

Every module logs with its own `logging.getLogger(__name__)`, all under the "safeanchor" logger:
progress lines at INFO, problems at WARNING. A library user configures logging as for any
library: nothing is printed until they do, apart from warnings (Python's last-resort handler).
To see the progress lines as the workflows print them, call `setup()`.

`setup()` (the workflows call it once, at the start of main(); so do a Ray Train worker and a Ray
Tune trial): INFO records of the "safeanchor" loggers as plain lines ("%(message)s") on stdout;
in a distributed group only rank 0 prints (the other ranks would repeat its lines). The
"safeanchor" logger then stops propagating to the root logger: a host's root handlers (Ray
Train's worker console handler, a notebook's) would print every line a second time.

`to_file(path)` sends the records to a file while a block runs (a comparison cell's log);
`to_handler(handler)` to any handler. `quiet(name)` drops a logger's INFO records for a block.

`reset()` undoes `setup()`: no console handler, propagation to the root restored, level unset.
Tests rely on it: pytest's `caplog` listens on the ROOT logger, so a record of a non-propagating
"safeanchor" logger never reaches it; tests/conftest.py resets the "safeanchor" logger around
every test, so a test that ran a workflow's main() (which calls `setup()`) does not hide the
records of the tests after it.
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
FORMAT = "%(message)s"


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


class _Console(logging.StreamHandler):
    """A StreamHandler on `stream`, or on whatever sys.stdout is when a record is written (not
    the one at setup time: pytest's capture, a redirect_stdout block, Ray's worker streams)."""

    def __init__(self, stream=None) -> None:
        super().__init__()
        self._fixed = stream

    @property
    def stream(self):
        return self._fixed if self._fixed is not None else sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        self._fixed = value


def setup(level: int = logging.INFO, stream=None) -> logging.Handler:
    """Plain lines on stdout (or `stream`) for the "safeanchor" loggers, rank 0 only; idempotent:
    a second call replaces the handler the first one added (no line is printed twice)."""
    logger = logging.getLogger(ROOT)
    for h in list(logger.handlers):
        if getattr(h, _MARK, False):
            logger.removeHandler(h)
    handler = _Console(stream)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RankZero())
    setattr(handler, _MARK, True)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # a host's root handlers (Ray's, a notebook's) would print each line again
    return handler


def reset() -> None:
    """Undo `setup()`: the library defaults (no console handler of ours, records propagate to
    the root logger, level unset)."""
    logger = logging.getLogger(ROOT)
    for h in list(logger.handlers):
        if getattr(h, _MARK, False):
            logger.removeHandler(h)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


@contextmanager
def quiet(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """Drop the records below `level` of the loggers `names` (and their children) while the block
    runs: e.g. the training loop's progress lines inside a benchmark's timed steps."""
    loggers = [logging.getLogger(n) for n in names]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, old, strict=True):
            lg.setLevel(lv)


@contextmanager
def to_handler(handler: logging.Handler, console: bool = False) -> Iterator[None]:
    """Send the "safeanchor" INFO records to `handler` while the block runs (formatted as plain
    lines unless it has a formatter); `console`: keep the handlers already there too (default:
    `handler` alone, e.g. a comparison cell on a shared worker). Restores the logger afterwards
    (handlers, level, propagation); does not close `handler`."""
    logger = logging.getLogger(ROOT)
    old = (list(logger.handlers), logger.level, logger.propagate)
    if not console:
        for h in old[0]:
            logger.removeHandler(h)
    if handler.formatter is None:
        handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        for h in old[0]:
            if h not in logger.handlers:
                logger.addHandler(h)
        logger.setLevel(old[1])
        logger.propagate = old[2]


@contextmanager
def to_file(path: str | Path, console: bool = False) -> Iterator[None]:
    """Append the "safeanchor" records to the local file `path` (one line each, written as they
    come) while the block runs; `console` as in `to_handler`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(path, mode="a", encoding="utf-8")
    try:
        with to_handler(fh, console=console):
            yield
    finally:
        fh.close()
