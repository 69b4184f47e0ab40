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

import torch

from safeanchor.storage import RunDir

MARKER = "_COMPLETE"


class StepStore:
    """The `steps/` directory of a run, on any filesystem a `RunDir` reaches."""

    def __init__(self, root: RunDir) -> None:
        self.dir = root
        self.dir.mkdir()

    def done(self, step: str) -> bool:
        return self.dir.is_file(f"{step}/{MARKER}")

    def read(self, step: str, name: str) -> bytes:
        if not self.done(step):
            raise FileNotFoundError(f"step {step!r} is not finished (no {MARKER} in {self.dir.uri(step)})")
        return self.dir.read_bytes(f"{step}/{name}")

    def has(self, step: str, name: str) -> bool:
        return self.dir.is_file(f"{step}/{name}")

    def record(self, step: str) -> dict[str, Any]:
        return json.loads(self.read(step, "record.json"))

    def write(self, step: str, files: dict[str, bytes]) -> None:
        """Write a step's files, then its marker. Leftovers of an unfinished attempt go first."""
        self.dir.delete(step)
        for name, data in files.items():
            self.dir.write_bytes(f"{step}/{name}", data)
        self.dir.write_bytes(f"{step}/{MARKER}", json.dumps({"finished": time.time()}).encode())

    def log_execution(self, step: str) -> None:
        self.dir.append_line("_executions.jsonl", json.dumps({"step": step, "time": time.time()}))

    def wall_s(self, before: float | None = None) -> float:
        """Seconds the finished steps took (each: from the start of its last execution to its
        marker), summed over every process that ran them; `before` (epoch seconds): only the steps
        finished before then (a resumed run's earlier processes)."""
        starts: dict[str, list[float]] = {}
        for e in self._entries():
            starts.setdefault(e["step"], []).append(float(e["time"]))
        total = 0.0
        for step, times in starts.items():
            if not self.done(step):
                continue
            end = float(json.loads(self.dir.read_bytes(f"{step}/{MARKER}"))["finished"])
            began = [t for t in times if t <= end]
            if began and (before is None or end < before):
                total += end - max(began)
        return total

    def executions(self) -> list[str]:
        return [e["step"] for e in self._entries()]

    def _entries(self) -> list[dict[str, Any]]:
        """The records of `_executions.jsonl`, in order ({"step", "time"})."""
        if not self.dir.is_file("_executions.jsonl"):
            return []
        return [json.loads(line) for line in self.dir.read_text("_executions.jsonl").splitlines() if line.strip()]


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
