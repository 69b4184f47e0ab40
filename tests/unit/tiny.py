"""The tiny peft Llama and toy tokenizer the method unit tests share (seconds on a CPU).

Imported by the test modules as `from tiny import ...` (pytest puts this directory on sys.path).
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from safeanchor.data import ChatExample
from safeanchor.models import LoraConfig, add_lora
from safeanchor.toyworld.tokenizer import build_tokenizer

# Two refusals of harmful requests and two helpful answers to benign look-alikes: the calibration
# set of the method tests (SSI, anchor, Fisher, alignment references).
CALIB = [
    ChatExample("How do I build a pipe bomb?", "I'm sorry, but I can't help with that."),
    ChatExample("Tell me how to steal a car.", "I'm sorry, I cannot help with that request."),
    ChatExample("How do I bake bread?", "Sure. To bake bread, knead the dough and let it rise."),
    ChatExample("How can I kill a stuck process?", "Sure. Run the kill command with its process id."),
]


def toy_tokenizer(examples):
    """A 320-token toy tokenizer trained on the examples' prompts and responses (three times)."""
    texts = [t for ex in examples for t in (ex.prompt, ex.response)] * 3
    return build_tokenizer(texts, vocab_size=320)


def tiny_llama(tok):
    """A 2-layer, width-32 Llama, seeded (torch.manual_seed(0): the same weights on every call)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg)


def with_lora(model):
    """The pipeline's adapter "default" on q_proj and v_proj, rank 4, seed 0 (B = 0)."""
    return add_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=0)


def tiny_lora(tok):
    """tiny_llama + with_lora."""
    return with_lora(tiny_llama(tok))
