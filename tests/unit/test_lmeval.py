"""The optional lm-evaluation-harness adapter: config checks always; a local task file (JSON
data, no download) run on the live tiny model where `lm-eval` is installed."""

import json
from pathlib import Path

import pytest
import torch

from safeanchor.config import ConfigError
from safeanchor.lmeval import LmEvalConfig, flatten_results

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "hub" / "mmlu.jsonl"


def test_results_are_flattened_to_named_metrics():
    res = {"mmlu": {"alias": "mmlu", "acc,none": 0.5, "acc_stderr,none": 0.01},
           "gsm8k": {"exact_match,flexible-extract": 0.25, "exact_match,strict-match": 0.2}}
    assert flatten_results(res) == {"lmeval/mmlu/acc": 0.5, "lmeval/gsm8k/exact_match_flexible-extract": 0.25,
                                    "lmeval/gsm8k/exact_match_strict-match": 0.2}


def test_config_checks():
    with pytest.raises(ConfigError, match="include_path"):
        LmEvalConfig(tasks=["x"], include_defaults=False)
    with pytest.raises(ConfigError, match="batch_size"):
        LmEvalConfig(batch_size=0)
    assert LmEvalConfig().tasks == []  # default: the harness is never imported


TASK = """task: safeanchor_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def test_local_task_runs_on_the_live_model(tmp_path):
    pytest.importorskip("lm_eval")
    from tiny import tiny_lora, toy_tokenizer

    from safeanchor.data import ChatExample
    from safeanchor.lmeval import check_tasks, run_lm_eval

    (tmp_path / "local_mc.yaml").write_text(TASK.format(data=FIX))
    rows = [json.loads(line) for line in FIX.read_text().splitlines()]
    tok = toy_tokenizer([ChatExample(r["question"] + " Answer:", " ".join(r["choices"])) for r in rows])
    model = tiny_lora(tok)
    cfg = LmEvalConfig(tasks=["safeanchor_local_mc"], include_path=str(tmp_path), include_defaults=False, batch_size=4)
    check_tasks(cfg)
    with pytest.raises(ConfigError, match="unknown lm-eval task"):
        check_tasks(LmEvalConfig(tasks=["nope"], include_path=str(tmp_path), include_defaults=False))
    m = run_lm_eval(model, tok, cfg)
    # the same accuracy recomputed from the model directly (lm-eval's convention: context
    # "<question>\nAnswer:", continuation " <choice>", summed token log-likelihood, argmax)
    hits = 0
    with torch.no_grad():
        for r in rows:
            ctx = tok(r["question"] + "\nAnswer:")["input_ids"]
            lls = []
            for c in r["choices"]:
                whole = tok(r["question"] + "\nAnswer: " + c)["input_ids"]
                lp = model(input_ids=torch.tensor([whole])).logits[0].log_softmax(-1)
                lls.append(sum(lp[len(ctx) - 1 + i, t].item() for i, t in enumerate(whole[len(ctx):])))
            hits += max(range(len(lls)), key=lls.__getitem__) == r["answer"]
    assert m["lmeval/safeanchor_local_mc/acc"] == pytest.approx(hits / len(rows))
