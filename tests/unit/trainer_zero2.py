"""Run by test_trainer_callback.py in its own process (one torch.distributed group per process):
the Trainer + SafeAnchorCallback under the Trainer's DeepSpeed integration, ZeRO-2, one CPU
process, gradient accumulation 2x2, against the pipeline's step. Prints the largest parameter
difference and the callback's anchor counters as JSON."""

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", DS_ACCELERATOR="cpu")
# the free port the test found, even if the test process left a MASTER_PORT in the environment
os.environ["MASTER_PORT"] = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MASTER_PORT", "29571")
sys.path.insert(0, str(Path(__file__).parent))

from safeanchor.distributed.engine import prepare_deepspeed  # noqa: E402

prepare_deepspeed(False)  # CPU accelerator, no shm-op compilation (ENVIRONMENT.md)

import test_trainer_callback as T  # noqa: E402

ZERO2 = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
         "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
         "bf16": {"enabled": False}, "fp16": {"enabled": False}}

tok = T.toy_tokenizer(T.CALIB + T.DOMAIN)
ref, _, _ = T.pipeline_update(tok)
want = T.lora_state(ref)
base_args = T.trainer_args
T.trainer_args = lambda p, ga, steps=2, **kw: base_args(p, ga, steps, deepspeed=ZERO2, **kw)
model, grads, cb = T.run_trainer(tok, tempfile.mkdtemp(), 2)
got = T.lora_state(model)
print(json.dumps({"max_diff": max(float((got[n] - want[n]).abs().max()) for n in got), "anchor": cb.record["anchor"],
                  "grads_seen_before_step": len(grads)}))
