"""The pipeline's side of a training phase on Ray Train workers (`executor: ray`).

The driver packs its live state (the "default" adapter and the method's state_dict) with the
phase into a `PhaseJob`; every worker calls `build_phase(args)`, which loads the same model,
data and method as the driver (the toy world comes from its cache), puts that state back, and
returns a `PhaseSetup`. Rank 0's `save` sends the trained adapter and the method's new state
back as bytes (safetensors / JSON), which the driver loads into its live model.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from safeanchor.config import from_dict, to_dict
from safeanchor.methods.base import TrainPhase
from safeanchor.pipeline.store import adapter_bytes, load_adapter_bytes, pack_state, unpack_state


def phase_job_args(cfg, model, method, phase: TrainPhase) -> dict[str, Any]:
    from safeanchor.pipeline.sequential import phase_to_json

    return {**model_job_args(cfg, model, method), "phase": phase_to_json(phase)}


def model_job_args(cfg, model, method) -> dict[str, Any]:
    tensors, tree = pack_state(method.state_dict())
    return {"cfg": to_dict(cfg), "adapter": adapter_bytes(model), "state": (tensors, tree)}


def _load(args: dict[str, Any]):
    """The driver's run, model and method as they are now, rebuilt in this process."""
    from safeanchor.pipeline.config import RunConfig
    from safeanchor.pipeline.sequential import prepare_run

    cfg = from_dict(RunConfig, args["cfg"])
    run = prepare_run(cfg, log=lambda *_: None, worker=True)
    load_adapter_bytes(run.ctx.model, args["adapter"])
    run.method.load_state_dict(unpack_state(*args["state"]))
    run.method.attach(run.ctx)
    return run


def build_model(args: dict[str, Any]):
    """For SSI shard tasks: an object with .model and .tokenizer at the driver's state."""
    run = _load(args)
    return SimpleNamespace(model=run.ctx.model, tokenizer=run.tokenizer)


def build_phase(args: dict[str, Any]):
    from safeanchor.distributed.trainer import PhaseSetup
    from safeanchor.pipeline.sequential import phase_from_json

    run = _load(args)
    model, method, ctx = run.ctx.model, run.method, run.ctx
    phase = phase_from_json(args["phase"])
    hooks = method.phase_hooks(ctx, phase.hooks)

    def save(trained, _hooks, _out_dir) -> dict[str, Any]:
        return {"adapter": adapter_bytes(trained), "state": pack_state(method.state_dict())}

    return PhaseSetup(model=model, tokenizer=run.tokenizer, hooks=hooks, examples=phase.examples, cfg=phase.cfg,
                      seed=phase.seed, tag=phase.tag, save=save,
                      phase_state=lambda: pack_state(method.state_dict()),
                      load_phase_state=lambda st: method.load_state_dict(unpack_state(*st)))
