"""One schema for chat examples: loading, writing, tokenizing, batching.

Why a single schema: every stage (domain fine-tuning, safety anchors, evaluation)
reads the same :class:`ChatExample`, so data problems surface once, at load time, as a
one-line :class:`DataError` naming the file and line/row, instead of as a shape error
deep inside a training step. Training loss is applied to response tokens only, so the
model learns to answer, not to reproduce prompts.

Location format in error messages: ``a.jsonl:7`` and ``a.csv:7`` are 1-based physical
line numbers; ``a.json[3]``, ``a.parquet[3]`` and ``hf:id[3]`` are 0-based row indices.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100
_HF_PREFIX = "hf:"
_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")


class DataError(ValueError):
    """A data problem, reported as one line naming the source and line/row when known."""


class FrozenMeta(Mapping[str, str]):
    """An immutable, hashable ``str -> str`` mapping.

    Why: ``ChatExample`` is frozen and used as a set member / dict key (deduplication,
    per-example score tables), which needs every field to be hashable.
    """

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()) -> None:
        items = dict(data)
        self._data: dict[str, str] = {str(k): str(v) for k, v in items.items()}
        self._hash: int | None = None

    def __getitem__(self, key: str) -> str:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __repr__(self) -> str:
        return f"FrozenMeta({self._data!r})"


def contains_phrase(text: str, phrase: str) -> bool:
    """Whether `phrase` occurs in `text` case-insensitively with no word character (letter,
    digit, underscore) directly before or after it."""
    pattern = r"(?<!\w)" + re.escape(phrase.strip().casefold()) + r"(?!\w)"
    return re.search(pattern, text.casefold()) is not None


@dataclass(frozen=True)
class ChatExample:
    """One prompt/response pair with an optional answer key and string metadata.

    ``response`` may be ``""`` only for eval-only (prompt-only) sets. ``answer`` scores a
    generated response as correct when it contains ``answer`` case-insensitively.
    ``meta`` is normalised to a :class:`FrozenMeta`, so examples are hashable.
    """

    prompt: str
    response: str = ""
    answer: str | None = None
    meta: Mapping[str, str] = field(default_factory=FrozenMeta)

    def __post_init__(self) -> None:
        if not isinstance(self.meta, FrozenMeta):
            object.__setattr__(self, "meta", FrozenMeta(self.meta))

    def is_correct(self, generated: str) -> bool:
        """Whether ``generated`` contains the answer key as a whole phrase (case-insensitive).

        The key must start and end on a word boundary: "50 mg" is not found in "250 mg", "go"
        not in "cargo pull", "2 grams" not in "12 grams" (a plain substring test scored those
        as correct)."""
        if self.answer is None:
            raise ValueError("example has no answer key")
        return contains_phrase(generated, self.answer)


# ----------------------------------------------------------------------------- loading


def _meta_value(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    return str(value)


def _to_example(
    row: Any,
    where: str,
    *,
    prompt_field: str,
    response_field: str,
    answer_field: str,
    require_response: bool,
) -> ChatExample:
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if prompt_field not in row or row[prompt_field] is None:
        raise DataError(f"{where}: missing field {prompt_field!r}")
    prompt = row[prompt_field]
    if not isinstance(prompt, str):
        raise DataError(
            f"{where}: field {prompt_field!r} must be a string, got {type(prompt).__name__}"
        )
    if not prompt.strip():
        raise DataError(f"{where}: field {prompt_field!r} is empty")
    response = row.get(response_field)
    if response is None:
        if require_response:
            raise DataError(f"{where}: missing field {response_field!r}")
        response = ""
    if not isinstance(response, str):
        raise DataError(
            f"{where}: field {response_field!r} must be a string, got {type(response).__name__}"
        )
    if require_response and not response.strip():
        raise DataError(f"{where}: field {response_field!r} is empty")
    answer = _meta_value(row.get(answer_field))
    if answer is not None and not answer.strip():
        answer = None  # an empty key would mark every response correct
    meta = {}
    for key, value in row.items():
        if key in (prompt_field, response_field, answer_field):
            continue
        text = _meta_value(value)
        if text is not None:
            meta[str(key)] = text
    return ChatExample(prompt=prompt, response=response, answer=answer, meta=FrozenMeta(meta))


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{path}[{i}]", row


def _iter_csv(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        try:
            for row in reader:
                # csv pads short rows with None and collects extras under the None key.
                if None in row:
                    raise DataError(f"{path}:{reader.line_num}: more values than header columns")
                yield f"{path}:{reader.line_num}", {k: v for k, v in row.items() if v is not None}
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: invalid CSV: {e}") from None


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{path}: cannot read parquet: {_one_line(e)}") from None
    for i, row in enumerate(rows):
        yield f"{path}[{i}]", row


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _iter_hf(spec: str, split: str | None) -> Iterator[tuple[str, Any]]:
    import datasets

    rest = spec[len(_HF_PREFIX) :]
    if not rest:
        raise DataError(f"{spec}: empty dataset id")
    try:
        if Path(rest).exists():
            ds = datasets.load_from_disk(rest)
            if isinstance(ds, datasets.DatasetDict):
                name = split or "train"
                if name not in ds:
                    raise DataError(f"{spec}: no split {name!r} (have {sorted(ds)})")
                ds = ds[name]
        else:
            dataset_id, _, config = rest.partition(":")
            ds = datasets.load_dataset(dataset_id, config or None, split=split or "train")
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{spec}: cannot load dataset: {_one_line(e)}") from None
    for i, row in enumerate(ds):
        yield f"{spec}[{i}]", row


def load_examples(
    source: str | Path,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    answer_field: str = "answer",
    require_response: bool = True,
    split: str | None = None,
    limit: int | None = None,
) -> list[ChatExample]:
    """Load chat examples from a local file or a Hugging Face dataset.

    ``source`` is a ``.jsonl``/``.json``/``.parquet``/``.csv`` path, or ``hf:<id>``,
    ``hf:<id>:<config>`` (``datasets.load_dataset``) or ``hf:/path`` to a directory
    written by ``save_to_disk``. Fields other than prompt/response/answer are kept in
    ``meta`` as strings. ``limit`` keeps the first ``limit`` examples. Every problem is
    raised as a one-line :class:`DataError` naming the source and line/row.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    if isinstance(source, str) and source.startswith(_HF_PREFIX):
        name = source
        rows = _iter_hf(source, split)
    else:
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        suffix = path.suffix.lower()
        readers = {
            ".jsonl": _iter_jsonl,
            ".json": _iter_json,
            ".parquet": _iter_parquet,
            ".csv": _iter_csv,
        }
        if suffix not in readers:
            raise DataError(
                f"{path}: unknown extension {suffix or '(none)'!r}; expected one of "
                f"{', '.join(_EXTENSIONS)} or hf:<dataset_id>"
            )
        rows = readers[suffix](path)
    out: list[ChatExample] = []
    for where, row in rows:
        out.append(
            _to_example(
                row,
                where,
                prompt_field=prompt_field,
                response_field=response_field,
                answer_field=answer_field,
                require_response=require_response,
            )
        )
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{name}: no examples")
    return out


