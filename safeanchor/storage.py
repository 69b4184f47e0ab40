"""Where a run's files live: one `RunDir` object, on any `pyarrow.fs` filesystem.

Every artefact of a run — config.yaml, steps/, adapters/, subspaces/, metrics.jsonl,
summary.json, trajectory.png, Ray Train checkpoints (ray/) — is written through a `RunDir`,
so `--storage` may be any location `pyarrow.fs` understands:

    runs                      a local path (relative to the current directory)
    /abs/dir, file:///abs/dir a local path; on a cluster, a path every node mounts (NFS)
    s3://bucket/prefix        S3 (pyarrow's S3FileSystem: credentials as boto / the AWS CLI)
    gs://bucket/prefix        Google Cloud Storage
    hdfs://host:port/path     HDFS (needs a JVM and libhdfs)

or, from Python, a `pyarrow.fs.FileSystem` object (e.g. a `SubTreeFileSystem`) with a path
inside it, as Ray Train's `RunConfig(storage_filesystem=...)` takes one.

Writes are atomic: a file is written under a temporary name next to its destination and then
moved over it. On a local or NFS disk the move is a rename (atomic); on an object store it is a
server-side copy, and an object only ever appears whole. A reader therefore sees the old or the
new file, never a half-written one (`steps/` adds a completion marker on top; see
`safeanchor.pipeline.store`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from safeanchor.config import ConfigError

__all__ = ["SUPPORTED", "RunDir", "open_storage"]

#: what README and error messages say --storage accepts
SUPPORTED = "a local path, file:///abs/path, s3://bucket/path, gs://bucket/path or hdfs://host/path"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def open_storage(storage: str, filesystem: pafs.FileSystem | None = None,
                 key: str = "storage") -> tuple[pafs.FileSystem, str, str | None]:
    """(filesystem, path inside it, URI prefix or None) for a storage location.

    The URI prefix ("s3://", "gs://", ...) is what turns a path back into a URI that Ray Train
    and MLflow accept; None for local disks and for a caller's own filesystem object."""
    if filesystem is not None:
        return filesystem, storage.rstrip("/") or "/", None
    storage = str(storage)
    if not storage.strip():
        raise ConfigError(key, f"must not be empty ({SUPPORTED})")
    if "://" not in storage:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(storage)), None
    try:
        fs, path = pafs.FileSystem.from_uri(storage)
    except Exception as e:  # ArrowInvalid (unknown scheme, bad URI), OSError (no JVM, no network)
        raise ConfigError(key, f"{storage!r}: {_first_line(e)} (supported: {SUPPORTED})") from None
    if isinstance(fs, pafs.LocalFileSystem):
        return fs, path, None
    return fs, path.rstrip("/"), storage.split("://", 1)[0] + "://"


