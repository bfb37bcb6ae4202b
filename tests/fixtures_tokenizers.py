"""Tiny local tokenizers for tests (no model hub).

``build_qwen3_style_tokenizer(dir)`` writes an HF tokenizer directory (tokenizer.json +
tokenizer_config.json) that ``transformers.AutoTokenizer.from_pretrained(dir)`` loads: a byte-level
BPE (any text encodes) with Qwen3's special tokens and a chat template that renders a conversation the
way Qwen3's does, including ``enable_thinking=False`` closing an empty ``<think>`` block after the
generation prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

# Qwen3's template reduced to single-turn user/assistant/system messages without tools; the
# generation-prompt tail is verbatim Qwen3.
QWEN3_STYLE_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]

_CORPUS = [
    "Problem: What is 17 + 5? Please reason step by step, and put your final answer within \\boxed{}.",
    "Here is a reference solution to this problem: 17 + 5 = 22. The answer is \\boxed{22}.",
    "After reading the reference solution above, make sure you truly understand the reasoning.",
    "Alice has 12 apples and buys 3 bags with 5 apples each. How many apples does she have?",
]


def build_qwen3_style_tokenizer(directory: str | Path, vocab_size: int = 400) -> Path:
    """Write the tokenizer into ``directory`` (created) and return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    # Qwen3 registers <think> and </think> as added, non-special tokens.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 4096,
        "chat_template": QWEN3_STYLE_CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory
