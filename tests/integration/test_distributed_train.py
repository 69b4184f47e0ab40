"""Training phases of the REAL methods on Ray Train + DeepSpeed (2 CPU workers, gloo) against the
single-process loop.

A phase is a `PhaseSpec` (tests/integration/tiny_phase.py: a tiny Llama saved to disk, the
adapter as bytes, SafeAnchor or SafeGrad by name with their state). The reference is the same
spec run in this process (`run_phase`, the torch engine; SafeAnchor's projection batched there),
so every distributed result is compared with what one process computes:

- fp32, ZeRO-2: SafeAnchor (projection as per-tensor gradient hooks, anchor KL as unprojected
  gradient) and SafeGrad (surgery on the full reduced gradient through DeepSpeed's
  safe_get_full_grad / safe_set_full_grad) equal the single-process update to ATOL;
  `test_reference_is_sensitive` shows that dropping the projection, the anchor, the surgery or
  the clipping (or averaging per-rank token means) moves the result far outside it.
- bf16, ZeRO-2: the same hooks built after the engine cast the model (a cache left in fp32 fails
  at the first step: matmul of a bf16 gradient with an fp32 basis), SafeAnchor's replay phase
  forced by its gate, SafeGrad; results within bf16 rounding of the fp32 reference. On a machine
  with a GPU the same tests run there (use_gpu auto).
- a worker killed (SIGKILL from outside) mid-phase: the group restarts from the last Train
  checkpoint and ends where the uninterrupted phase ends.

Shares one Ray instance; each Train run gets its own storage dir.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors
from tiny_phase import (
    compliance,
    live,
    make_world,
    phase_spec,
    safeanchor_phases,
    safegrad_spec,
    train_config,
)

from safeanchor.config import ConfigError, from_dict
from safeanchor.data import ExampleBatches, encode_dataset
from safeanchor.distributed import ClusterConfig, DeepSpeedConfig, fit_phase, run_phase
from safeanchor.distributed.engine import check_divisible
from safeanchor.distributed.trainer import _ckpt_name, _phase_of
from safeanchor.distributed.workers import TrainWorkers
from safeanchor.methods.safegrad import COUNTERS
from safeanchor.pipeline.store import pack_state
from safeanchor.train.loop import shard
from safeanchor.train.phase import PhaseResult

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

PRESETS = Path(__file__).resolve().parents[2] / "cluster" / "deepspeed"
ATOL = 2e-6  # the LoRA update is ~1e-2; distributed and single-process agree to ~1e-7
BF16_COS = 0.99  # bf16 vs fp32: cosine of the two updates (measured 0.9995-0.9999; see assert_bf16_close)
# SafeAnchor with every part engaged on the tiny model: full projection of a rank-2 subspace per
# tensor (strict: alpha = 0), a strong anchor, 3 anchor examples per step
SA = {"strict": True, "k_max": 2, "gamma": 5.0, "anchor_batch": 3, "replay_steps": 4, "replay_batch": 4,
      "safety_batch": 4, "replay_lr": 5e-3, "replay_rounds": 1}
SG = {"align_batch": 4, "kl_weight": 1.0}
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # tests only; the product keeps token auth
    t0 = time.perf_counter()
    ray.init(num_cpus=2)
    TIMES["ray_init"] = time.perf_counter() - t0
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = old
    print("\n[timings] " + json.dumps({k: round(v, 4) for k, v in TIMES.items()}))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def sa(world):
    return safeanchor_phases(world, SA)


_REF: dict[str, PhaseResult] = {}


def reference(spec) -> PhaseResult:
    """The spec trained in this process (cached per spec content)."""
    key = repr((spec.method, spec.options, spec.hooks, spec.train, spec.seed, hash(spec.state), hash(spec.adapter)))
    if key not in _REF:
        _REF[key] = run_phase(spec)
    return _REF[key]


def tensors(r: PhaseResult) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_tensors(r.adapter).items()}


def max_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max((a[n] - b[n]).abs().max().item() for n in a)


def cluster_config(stage: int = 2, bf16: bool = False, **cluster) -> ClusterConfig:
    return ClusterConfig(num_workers=2, deepspeed=DeepSpeedConfig(zero_stage=stage, bf16=bf16),
                         **{"max_failures": 0, **cluster})


def fit(tmp_path: Path, spec, stage: int = 2, bf16: bool = False, workers: TrainWorkers | None = None,
        **cluster) -> PhaseResult:
    """The phase on 2 Train workers: a Train run of its own (`fit_phase`), or the next phase of
    `workers` (a Train run that serves several)."""
    t0 = time.perf_counter()
    if workers is None:
        out = fit_phase(spec, cluster_config(stage, bf16, **cluster), storage_path=str(tmp_path / "ray"))
    else:
        out = workers.fit(spec)
    TIMES[spec.name] = time.perf_counter() - t0
    assert out.stats["world_size"] == 2 and out.stats["zero_stage"] == stage and out.stats["bf16"] == bf16
    return out


def assert_matches(out: PhaseResult, ref: PhaseResult, start: bytes, tol: float = ATOL) -> float:
    """The adapter `out` trained equals the reference's to `tol` (max abs); returns the error."""
    init = {k: v.float() for k, v in load_tensors(start).items()}
    want = tensors(ref)
    assert max_err(want, init) > 1e-2  # the phase moved the adapter
    err = max_err(tensors(out), want)
    assert err < tol, err
    return err


def assert_bf16_close(out: PhaseResult, ref: PhaseResult, start: bytes, label: str) -> None:
    """bf16 against the fp32 reference: the UPDATE (trained - start, over all LoRA tensors) points
    the same way and has a similar size. Elementwise agreement is not expected: AdamW moves a
    coordinate by ~lr whatever the size of its gradient, so coordinates whose gradient is below
    bf16's resolution move at random."""
    init = {k: v.float() for k, v in load_tensors(start).items()}
    got, want = tensors(out), tensors(ref)
    d_got = torch.cat([(got[k] - init[k]).flatten() for k in sorted(init)])
    d_want = torch.cat([(want[k] - init[k]).flatten() for k in sorted(init)])
    cos = float(d_got @ d_want / (d_got.norm() * d_want.norm()))
    ratio = float(d_got.norm() / d_want.norm())
    TIMES[f"bf16_{label}_cos"], TIMES[f"bf16_{label}_norm_ratio"] = cos, ratio
    assert cos > BF16_COS and abs(ratio - 1) < 0.02, (cos, ratio)  # measured |ratio - 1| <= 0.0006


# ------------------------------------------------------------------- no Ray: cheap checks first


def test_reference_is_sensitive(world, sa):
    """Each mechanism the distributed tests rely on changes the reference by >> ATOL."""
    spec, _ = sa
    base = tensors(reference(spec))
    # no projection (lam = 0 -> alpha = 1: nothing projected), no anchor, no clipping
    for opts, tcfg in (({**SA, "strict": False, "lam": 0.0}, None), ({**SA, "anchor": False}, None),
                       (SA, train_config(grad_clip=0.0))):
        other, _ = safeanchor_phases(world, opts)
        if tcfg is not None:
            other = replace(other, train=tcfg)
        assert max_err(base, tensors(run_phase(other))) > 500 * ATOL, opts
    sg = safegrad_spec(world, "sg", SG)
    out = reference(sg)
    conflicts = out.hook_stats["conflicts"]
    assert 2 <= conflicts < sg.train.max_steps  # the surgery acts on some steps of this phase ...
    plain = phase_spec(world, "plain", "lora", examples=compliance(world))
    assert max_err(tensors(out), tensors(run_phase(plain))) > 500 * ATOL  # ... and matters
    # the workers' halves of a batch hold different token counts, so averaging per-rank token
    # means (instead of the global token mean) would give a different gradient
    b = live(spec)
    batch = next(ExampleBatches(encode_dataset(b.tokenizer, spec.examples, 64), 8, 0, b.tokenizer.pad_token_id).epoch(0))
    counts = [int((shard(batch, r, 2)[0]["labels"][:, 1:] != -100).sum()) for r in (0, 1)]
    assert counts[0] != counts[1]


@pytest.mark.parametrize("device", ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
def test_caches_built_on_the_parameters_device_and_dtype(sa, world, device):
    """What the hooks cache for a phase lives where the engine put the parameters (bf16 here)."""
    spec, _ = sa
    b = live(spec)
    model = b.model.to(device=device, dtype=torch.bfloat16)
    hooks = b.method.phase_hooks(b.ctx, "domain")
    p = next(p for p in model.parameters() if p.requires_grad)
    assert b.method._proj and all(V.device == p.device and V.dtype == p.dtype for V, _ in b.method._proj.values())
    assert all(t.device == p.device for batch in hooks.batches for t in batch.values())
    assert all(r.device == p.device and r.dtype == torch.float32 for r in hooks.ref)
    replay = b.method.phase_hooks(b.ctx, "replay")
    assert all(t.device == p.device for batch in replay.batches for t in batch.values())
    g = live(safegrad_spec(world, "sg", SG))
    g.model.to(device=device, dtype=torch.bfloat16)
    surgery = g.method.phase_hooks(g.ctx, "domain")
    assert all(t.device == p.device for batch in surgery.batches for t in batch.values())


def test_deepspeed_auto_runs_it_only_where_it_has_work(tmp_path):
    """auto: a lone CPU worker trains in the torch loop; several workers, a GPU or any DeepSpeed
    setting bring the engine; true / false are obeyed."""
    auto = DeepSpeedConfig()
    assert auto.enabled == "auto" and not auto.on(1, use_gpu=False)
    assert auto.on(2, use_gpu=False) and auto.on(1, use_gpu=True)
    f = tmp_path / "zero1.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    for ds in (DeepSpeedConfig(zero_stage=0), DeepSpeedConfig(bf16=True), DeepSpeedConfig(config_file=str(f)),
               DeepSpeedConfig(enabled=True)):
        assert ds.on(1, use_gpu=False), ds
    assert not DeepSpeedConfig(enabled=False).on(1, use_gpu=True)


def test_cluster_config_errors_name_the_key():
    from safeanchor.pipeline.config import RunConfig

    bad = [({"deepspeed": {"zero_stage": 4}}, "cluster.deepspeed.zero_stage"),
           ({"executor": "slurm"}, "cluster.executor"),
           ({"num_workers": 0}, "cluster.num_workers"),
           ({"executor": "local", "num_workers": 2}, "cluster.num_workers"),
           ({"deepspeed": {"bf16": "maybe"}}, "cluster.deepspeed.bf16"),
           ({"deepspeed": {"enabled": "yes"}}, "cluster.deepspeed.enabled"),
           ({"num_workers": 2, "deepspeed": {"enabled": False}}, "cluster.deepspeed.enabled"),
           ({"resources_per_worker": {"GPU": 1}}, "cluster.resources_per_worker"),
           ({"deepspeed": {"config_file": "/nonexistent/zero2.json"}}, "cluster.deepspeed.config_file")]
    for data, key in bad:
        with pytest.raises(ConfigError) as e:
            from_dict(RunConfig, {"cluster": data})
        assert e.value.key == key, (data, str(e.value))
    with pytest.raises(ConfigError, match="train.batch_size"):
        check_divisible(6, 4)


def test_deepspeed_presets_load(tmp_path):
    """Every shipped preset is valid; the loop-owned keys are refused in a config_file."""
    files = sorted(PRESETS.glob("zero*.json"))
    assert [f.name for f in files] == ["zero0.json", "zero1.json", "zero2.json", "zero3.json", "zero3_offload.json"]
    for f in files:
        ds = DeepSpeedConfig(config_file=str(f))
        assert ds.stage() == int(f.stem[4])
        assert ds.resolved()["zero_optimization"]["stage"] == ds.stage()
    assert DeepSpeedConfig(config_file=str(files[3]), zero_stage=2).resolved()["zero_optimization"]["stage"] == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="optimizer"):
        DeepSpeedConfig(config_file=str(bad))


def test_checkpoint_names_say_their_phase():
    """A Train run serves several phases: a checkpoint resumes only the phase it is named after."""

    class Ckpt:
        path = f"/runs/r/ray/r-train/{_ckpt_name('r-01-medical-04-replay1', 8)}"

    assert _phase_of(Ckpt) == "r-01-medical-04-replay1"
    Ckpt.path = f"s3://bucket/r-train/{_ckpt_name('r-01-medical-04-replay12', 16)}/"
    assert _phase_of(Ckpt) == "r-01-medical-04-replay12"
    Ckpt.path = "/runs/r/ray/r-train/checkpoint_2026-11-29_22-00-00"  # not one of ours
    assert _phase_of(Ckpt) is None


# ------------------------------------------------------------------- Ray Train + DeepSpeed


def test_safeanchor_zero2_is_exact(ray_cluster, tmp_path, sa):
    """2 workers, ZeRO-2, fp32: SafeAnchor's projected + anchored update equals the one-process
    update. Checkpoints are written every 2 steps on the way (and must not perturb the run)."""
    spec, _ = sa
    out = fit(tmp_path, spec, checkpoint_every=2)
    assert out.stats["resumed_from_step"] == 0
    assert_matches(out, reference(spec), spec.adapter)
    # the hooks' counters (rank 0's): one anchor batch a step
    assert out.hook_stats == reference(spec).hook_stats == {"steps": spec.train.max_steps,
                                                            "anchor_batches": spec.train.max_steps}
    # the Train run is named after the phase, and so are its checkpoints
    assert sorted(p.name for p in (tmp_path / "ray" / spec.name).glob("*-step_*")) == [
        _ckpt_name(spec.name, 2), _ckpt_name(spec.name, 4)]