def write_jsonl(examples: Iterable[ChatExample], path: str | Path) -> Path:
    """Write examples as JSONL atomically (temp file + ``os.replace``).

    Why atomic: a crash mid-write must never leave a truncated file that a later run
    would load as a smaller dataset. ``meta`` entries become top-level fields, so the
    file round-trips through :func:`load_examples` with default field names.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    reserved = {"prompt", "response", "answer"}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for i, ex in enumerate(examples):
                clash = reserved.intersection(ex.meta)
                if clash:
                    raise DataError(
                        f"{path}: example {i}: meta key(s) {sorted(clash)} are reserved"
                    )
                row: dict[str, Any] = {"prompt": ex.prompt, "response": ex.response}
                if ex.answer is not None:
                    row["answer"] = ex.answer
                row.update(ex.meta)
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ------------------------------------------------------------------------ tokenization


def _as_id_list(encoded: Any) -> list[int]:
    """Normalise what ``apply_chat_template`` returns (list, BatchEncoding, tensor)."""
    if isinstance(encoded, Mapping) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    encoded = list(encoded)
    if len(encoded) == 1 and isinstance(encoded[0], (list, tuple)):
        encoded = list(encoded[0])
    return [int(i) for i in encoded]


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a single-user-turn conversation plus the assistant generation prompt.

    Why the chat template: training and generation must see exactly the prompt format the
    aligned model was trained with.
    """
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    return _as_id_list(encoded)


