"""The run config: presets in workflows/configs/ and `--set` overrides, validated with errors
that name the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest

from safeanchor.config import ConfigError
from safeanchor.pipeline.config import RunConfig, load_run_config

ROOT = Path(__file__).resolve().parents[2]
# the presets, and the tuned configs the fair protocol wrote (workflows/protocol.py)
CONFIGS = sorted((ROOT / "workflows" / "configs").glob("*.yaml")) + sorted(
    (ROOT / "workflows" / "configs" / "tuned").glob("*.yaml"))
TINY = ROOT / "workflows" / "configs" / "tiny.yaml"


def test_presets_exist():
    names = {p.name for p in CONFIGS}
    assert {"toy.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_preset_validates(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    # the command that runs it: locally, or submitted to a Ray cluster (the 7B presets)
    assert (first.startswith("# python workflows/") or (
        first.startswith("# ray job submit ") and f" -- python workflows/sequential.py --config workflows/configs/{path.name}" in first
    )) and (  # a tuned config's command names the file itself
        path.parent.name != "tuned" or f"--config workflows/configs/tuned/{path.name}" in first
    ), f"{path.name}: first line {first!r}"
    cfg = load_run_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.data.order
    assert all(d in cfg.data.domains for d in cfg.data.order)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_local_data_file_a_preset_names_exists_and_loads(path):
    """A preset that points at a missing or unreadable data file fails here, not an hour into a run."""
    from safeanchor.data import load_examples

    cfg = load_run_config(path)
    d = cfg.data
    refs = [r for src in d.domains.values() for r in (src.train, src.test, src.val) if r is not None]
    refs += [d.safety_calib, d.safety_probe, d.eval_harmful, d.eval_benign, d.general]
    refs += [r for r in (d.eval_harmful_seen, d.val.eval_harmful, d.val.eval_benign, d.val.general) if r is not None]
    refs += list(cfg.eval.harmful_files) + list(cfg.eval.benign_files)
    local = [r for r in refs if ":" not in r]  # toyworld:, align:, hf: are resolved at run time
    for ref in local:
        examples = load_examples(ROOT / ref, require_response=False)
        assert examples, f"{path.name}: {ref} is empty"
    for name in cfg.data.order:
        for held_out in (cfg.data.domains[name].test, cfg.data.domains[name].val):
            if held_out is not None and ":" not in held_out:  # a domain's test / val set is scored by answer key
                assert all(x.answer for x in load_examples(ROOT / held_out, require_response=False)), f"{path.name}: {held_out}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_preset_loads_for_each_evaluation_split_that_it_configures(path):
    """eval.split=val is refused when a validation set is null; a preset that wires its
    validation split must load with it, and name a set per role in both splits."""
    base = load_run_config(path)
    val_refs = [base.data.val.eval_harmful, base.data.val.eval_benign, base.data.val.general]
    val_refs += [base.data.domains[d].val for d in base.data.order]
    splits = ["test"] + (["val"] if all(r is not None for r in val_refs) else [])
    for split in splits:
        cfg = load_run_config(path, [f"eval.split={split}"])
        assert cfg.eval.split == split
        roles = cfg.data.eval_sources(split)
        assert {"harmful", "benign", "general", *(f"domain/{d}" for d in cfg.data.order)} <= set(roles)


def test_tiny_inherits_from_toy_and_overrides():
    toy = load_run_config(ROOT / "workflows" / "configs" / "toy.yaml")
    tiny = load_run_config(TINY)
    # Inherited from toy.yaml ...
    assert tiny.model.name == toy.model.name == "toyworld:aligned"
    assert tiny.data.order == toy.data.order
    assert tiny.lora.r == toy.lora.r
    # ... and made smaller by tiny.yaml.
    assert tiny.toyworld.data.domain_entities < toy.toyworld.data.domain_entities
    assert tiny.data.max_train_examples == 48
    assert tiny.eval.max_new_tokens == 8


def _error(*overrides: str, **top) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        load_run_config(TINY, list(overrides), **top)
    return ei.value


def test_unknown_key_is_named():
    e = _error("train.lrr=1")
    assert "train.lrr" in str(e)
    assert "unknown key" in str(e)


def test_wrong_type_is_named():
    e = _error("train.lr=abc")
    assert e.key == "train.lr"
    assert "train.lr" in str(e)
    assert "abc" in str(e)


def test_out_of_range_is_named():
    e = _error("train.lr=-1")
    assert e.key == "train.lr"
    assert "train.lr" in str(e)


def test_nested_out_of_range_is_named():
    e = _error("toyworld.data.general_entities=0")
    assert "toyworld.data.general_entities" in str(e)


def test_unknown_method_is_named():
    e = _error(method="nope")
    assert e.key == "method"
    assert "'nope'" in str(e)
    assert "lora" in str(e)  # lists the known methods
    e = _error("method=nope")
    assert e.key == "method"


def test_unknown_domain_in_order_is_named():
    e = _error("data.order=[medical, nope]")
    assert "data.order" in str(e)
    assert "nope" in str(e)
    e = _error(**{"data.order": ["medical", "nope"]})
    assert "data.order" in str(e)


def test_duplicate_domain_in_order_rejected():
    e = _error("data.order=[medical, medical]")
    assert "data.order" in str(e)


def test_unknown_method_options_rejected():
    e = _error("methods.nope.x=1")
    assert "methods.nope" in str(e)
    e = _error("methods.lora.x=1")
    assert "methods.lora.x" in str(e)


def test_scientific_notation_is_float():
    cfg = load_run_config(TINY, ["train.lr=1e-4"])
    assert isinstance(cfg.train.lr, float)
    assert cfg.train.lr == pytest.approx(1e-4)


def test_list_override():
    cfg = load_run_config(TINY, ["eval.harmful_files=[a.jsonl, b.jsonl]"])
    assert cfg.eval.harmful_files == ["a.jsonl", "b.jsonl"]


def test_later_override_wins_and_top_level_values_apply():
    cfg = load_run_config(TINY, ["seed=1", "seed=2"], storage="/tmp/x", method="lora")
    assert cfg.seed == 2
    assert cfg.storage == "/tmp/x"
    cfg = load_run_config(TINY, ["seed=1"], seed=5)
    assert cfg.seed == 5  # explicit CLI flags win over --set


def test_resolved_run_id():
    cfg = load_run_config(TINY)
    assert cfg.run_id is None
    assert cfg.resolved_run_id() == "safeanchor-seed0-medical-legal-code"  # toy preset's method
    cfg = load_run_config(TINY, method="lora", seed=2, **{"data.order": ["code", "legal"]})
    assert cfg.resolved_run_id() == "lora-seed2-code-legal"
    cfg = load_run_config(TINY, ["seed=3", "data.order=[code, medical]"])
    assert cfg.resolved_run_id() == "safeanchor-seed3-code-medical"
    cfg = load_run_config(TINY, run_id="my-run_1.a")
    assert cfg.resolved_run_id() == "my-run_1.a"


def test_bad_run_id_rejected():
    e = _error(run_id="../escape")
    assert e.key == "run_id"


def test_defaults_without_file():
    cfg = load_run_config(None)
    assert cfg.method == "lora"
    assert cfg.uses_toyworld()


def test_saved_config_names_the_same_toy_world(tmp_path):
    """--resume reloads config.yaml: YAML turns epochs 100 into 100.0, which must not change
    the toy world's cache key (a changed key silently rebuilt the world, ~8 min)."""
    from pathlib import Path

    from safeanchor.config import dump_yaml
    from safeanchor.pipeline.config import load_run_config

    toy = Path(__file__).resolve().parents[2] / "workflows" / "configs" / "toy.yaml"
    cfg = load_run_config(toy)
    (tmp_path / "config.yaml").write_text(dump_yaml(cfg))
    again = load_run_config(tmp_path / "config.yaml")
    assert again.toyworld.key() == cfg.toyworld.key()


def test_train_worker_threads_use_the_node_cores_unless_set():
    from safeanchor.distributed.config import ClusterConfig

    c = ClusterConfig()
    assert c.torch_threads(node_cores=8, local_workers=1) == 8  # a lone worker gets the node
    assert c.torch_threads(node_cores=8, local_workers=3) == 2  # shared among the node's workers
    assert c.torch_threads() == 1  # SSI tasks: what they reserved
    assert ClusterConfig(cpus_per_worker=4).torch_threads(node_cores=2, local_workers=1) == 4
    assert ClusterConfig(torch_threads_per_worker=3).torch_threads(node_cores=16, local_workers=1) == 3


def test_model_device_validated_and_resolved():
    import torch

    from safeanchor.config import ConfigError
    from safeanchor.models import ModelConfig

    with pytest.raises(ConfigError, match="device"):
        ModelConfig(device="gpu0")
    assert ModelConfig(device="cpu").resolved_device() == torch.device("cpu")
    expect = "cuda" if torch.cuda.is_available() else "cpu"
    assert ModelConfig().resolved_device().type == expect  # auto
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="model.device.*no GPU"):
            ModelConfig(device="cuda:0").resolved_device()