@pytest.mark.parametrize("stage", [1, 2])
def test_safegrad_under_zero_matches_single_process(ray_cluster, tmp_path, world, stage):
    """SafeGrad's surgery on the FULL reduced gradient under ZeRO-1/2 (DeepSpeed's
    safe_get_full_grad / safe_set_full_grad) equals the one-process update; same conflicts."""
    spec = safegrad_spec(world, f"sg-zero{stage}", SG)
    out = fit(tmp_path, spec, stage=stage)
    assert_matches(out, reference(spec), spec.adapter)
    got, want = out.hook_stats, reference(spec).hook_stats
    assert {k: got[k] for k in COUNTERS} == {k: want[k] for k in COUNTERS}  # the same steps had a conflict
    assert got["cos_sum"] == pytest.approx(want["cos_sum"], abs=1e-4)


def test_bf16_zero2_real_safeanchor_and_safegrad(ray_cluster, tmp_path, world, sa):
    """bf16 + ZeRO-2 + 2 workers with the real hooks: SafeAnchor's domain phase (projection,
    anchor), then the replay phase its gate asks for, and SafeGrad's phase, all three served by
    the SAME Train workers (one Train run, as a pipeline run uses them): each phase builds its
    model, engine and hooks afresh, so nothing of one phase leaks into the next."""
    spec, driver = sa
    workers = TrainWorkers("bf16-phases", cluster_config(bf16=True), str(tmp_path / "ray"))
    with workers:
        _bf16_phases(tmp_path, world, spec, driver, workers)
    assert workers.launches == 1 and not workers.alive


def _bf16_phases(tmp_path, world, spec, driver, workers) -> None:
    out = fit(tmp_path, spec, bf16=True, workers=workers)
    assert_bf16_close(out, reference(spec), spec.adapter, "domain")
    assert out.hook_stats["anchor_batches"] == spec.train.max_steps

    # the gate: s_t = 0 < (1 - tau) s_0 forces a replay phase, trained from the domain's result
    driver.method.end_phase(driver.ctx, "domain", out.hook_stats)
    driver.ctx.probe_safety = lambda: 0.0
    gate = driver.method.gate(driver.ctx, 0)
    assert gate.record["replay"] and gate.phase is not None and gate.phase.hooks == "replay"
    ph = gate.phase
    replay = replace(spec, name="sa-replay", adapter=out.adapter, state=pack_state(driver.method.state_dict()),
                     hooks=ph.hooks, examples=ph.examples, train=ph.cfg, seed=ph.seed, tag=ph.tag)
    rout = fit(tmp_path, replay, bf16=True, workers=workers)
    assert_bf16_close(rout, reference(replay), replay.adapter, "replay")
    assert rout.hook_stats["steps"] == ph.cfg.max_steps == SA["replay_steps"]  # one safety batch a step

    sg = safegrad_spec(world, "sg-bf16", SG)
    gout = fit(tmp_path, sg, bf16=True, workers=workers)
    assert_bf16_close(gout, reference(sg), sg.adapter, "safegrad")
    counters = gout.hook_stats
    assert counters["steps"] == sg.train.max_steps and counters["conflicts"] >= 1


def _kill_a_worker_after(marker_glob: str, root: Path, address: str, done: dict) -> None:
    try:
        from ray.util.state import list_actors

        deadline = time.time() + 300
        while time.time() < deadline and not list(root.glob(marker_glob)):
            time.sleep(0.05)
        workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                              detail=True)
        if workers and list(root.glob(marker_glob)):
            os.kill(int(workers[-1].pid), signal.SIGKILL)
            done["killed"] = time.time()
    except Exception as e:  # reported by the test
        done["error"] = repr(e)


def test_worker_killed_mid_phase_resumes_from_checkpoint(ray_cluster, tmp_path, sa):
    """A Train worker SIGKILLed after the step-4 checkpoint was committed (the workers wait for
    that before they go on, so the step-8 directory appearing says so): FailureConfig restarts the group,
    which resumes from the last checkpoint (weights, ZeRO-2 optimizer partitions, LambdaLR, the
    method's counters) and ends with the weights of the uninterrupted phase."""
    spec, _ = sa
    spec = replace(spec, name="sa-killed", train=train_config(24))
    done: dict = {}
    watcher = threading.Thread(target=_kill_a_worker_after, args=("*/*-step_00000008", tmp_path / "ray", ray_cluster.get_runtime_context().gcs_address, done))
    watcher.start()
    out = fit(tmp_path, spec, checkpoint_every=4, max_failures=1)
    watcher.join()
    assert "killed" in done, f"no worker was killed: {done}"
    assert out.stats["resumed_from_step"] >= 4 and out.stats["resumed_from_step"] % 4 == 0
    assert_matches(out, reference(spec), spec.adapter)
    assert out.hook_stats["anchor_batches"] == 24  # counters from the checkpoint, not doubled
