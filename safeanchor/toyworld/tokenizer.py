"""A tiny byte-level BPE chat tokenizer trained in-process for the toy world.

Why: the toy world needs a real ``PreTrainedTokenizerFast`` (chat template, special
tokens, save/load) so the training and evaluation code paths are exactly those used
with production checkpoints, without downloading anything. Byte-level BPE with the
full byte alphabet makes every string round-trip, so no text is ever lost to ``<unk>``.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS: dict[str, str] = {
    "bos": "<|bos|>",
    "eos": "<|end|>",
    "pad": "<|pad|>",
    "unk": "<|unk|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
}

# A system message is plain text (plus a newline) before the first user turn; any
# other role is an error so a typo never silently drops a turn.
CHAT_TEMPLATE: str = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|user|>' + message['content'] + '<|end|>' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' + message['content'] + '<|end|>' }}"
    "{% else %}"
    "{{ raise_exception('unsupported chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_MODEL_MAX_LENGTH = 1_000_000


def build_tokenizer(
    texts: Iterable[str], vocab_size: int = 2048, seed: int = 0
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE chat tokenizer on ``texts`` and wrap it for transformers.

    Why in-process: the toy world must be reproducible offline; the same ``texts`` (in
    the same order) always yield the same vocabulary and merges. ``seed`` is accepted so
    callers can thread their world seed through uniformly; BPE training itself is
    deterministic and does not consume randomness, so it has no effect today.

    No post-processor is attached, so ``tokenizer(text)`` never inserts special tokens;
    the chat template is the single place where ``<|bos|>`` is added.
    """
    del seed  # training is deterministic; see docstring
    specials = list(SPECIAL_TOKENS.values())
    if vocab_size < 256 + len(specials):
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the byte alphabet plus special tokens "
            f"({256 + len(specials)})"
        )
    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer=trainer)

    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        additional_special_tokens=[SPECIAL_TOKENS["user"], SPECIAL_TOKENS["assistant"]],
        padding_side="right",
        model_max_length=_MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
