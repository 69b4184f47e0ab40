"""Tests for the generic config machinery in safeanchor.config."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from safeanchor.config import (
    ConfigError,
    apply_overrides,
    check,
    deep_merge,
    describe,
    dump_yaml,
    from_dict,
    help_text,
    load_yaml,
    parse_override,
    to_dict,
)


@dataclass
class Optim:
    lr: float = field(default=1e-3, metadata={"doc": "learning rate"})
    betas: tuple[float, ...] = (0.9, 0.999)
    schedule: Literal["cosine", "linear"] = "cosine"
    warmup: int | None = None

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", "must be > 0")


@dataclass
class Train:
    steps: int = 10
    use_amp: bool = False
    optim: Optim = field(default_factory=Optim)
    tags: list[str] = field(default_factory=list)
    extra: dict[str, int] = field(default_factory=dict)
    anything: Any = None
    cached: int = field(default=0, init=False)


@dataclass
class Run:
    name: str = field(default="toy", metadata={"doc": "run name"})
    train: Train = field(default_factory=Train)
    seed: int = field(default=0, metadata={"doc": "seed for everything"})


@dataclass
class Needs:
    a: int
    b: int
    c: int = 3


def test_defaults() -> None:
    assert from_dict(Run, None) == Run()
    assert from_dict(Run, {}) == Run()


def test_nested_partial() -> None:
    cfg = from_dict(Run, {"train": {"optim": {"lr": 0.5}}, "seed": 7})
    assert cfg.train.optim.lr == 0.5
    assert cfg.train.optim.schedule == "cosine"
    assert cfg.train.steps == 10
    assert cfg.seed == 7


def test_unknown_key_names_full_dotted_key() -> None:
    with pytest.raises(ConfigError) as ei:
        from_dict(Run, {"train": {"optim": {"lrr": 1.0}}})
    assert ei.value.key == "train.optim.lrr"
    assert str(ei.value).startswith("train.optim.lrr: unknown key (known: lr, betas, schedule")


def test_init_false_field_is_not_a_key() -> None:
    with pytest.raises(ConfigError, match=r"^train\.cached: unknown key"):
        from_dict(Run, {"train": {"cached": 1}})


def test_wrong_type() -> None:
    with pytest.raises(ConfigError) as ei:
        from_dict(Run, {"train": {"optim": {"lr": "abc"}}})
    assert str(ei.value) == "train.optim.lr: expected float, got str 'abc'"
    with pytest.raises(ConfigError, match=r"^train\.steps: expected int, got float"):
        from_dict(Run, {"train": {"steps": 1.5}})
    with pytest.raises(ConfigError, match=r"^train: expected a mapping"):
        from_dict(Run, {"train": 3})


def test_int_to_float_ok() -> None:
    cfg = from_dict(Optim, {"lr": 1})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)


def test_bool_is_not_int() -> None:
    with pytest.raises(ConfigError, match=r"^train\.steps: expected int, got bool True"):
        from_dict(Run, {"train": {"steps": True}})
    with pytest.raises(ConfigError, match=r"^lr: expected float, got bool"):
        from_dict(Optim, {"lr": True})
    with pytest.raises(ConfigError, match=r"^train\.use_amp: expected bool, got int 1"):
        from_dict(Run, {"train": {"use_amp": 1}})


def test_literal() -> None:
    assert from_dict(Optim, {"schedule": "linear"}).schedule == "linear"
    with pytest.raises(ConfigError) as ei:
        from_dict(Optim, {"schedule": "step"})
    assert ei.value.key == "schedule"
    assert "'cosine', 'linear'" in ei.value.msg


def test_optional() -> None:
    assert from_dict(Optim, {"warmup": None}).warmup is None
    assert from_dict(Optim, {"warmup": 5}).warmup == 5
    with pytest.raises(ConfigError, match=r"^warmup: expected int \| None, got str"):
        from_dict(Optim, {"warmup": "five"})


def test_lists_tuples_dicts_any() -> None:
    cfg = from_dict(
        Run,
        {
            "train": {
                "tags": ["a", "b"],
                "extra": {"k": 1},
                "anything": {"x": [1]},
                "optim": {"betas": [0.8, 1]},
            }
        },
    )
    assert cfg.train.tags == ["a", "b"]
    assert cfg.train.extra == {"k": 1}
    assert cfg.train.anything == {"x": [1]}
    assert cfg.train.optim.betas == (0.8, 1.0)
    with pytest.raises(ConfigError, match=r"^train\.tags\[1\]: expected str, got int 2"):
        from_dict(Run, {"train": {"tags": ["a", 2]}})
    with pytest.raises(ConfigError, match=r"^train\.tags: expected list\[str\], got str"):
        from_dict(Run, {"train": {"tags": "a"}})
    with pytest.raises(ConfigError, match=r"^train\.extra\.k: expected int"):
        from_dict(Run, {"train": {"extra": {"k": "v"}}})


def test_post_init_error_gets_full_dotted_key() -> None:
    with pytest.raises(ConfigError) as ei:
        from_dict(Run, {"train": {"optim": {"lr": -1}}})
    assert ei.value.key == "train.optim.lr"
    assert str(ei.value) == "train.optim.lr: must be > 0"


def test_required_fields() -> None:
    with pytest.raises(ConfigError, match=r"required keys missing: a, b"):
        from_dict(Needs, {})
    with pytest.raises(ConfigError) as ei:
        from_dict(Needs, {"a": 1}, prefix="x")
    assert ei.value.key == "x.b"
    assert from_dict(Needs, {"a": 1, "b": 2}) == Needs(1, 2)


def test_config_error_format_and_pickle() -> None:
    assert str(ConfigError("a.b", "bad")) == "a.b: bad"
    assert str(ConfigError("", "bad")) == "bad"
    e = pickle.loads(pickle.dumps(ConfigError("a.b", "bad")))
    assert (e.key, e.msg, str(e)) == ("a.b", "bad", "a.b: bad")


def test_yaml_sci_notation(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  optim:\n    lr: 1e-4\n  steps: 5e3\n")
    data = load_yaml(p)
    assert data["train"]["optim"]["lr"] == pytest.approx(1e-4)
    cfg = from_dict(Run, {"train": {"optim": data["train"]["optim"]}})
    assert cfg.train.optim.lr == pytest.approx(1e-4)
    # Even if a YAML 1.1 loader hands over the string, from_dict coerces it to float.
    assert from_dict(Optim, {"lr": "1e-4"}).lr == pytest.approx(1e-4)
    # 5e3 is a float, so an int field rejects it rather than silently truncating.
    with pytest.raises(ConfigError, match=r"^train\.steps: expected int, got float"):
        from_dict(Run, data)


def test_load_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: YAML syntax error"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: top level must be a mapping"):
        load_yaml(lst)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(empty) == {}


def test_base_inheritance_and_cycle(tmp_path: Path) -> None:
    (tmp_path / "toy.yaml").write_text("seed: 1\ntrain:\n  steps: 3\n  optim:\n    lr: 0.1\n")
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "big.yaml").write_text(
        "base: ../toy.yaml\ntrain:\n  optim:\n    lr: 0.2\n"
    )
    data = load_yaml(tmp_path / "presets" / "big.yaml")
    assert data == {"seed": 1, "train": {"steps": 3, "optim": {"lr": 0.2}}}

    (tmp_path / "a.yaml").write_text("base: b.yaml\nx: 1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ny: 2\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_yaml(tmp_path / "a.yaml")


def test_deep_merge_does_not_mutate() -> None:
    base = {"a": {"b": 1, "c": 2}, "d": [1]}
    over = {"a": {"c": 3}, "e": 4}
    out = deep_merge(base, over)
    assert out == {"a": {"b": 1, "c": 3}, "d": [1], "e": 4}
    assert base == {"a": {"b": 1, "c": 2}, "d": [1]}


def test_parse_override() -> None:
    assert parse_override("train.lr=1e-4") == ("train.lr", pytest.approx(1e-4))
    assert isinstance(parse_override("x=5e3")[1], float)
    assert parse_override("x=3") == ("x", 3)
    assert parse_override("x=true") == ("x", True)
    assert parse_override("x=null") == ("x", None)
    assert parse_override("x='1e-4'") == ("x", "1e-4")  # quoted stays a string
    assert parse_override("eval.harmful_files=[a.jsonl, b.jsonl]") == (
        "eval.harmful_files",
        ["a.jsonl", "b.jsonl"],
    )
    assert parse_override("name=a=b") == ("name", "a=b")
    with pytest.raises(ConfigError, match="train.lr"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match="=3"):
        parse_override("=3")


def test_apply_overrides() -> None:
    data = {"train": {"steps": 1}, "seed": 0}
    out = apply_overrides(data, ["train.optim.lr=1e-4", "seed=5", "train.steps=7"])
    assert out == {"train": {"steps": 7, "optim": {"lr": pytest.approx(1e-4)}}, "seed": 5}
    assert data == {"train": {"steps": 1}, "seed": 0}
    with pytest.raises(ConfigError) as ei:
        apply_overrides(data, ["seed.x=1"])
    assert ei.value.key == "seed"
    # Keys are not validated here; from_dict names the bad key afterwards.
    bad = apply_overrides({}, ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"^train\.lrr: unknown key"):
        from_dict(Run, bad)


def test_to_dict_round_trip() -> None:
    cfg = from_dict(
        Run, {"name": "x", "train": {"tags": ["t"], "optim": {"betas": [0.5], "warmup": 2}}}
    )
    d = to_dict(cfg)
    assert d["train"]["optim"]["betas"] == [0.5]
    assert "cached" not in d["train"]
    assert from_dict(Run, d) == cfg


def test_dump_yaml_round_trip(tmp_path: Path) -> None:
    cfg = from_dict(Run, {"train": {"optim": {"lr": 1e-5}, "tags": ["a"]}})
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    assert from_dict(Run, load_yaml(path)) == cfg


def test_describe() -> None:
    rows = {k: (t, d) for k, t, d in describe(Run)}
    assert rows["name"] == ("str", "run name")
    assert rows["seed"] == ("int", "seed for everything")
    assert rows["train.optim.lr"] == ("float", "learning rate")
    assert rows["train.optim.schedule"][0] == "Literal['cosine', 'linear']"
    assert rows["train.optim.warmup"][0] == "int | None"
    assert rows["train.steps"] == ("int", "")  # undocumented
    assert "train.cached" not in rows


def test_help_text_shows_type_value_and_doc() -> None:
    cfg = from_dict(Run, {"seed": 7, "train": {"optim": {"lr": 2e-4}, "tags": ["a", "b"]}})
    lines = help_text(cfg, prefix="run").splitlines()
    assert "run.seed: int = 7" in lines and lines[lines.index("run.seed: int = 7") + 1] == "    seed for everything"
    assert "run.train.optim.lr: float = 0.0002" in lines
    assert "run.train.tags: list[str] = [a, b]" in lines
    assert "run.train.optim.warmup: int | None = null" in lines
