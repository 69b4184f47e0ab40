"""Optional adapter to lm-evaluation-harness (`pip install -e '.[lm-eval]'`, package `lm-eval`).

When `eval.lm_eval.tasks` names tasks, every evaluation (step 0 and after each domain) runs
them on the live adapted model — the same in-memory peft model the other metrics score, handed
to the harness as `HFLM(pretrained=<model>, tokenizer=<tokenizer>)`, no reload — and reports
each numeric result as `lmeval/<task>/<metric>` (`acc`, `acc_norm`, `exact_match`, ...; a
non-default filter is appended: `exact_match_flexible-extract`). Standard tasks download their
data from the hub at run time; `include_path` adds a folder of the user's own task YAMLs (e.g.
`dataset_path: json` with local `data_files`), which run offline.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from safeanchor.config import ConfigError, check

log = logging.getLogger(__name__)


@dataclass
class LmEvalConfig:
    """lm-evaluation-harness tasks run at every evaluation (none by default)."""

    tasks: list[str] = field(default_factory=list, metadata={"doc": "task (or group) names, e.g. [mmlu, truthfulqa_mc1]; empty: the harness is not used"})
    include_path: str | None = field(default=None, metadata={"doc": "folder of extra task YAMLs (TaskManager include_path)"})
    include_defaults: bool = field(default=True, metadata={"doc": "also index the harness's own tasks (false: only include_path's; indexing all of them takes minutes on a small CPU)"})
    num_fewshot: int | None = field(default=None, metadata={"doc": "few-shot examples (null: each task's default)"})
    limit: int | None = field(default=None, metadata={"doc": "examples per task (null: all; a smoke test sets a few)"})
    batch_size: int = field(default=8, metadata={"doc": "HFLM batch size"})
    apply_chat_template: bool = field(default=False, metadata={"doc": "wrap prompts in the model's chat template (the harness's published numbers do not)"})

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.limit is None or self.limit >= 1, "limit", "must be >= 1")
        check(self.num_fewshot is None or self.num_fewshot >= 0, "num_fewshot", "must be >= 0")
        check(self.include_defaults or self.include_path is not None, "include_defaults",
              "false leaves no tasks unless include_path is set")
        if self.tasks and importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("tasks", "needs lm-evaluation-harness: pip install -e '.[lm-eval]' (package lm-eval)")


@lru_cache(maxsize=4)
def _task_manager(include_path: str | None, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def task_manager(cfg: LmEvalConfig):
    """The harness's task index, built once per process (it reads every task YAML it knows)."""
    return _task_manager(cfg.include_path, cfg.include_defaults)


def check_tasks(cfg: LmEvalConfig) -> None:
    """Every configured task exists (before any training); the error names the unknown ones."""
    if not cfg.tasks:
        return
    known = set(task_manager(cfg).all_tasks)
    unknown = [t for t in cfg.tasks if t not in known]
    if unknown:
        raise ConfigError("eval.lm_eval.tasks", f"unknown lm-eval task(s) {unknown}"
                          + (f" (include_path {cfg.include_path})" if cfg.include_path else ""))


def flatten_results(results: dict[str, Any]) -> dict[str, float]:
    """The harness's `results` block -> {lmeval/<task>/<metric>: value}; stderr and text dropped."""
    out: dict[str, float] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or "_stderr" in key:
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric}_{filt}"
            out[f"lmeval/{task}/{name}"] = float(value) if not math.isnan(value) else float("nan")
    return out


def run_lm_eval(model, tokenizer, cfg: LmEvalConfig) -> dict[str, float]:
    """Run the configured tasks on `model` (a transformers / peft model object) in-process."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                  task_manager=task_manager(cfg), log_samples=False, bootstrap_iters=0,
                                  apply_chat_template=cfg.apply_chat_template)
    if res is None:  # non-zero ranks under accelerate; here a single process
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    metrics = flatten_results(res["results"])
    log.info("lm-eval: %s", " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return metrics
