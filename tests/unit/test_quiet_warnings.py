"""The console of every process that imports safeanchor: known, unactionable FutureWarnings of
the pinned libraries are filtered (one place: safeanchor/__init__.py); others still show."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CODE = r"""
import warnings
import safeanchor
from transformers import LlamaConfig, LlamaForCausalLM
from safeanchor.models import LoraConfig, add_lora

cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
add_lora(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules=["q_proj"]), seed=0)  # peft + transformers 5
warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
warnings.warn("some other deprecation", FutureWarning)
"""


def test_known_future_warnings_are_filtered_and_others_are_not():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("PYTHONWARNINGS", None)
    p = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "is_gradient_checkpointing" not in p.stderr
    assert "all_gather_into_tensor" not in p.stderr
    assert "some other deprecation" in p.stderr


def test_the_peft_warning_is_real_without_the_filter():
    """Guards the test above: without importing safeanchor first, peft does warn (if a library
    upgrade removes the warning, the filter entry is dead and should go)."""
    code = CODE.replace("import safeanchor\n", "import warnings as w; w.simplefilter('default')\n", 1)
    code = code.replace("from safeanchor.models import LoraConfig, add_lora",
                        "import sys; sys.modules.setdefault('safeanchor', type(sys)('safeanchor')); "
                        "sys.modules['safeanchor'].__path__ = [" + repr(str(ROOT / "safeanchor")) + "]\n"
                        "from safeanchor.models import LoraConfig, add_lora")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("PYTHONWARNINGS", None)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "is_gradient_checkpointing" in p.stderr
