"""SafeAnchor: continual LoRA domain adaptation of aligned chat LLMs without safety erosion."""

import warnings as _warnings

# Deprecation warnings from the pinned libraries that say nothing a user can act on, yet are
# printed by every process that triggers them (the driver, each Ray Train worker, each SSI
# task). They are filtered here, in one place, for every process that imports safeanchor;
# each entry matches one exact message, so any other warning still shows.
_QUIET_FUTURE_WARNINGS = (
    # transformers 5 deprecates the attribute that peft's get_peft_model reads
    r"`is_gradient_checkpointing` is deprecated",
    # DeepSpeed's ZeRO stages call torch's deprecated all_gather_into_tensor
    r"`torch.distributed.all_gather_into_tensor` is deprecated",
)
for _message in _QUIET_FUTURE_WARNINGS:
    _warnings.filterwarnings("ignore", message=_message, category=FutureWarning)

# The small Python API (safeanchor.api) and the transformers callback, exported lazily so that
# `import safeanchor` stays cheap (Ray workers import it; the callback imports transformers).
_API = ("AnchorLoss", "CSMResult", "GradientProjector", "Subspaces", "alphas", "as_examples", "csm_check",
        "identify", "merge", "probe_safety")
__all__ = [*_API, "SafeAnchorCallback", "SafeAnchorConfig"]


def __getattr__(name: str):
    if name in _API:
        from safeanchor import api

        return getattr(api, name)
    if name == "SafeAnchorCallback":
        from safeanchor.integrations.hf_trainer import SafeAnchorCallback

        return SafeAnchorCallback
    if name == "SafeAnchorConfig":
        from safeanchor.methods.safeanchor import SafeAnchorConfig

        return SafeAnchorConfig
    raise AttributeError(f"module 'safeanchor' has no attribute {name!r}")
