"""Small filesystem helpers shared by the caches (toy world, aligned models, GGUF conversions)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(final: str | Path, mode: int | None = 0o755) -> Iterator[Path]:
    """Build a directory in a temporary sibling of `final`, then rename it into place.

    Yields the temporary directory (`.<name>.XXXX` in `final`'s parent, created with the parent
    if needed; same filesystem, so the rename is atomic). When the block ends normally, whatever
    is at `final` (an incomplete earlier attempt, or a complete one that another process renamed
    there in the meantime) is removed and the temporary directory takes its place: the last
    finisher wins, and readers never see a half-written directory. When the block raises
    (KeyboardInterrupt included), the temporary directory is removed and `final` is left as it was.

    `mode`: permissions of the directory (mkdtemp makes it private, 0o700; a shared cache should
    stay readable); None keeps mkdtemp's.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
