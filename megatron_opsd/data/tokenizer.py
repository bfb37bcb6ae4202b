"""One tokenizer interface over HF tokenizer directories and sentencepiece ``.model`` files.

A prompt is one user turn rendered with a generation prompt: through the tokenizer's own chat
template when it has one (``transformers`` renders it, with ``enable_thinking`` passed when the
template reads it), else through a plain ChatML string built from ``<|im_start|>``/``<|im_end|>``
pieces (and Qwen3's empty ``<think>`` block when thinking is off), else ``User: ...\\n\\nAssistant:``.
The rendered text is encoded once as a whole, without added BOS/EOS (a template that wants a BOS
writes it itself).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

IM_START, IM_END, THINK_OPEN, THINK_CLOSE = "<|im_start|>", "<|im_end|>", "<think>", "</think>"
# Closes the reasoning block right away: what Qwen3's template emits when enable_thinking=False.
EMPTY_THINK = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"
# End-of-turn markers of common chat formats; those in the vocabulary are stop ids besides EOS.
END_OF_TURN = (IM_END, "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>")


class Tokenizer(ABC):
    """Token ids <-> text, and chat-rendered prompts."""

    path: str
    """Where the tokenizer was loaded from."""
    vocab_size: int
    """Number of token ids (the largest id + 1, added tokens included)."""
    eos_id: int
    """End of sequence."""
    pad_id: int
    """Padding id (EOS when the tokenizer defines none); padded positions are always masked."""
    stop_ids: frozenset[int]
    """Ids that end a sampled response: EOS and the end-of-turn markers in the vocabulary."""
    supports_thinking: bool
    """Whether ``enable_thinking`` changes the rendered prompt."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, without added special tokens."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, chat markers included (sentencepiece drops control pieces such as EOS)."""

    @abstractmethod
    def render_prompt_text(self, user_text: str, *, enable_thinking: bool) -> str:
        """The single user turn ``user_text`` followed by the assistant generation prompt."""

    def render_prompt(self, user_text: str, *, enable_thinking: bool) -> list[int]:
        """Ids of ``render_prompt_text``."""
        return self.encode(self.render_prompt_text(user_text, enable_thinking=enable_thinking))

    def check_model_vocab(self, model_vocab_size: int) -> None:
        """Refuse a tokenizer with more ids than the model's embedding table has rows."""
        if self.vocab_size > model_vocab_size:
            raise ValueError(
                f"tokenizer {self.path} has {self.vocab_size} token ids but the model's vocabulary has "
                f"{model_vocab_size}: ids >= {model_vocab_size} would index past the embedding table. "
                "Use the tokenizer that belongs to this checkpoint, or a model with vocab_size >= "
                f"{self.vocab_size}.")

    @abstractmethod
    def pieces(self) -> list[str]:
        """Every token's string, by id (the vocabulary in id order)."""

    def fingerprint(self) -> dict:
        """What a model needs to match: size, special ids and a hash of the vocabulary (id order)."""
        digest = hashlib.sha256(json.dumps(self.pieces(), ensure_ascii=False).encode()).hexdigest()
        return {"vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "vocab_sha256": digest}

    def check_fingerprint(self, recorded: dict, where: str) -> None:
        """Refuse this tokenizer when it differs from the ``recorded`` fingerprint (read from ``where``)."""
        mine = self.fingerprint()
        def shown(value):  # a hash is told apart by its first digits
            return repr(value[:12] + "...") if isinstance(value, str) and len(value) > 16 else repr(value)

        differences = [f"{key} {shown(mine.get(key))} vs {shown(value)}" for key, value in recorded.items()
                       if mine.get(key) != value]
        if differences:
            raise ValueError(f"tokenizer {self.path} is not the model's tokenizer recorded in {where} "
                             f"({'; '.join(differences)}; this tokenizer vs the model's): use the tokenizer "
                             "stored with the model (leave data.tokenizer_path / --tokenizer unset)")

    def _plain_prompt(self, user_text: str, enable_thinking: bool, vocab: set[str]) -> str:
        """A ChatML turn when the vocabulary has its markers, else a bare ``User:/Assistant:`` one."""
        if IM_START in vocab and IM_END in vocab:
            prompt = f"{IM_START}user\n{user_text}{IM_END}\n{IM_START}assistant\n"
            if not enable_thinking and THINK_OPEN in vocab and THINK_CLOSE in vocab:
                prompt += EMPTY_THINK
            return prompt
        return f"User: {user_text}\n\nAssistant:"


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer directory, loaded with ``transformers.AutoTokenizer``."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        self.path = str(path)
        try:
            self._tok = AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a loadable HF tokenizer directory ({exc})") from exc
        vocab = self._tok.get_vocab()
        self.vocab_size = max(len(self._tok), max(vocab.values()) + 1)
        if self._tok.eos_token_id is None:
            raise ValueError(f"{path}: the tokenizer defines no eos_token; set it in tokenizer_config.json")
        self.eos_id = self._tok.eos_token_id
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_id
        stops = {self.eos_id} | {vocab[t] for t in END_OF_TURN if t in vocab}
        generation_config = Path(path) / "generation_config.json"
        if generation_config.is_file():
            eos = json.loads(generation_config.read_text()).get("eos_token_id")
            stops |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.stop_ids = frozenset(stops)
        self._template = self._tok.chat_template
        if isinstance(self._template, dict):  # named templates: the default one renders plain chat
            self._template = self._template.get("default")
        self._vocab = set(vocab)
        if self._template is None:
            self.supports_thinking = THINK_OPEN in vocab and IM_START in vocab
        else:
            self.supports_thinking = "enable_thinking" in self._template

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def pieces(self) -> list[str]:
        by_id = {i: t for t, i in self._tok.get_vocab().items()}
        return [by_id.get(i, "") for i in range(self.vocab_size)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def render_prompt_text(self, user_text: str, *, enable_thinking: bool) -> str:
        if self._template is None:
            return self._plain_prompt(user_text, enable_thinking, self._vocab)
        extra = {"enable_thinking": enable_thinking} if self.supports_thinking else {}
        return self._tok.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                             add_generation_prompt=True, **extra)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model``; chat markers, if any, are its user-defined pieces."""

    def __init__(self, path: str | Path) -> None:
        import sentencepiece as spm

        self.path = str(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"{path}: not a loadable sentencepiece model ({exc})") from exc
        self.vocab_size = self._sp.get_piece_size()
        if self._sp.eos_id() < 0:
            raise ValueError(f"{path}: the sentencepiece model defines no EOS piece; "
                             "train it with eos_id >= 0")
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        pieces = (IM_START, IM_END, THINK_OPEN, THINK_CLOSE, *END_OF_TURN)
        self._vocab = {p for p in pieces if self._sp.id_to_piece(self._sp.piece_to_id(p)) == p}
        self.stop_ids = frozenset({self.eos_id} | {self._sp.piece_to_id(p) for p in END_OF_TURN
                                                   if p in self._vocab})
        self.supports_thinking = {IM_START, IM_END, THINK_OPEN, THINK_CLOSE} <= self._vocab

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def pieces(self) -> list[str]:
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode_ids(list(ids))

    def render_prompt_text(self, user_text: str, *, enable_thinking: bool) -> str:
        return self._plain_prompt(user_text, enable_thinking, self._vocab)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """An HF tokenizer directory or a sentencepiece ``.model`` file."""
    p = Path(path)
    if p.is_dir():
        return HFTokenizer(p)
    if p.is_file() and p.suffix == ".model":
        return SentencePieceTokenizer(p)
    raise ValueError(f"tokenizer_path={str(path)!r}: expected an HF tokenizer directory or a sentencepiece "
                     ".model file" + ("" if p.exists() else " (the path does not exist)"))