class RunDir:
    """A directory on a pyarrow filesystem; names are '/'-separated paths relative to it."""

    def __init__(self, fs: pafs.FileSystem, root: str, scheme: str | None = None) -> None:
        self.fs, self.root, self.scheme = fs, root.rstrip("/") or "/", scheme

    @classmethod
    def open(cls, storage: str, *parts: str, filesystem: pafs.FileSystem | None = None,
             key: str = "storage") -> RunDir:
        """`storage` (a path or URI, see the module docstring) joined with `parts`."""
        fs, path, scheme = open_storage(storage, filesystem, key)
        return cls(fs, path, scheme).sub(*parts)

    # -- names ------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """The filesystem path of a name (what `self.fs` takes)."""
        tail = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
        if not tail:
            return self.root
        return f"{self.root}/{tail}" if self.root != "/" else f"/{tail}"

    def sub(self, *parts: str) -> RunDir:
        return RunDir(self.fs, self.path(*parts), self.scheme)

    def uri(self, *parts: str) -> str:
        """A location other tools accept: a local path, or scheme://bucket/key for object stores."""
        local = self.local_path(*parts)
        if local is not None:
            return str(local)
        return (self.scheme or "") + self.path(*parts)

    def local_path(self, *parts: str) -> Path | None:
        """The path on this machine's disk, or None when the files are not on a local disk."""
        fs, path = self.fs, self.path(*parts)
        if isinstance(fs, pafs.SubTreeFileSystem):
            base = fs.base_fs
            if not isinstance(base, pafs.LocalFileSystem):
                return None
            return Path(fs.base_path.rstrip("/") + "/" + path.lstrip("/"))
        return Path(path) if isinstance(fs, pafs.LocalFileSystem) else None

    def ray_filesystem(self) -> pafs.FileSystem | None:
        """What Ray Train's RunConfig(storage_filesystem=...) needs next to `uri()` as its
        storage_path: None where `uri()` says it all (local paths, s3:// etc.), else the
        caller's own filesystem object."""
        if self.local_path() is not None or self.scheme is not None:
            return None
        return self.fs

    def __str__(self) -> str:
        return self.uri()

    def __repr__(self) -> str:
        return f"RunDir({self.uri()!r})"

    # -- reading -----------------------------------------------------------------------------
    def _type(self, name: str) -> pafs.FileType:
        return self.fs.get_file_info(self.path(name)).type

    def is_file(self, name: str) -> bool:
        return self._type(name) == pafs.FileType.File

    def is_dir(self, name: str = "") -> bool:
        return self._type(name) == pafs.FileType.Directory

    def exists(self, name: str = "") -> bool:
        return self._type(name) != pafs.FileType.NotFound

    def read_bytes(self, name: str) -> bytes:
        path = self.path(name)
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri(name)} does not exist") from None

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def list(self, name: str = "", recursive: bool = False) -> list[str]:
        """Files under `name`, as names relative to it (sorted); [] if it does not exist."""
        base = self.path(name)
        if self.fs.get_file_info(base).type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=recursive))
        return sorted(i.path[len(base):].lstrip("/") for i in infos if i.type == pafs.FileType.File)

    def dirs(self, name: str = "") -> list[str]:
        """Names of the directories directly under `name` (sorted); [] if it does not exist."""
        base = self.path(name)
        if self.fs.get_file_info(base).type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=False))
        return sorted(i.path[len(base):].strip("/") for i in infos if i.type == pafs.FileType.Directory)

    # -- writing (atomic) --------------------------------------------------------------------
    def mkdir(self, name: str = "") -> None:
        self.fs.create_dir(self.path(name), recursive=True)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a file atomically: a temporary name next to it, then a move over it."""
        dst = self.path(name)
        parent, _, base = dst.rpartition("/")
        parent = parent or "/"
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent.rstrip('/')}/.{base}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, dst)
        except BaseException:
            if self.fs.get_file_info(tmp).type == pafs.FileType.File:
                self.fs.delete_file(tmp)
            raise

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, json.dumps(obj, indent=2, default=float))

    def append_line(self, name: str, line: str) -> None:
        """Add one line to a text file: the whole file is rewritten atomically (object stores
        have no append, and a crash mid-append would leave a torn last line)."""
        old = self.read_bytes(name) if self.is_file(name) else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        self.write_bytes(name, old + line.rstrip("\n").encode("utf-8") + b"\n")

    def put_dir(self, local_dir: str | Path, name: str) -> None:
        """Copy a local directory's files to `name` (each written atomically), replacing it."""
        local_dir = Path(local_dir)
        self.delete(name)
        for f in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            self.write_bytes(f"{name}/{f.relative_to(local_dir).as_posix()}", f.read_bytes())

    def delete(self, name: str) -> None:
        """Delete a file or a directory tree; nothing if it does not exist."""
        path, t = self.path(name), self._type(name)
        if t == pafs.FileType.Directory:
            self.fs.delete_dir(path)
        elif t == pafs.FileType.File:
            self.fs.delete_file(path)

    @contextmanager
    def staged(self, name: str) -> Iterator[Path]:
        """A local scratch directory for tools that only write to local disks (peft's
        save_pretrained, matplotlib); its files are copied to `name` when the block ends."""
        tmp = Path(tempfile.mkdtemp(prefix="safeanchor-"))
        try:
            yield tmp
            self.put_dir(tmp, name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @contextmanager
    def local_copy(self, name: str) -> Iterator[Path]:
        """A local path holding the file or directory `name`, for tools that only read local
        disks (MLflow's log_artifact, peft's from_pretrained): the file itself on a local disk,
        else a temporary download removed when the block ends."""
        local = self.local_path(name)
        if local is not None:
            if not local.exists():
                raise FileNotFoundError(f"{self.uri(name)} does not exist")
            yield local
            return
        tmp = Path(tempfile.mkdtemp(prefix="safeanchor-"))
        try:
            target = tmp / name.rstrip("/").rpartition("/")[2]
            if self.is_file(name):
                target.write_bytes(self.read_bytes(name))
            elif self.is_dir(name):
                for rel in self.list(name, recursive=True):
                    (target / rel).parent.mkdir(parents=True, exist_ok=True)
                    (target / rel).write_bytes(self.read_bytes(f"{name}/{rel}"))
            else:
                raise FileNotFoundError(f"{self.uri(name)} does not exist")
            yield target
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def check_writable(self, key: str = "storage") -> None:
        """Create the directory and write / delete a probe file; a one-line ConfigError if not."""
        probe = f".write-test-{uuid.uuid4().hex[:8]}"
        try:
            self.mkdir()
            if not self.is_dir():
                raise NotADirectoryError(f"{self.uri()} is not a directory")
            self.write_bytes(probe, b"")
            self.delete(probe)
        except (OSError, ValueError) as e:  # pyarrow raises OSError subclasses / ArrowInvalid
            raise ConfigError(key, f"cannot write to {self.uri()}: {_first_line(e)}") from None