def _head(text: str, n: int = 40) -> str:
    return repr(text[:n] + ("..." if len(text) > n else ""))


def encode_example(tokenizer: Any, ex: ChatExample, max_length: int) -> dict[str, list[int]]:
    """Encode one example with the loss restricted to response tokens and the final eos.

    Returns ``input_ids`` and ``labels`` (``-100`` on prompt positions), both truncated on
    the right to ``max_length``. Raises :class:`DataError` when the response is empty or
    when truncation leaves no response token, since such an example trains nothing.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if not ex.response:
        raise DataError(f"example {_head(ex.prompt)}: empty response, cannot train on it")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id")
    prompt_ids = encode_prompt(tokenizer, ex.prompt)
    response_ids = list(tokenizer(ex.response, add_special_tokens=False)["input_ids"]) + [eos]
    if len(prompt_ids) >= max_length:
        raise DataError(
            f"example {_head(ex.prompt)}: prompt is {len(prompt_ids)} tokens, so no response "
            f"token fits in max_length={max_length}"
        )
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def encode_dataset(
    tokenizer: Any, examples: Iterable[ChatExample], max_length: int
) -> list[dict[str, list[int]]]:
    """Encode every example; errors name the example index as well as its prompt head."""
    out = []
    for i, ex in enumerate(examples):
        try:
            out.append(encode_example(tokenizer, ex, max_length))
        except DataError as e:
            raise DataError(f"example {i}: {e}") from None
    return out


def collate(
    features: Sequence[Mapping[str, Sequence[int]]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad encoded features into ``input_ids``/``labels``/``attention_mask`` (B, T).

    Padding positions get ``pad_id`` in ``input_ids``, ``-100`` in ``labels`` (no loss)
    and ``0`` in ``attention_mask``.
    """
    if not features:
        raise ValueError("collate: empty batch")
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        if len(f["labels"]) != n:
            raise ValueError(
                f"collate: feature {row} has {n} input_ids but {len(f['labels'])} labels"
            )
        ids[row, :n] = torch.as_tensor(list(f["input_ids"]), dtype=torch.long)
        labels[row, :n] = torch.as_tensor(list(f["labels"]), dtype=torch.long)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_prompts(prompt_ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for batched generation, so every row's next token is at the end."""
    if not prompt_ids:
        raise ValueError("collate_prompts: empty batch")
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, p in enumerate(prompt_ids):
        n = len(p)
        if n == 0:
            raise ValueError(f"collate_prompts: prompt {row} is empty")
        ids[row, width - n :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[row, width - n :] = 1
    return {"input_ids": ids, "attention_mask": mask}


class ExampleBatches:
    """Deterministic shuffled mini-batches over encoded features, epoch by epoch.

    Why per-epoch seeding: the order of epoch ``k`` depends only on ``(seed, k)``, so a
    run resumed at epoch ``k`` sees exactly the batches an uninterrupted run would have.
    """

    def __init__(
        self,
        features: Sequence[Mapping[str, Sequence[int]]],
        batch_size: int,
        seed: int,
        pad_id: int,
        drop_last: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not features:
            raise ValueError("ExampleBatches: no features")
        if drop_last and len(features) < batch_size:
            raise ValueError(
                f"ExampleBatches: {len(features)} features < batch_size={batch_size} "
                "with drop_last=True gives no batches"
            )
        self.features = list(features)
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.drop_last = drop_last

    def __len__(self) -> int:
        n = len(self.features) / self.batch_size
        return math.floor(n) if self.drop_last else math.ceil(n)

    def order(self, epoch_index: int) -> list[int]:
        """The feature indices of epoch ``epoch_index`` in batch order."""
        gen = torch.Generator()
        gen.manual_seed((self.seed * 1_000_003 + epoch_index) % (2**63 - 1))
        return torch.randperm(len(self.features), generator=gen).tolist()

    def epoch(self, epoch_index: int) -> Iterator[dict[str, torch.Tensor]]:
        """Yield the collated batches of epoch ``epoch_index``."""
        order = self.order(epoch_index)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield collate([self.features[i] for i in idx], self.pad_id)
