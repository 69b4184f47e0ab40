"""Durable step outputs: `<storage>/<run_id>/steps/<step>/`, on a local disk or any pyarrow.fs URI.

A step's directory holds its files (record.json; for steps that change the model or the
method, a checkpoint: adapter.safetensors, state.safetensors, state.json) and, written LAST,
a `_COMPLETE` marker. A step without the marker is unfinished: `--resume` deletes and reruns
it, so a half-written step is never read. This one rule serves local paths and object stores
(S3 / GCS via `pyarrow.fs`), which have no atomic directory rename.

Every execution of a step is appended to `steps/_executions.jsonl` (what a resume test counts).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pyarrow.fs as pafs
import torch

MARKER = "_COMPLETE"


def open_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI (s3://, gs://, file://, ...)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    import os

    return pafs.LocalFileSystem(), os.path.abspath(uri)


class StepStore:
    def __init__(self, root_uri: str) -> None:
        self.uri = root_uri
        self.fs, self.root = open_fs(root_uri)
        self.fs.create_dir(self.root, recursive=True)

    def _p(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def done(self, step: str) -> bool:
        return self.fs.get_file_info(self._p(step, MARKER)).type == pafs.FileType.File

    def read(self, step: str, name: str) -> bytes:
        if not self.done(step):
            raise FileNotFoundError(f"step {step!r} is not finished (no {MARKER} in {self._p(step)})")
        with self.fs.open_input_stream(self._p(step, name)) as f:
            return f.read()

    def has(self, step: str, name: str) -> bool:
        return self.fs.get_file_info(self._p(step, name)).type == pafs.FileType.File

    def record(self, step: str) -> dict[str, Any]:
        return json.loads(self.read(step, "record.json"))

    def write(self, step: str, files: dict[str, bytes]) -> None:
        """Write a step's files, then its marker. Leftovers of an unfinished attempt go first."""
        d = self._p(step)
        if self.fs.get_file_info(d).type != pafs.FileType.NotFound:
            self.fs.delete_dir(d)
        self.fs.create_dir(d, recursive=True)
        for name, data in files.items():
            with self.fs.open_output_stream(f"{d}/{name}") as f:
                f.write(data)
        with self.fs.open_output_stream(f"{d}/{MARKER}") as f:
            f.write(json.dumps({"finished": time.time()}).encode())

    def log_execution(self, step: str) -> None:
        path = self._p("_executions.jsonl")
        old = b""
        if self.fs.get_file_info(path).type == pafs.FileType.File:
            with self.fs.open_input_stream(path) as f:
                old = f.read()
        with self.fs.open_output_stream(path) as f:  # object stores have no append
            f.write(old + (json.dumps({"step": step, "time": time.time()}) + "\n").encode())

    def executions(self) -> list[str]:
        path = self._p("_executions.jsonl")
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return []
        with self.fs.open_input_stream(path) as f:
            return [json.loads(line)["step"] for line in f.read().decode().splitlines() if line.strip()]


# ---- (de)serialising a method's state: tensors -> safetensors, the rest -> JSON -------------

def pack_state(state: dict[str, Any]) -> tuple[bytes, bytes]:
    """Split a nested state into (safetensors bytes, JSON bytes); tensors become {"__tensor__": key}."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(node, dict):
            return {str(k): walk(v, f"{path}/{k}") for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(node)]
        return node

    tree = walk(state, "")
    return save(tensors) if tensors else b"", json.dumps(tree, default=float).encode()


def unpack_state(tensor_bytes: bytes, json_bytes: bytes) -> dict[str, Any]:
    from safetensors.torch import load

    tensors = load(tensor_bytes) if tensor_bytes else {}

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {"__tensor__"}:
                return tensors[node["__tensor__"]]
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(json.loads(json_bytes))


def adapter_bytes(model, adapter: str = "default") -> bytes:
    """The trainable adapter's tensors (peft names without the adapter suffix) as safetensors."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save

    sd = get_peft_model_state_dict(model, adapter_name=adapter)
    return save({k: v.detach().cpu().contiguous() for k, v in sd.items()})


def load_adapter_bytes(model, data: bytes, adapter: str = "default") -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load

    res = set_peft_model_state_dict(model, load(data), adapter_name=adapter)
    bad = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
    if bad:
        raise ValueError(f"adapter checkpoint does not fit the model: unexpected keys {bad[:3]}")
