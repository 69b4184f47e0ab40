"""Small helpers: the temp-dir-then-rename caches (toy world, aligned models, GGUF conversions)
and `machine()`, the hardware a figure was computed on."""

from __future__ import annotations

import os
import platform
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


def machine() -> dict[str, object]:
    """The hardware and kernels a result was computed on, saved beside it (summary.json, the
    toy world's report.json). Float rounding depends on them: torch and MKL pick their CPU
    kernels by the instruction set (`cpu_capability`: AVX2, AVX512, ...) and reduce in an order
    that depends on the thread count, so a toy world built on another kind of CPU is a different
    (equally valid) world, and a run's figures match earlier ones exactly only on the same kind."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    out: dict[str, object] = {
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cuda"] = torch.version.cuda
    return out
