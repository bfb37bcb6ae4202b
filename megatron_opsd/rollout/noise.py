"""Counter-based sampling noise: a Gumbel variate per (seed, step, prompt, sample, position, token id).

Sampling uses the Gumbel-max trick: with g_v i.i.d. standard Gumbel, argmax_v (z_v + g_v) over an
allowed set is distributed as softmax(z) renormalised over that set. Making g_v a pure function of its
coordinates (rather than drawing it from a stateful generator) is what lets each tensor-parallel rank
compute the noise of its own vocabulary slice, and makes a row's sample independent of the batch it
is in and of the parallel layout.

The hash is SplitMix64 (Steele, Lea & Flood 2014): ``mix64`` is its finaliser, and the stream for a row
is ``mix64(row_key + (v + 1) * GOLDEN)`` over global token ids v. Tensors hold the 64-bit words as
two's-complement int64; multiplication wraps modulo 2**64 and right shifts are made logical by masking.
``row_keys`` and the python ``mix64_int`` define the same function on python ints (tests check the two
agree bit for bit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_opsd.rollout.types import SampleKey

_MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB
_DOMAIN = 0x6F707364  # "opsd": separates these streams from other uses of SplitMix64 on the same seed


def _signed(word: int) -> int:
    """A 64-bit word as the int64 with the same bits."""
    word &= _MASK64
    return word - (1 << 64) if word >= 1 << 63 else word


def mix64_int(x: int) -> int:
    """SplitMix64's finaliser on python ints (the reference for ``mix64``)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _MUL1) & _MASK64
    x = ((x ^ (x >> 27)) * _MUL2) & _MASK64
    return x ^ (x >> 31)


def _srl(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 words (torch's >> is arithmetic)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (wrapping arithmetic)."""
    x = x ^ _srl(x, 30)
    x = x * _signed(_MUL1)
    x = x ^ _srl(x, 27)
    x = x * _signed(_MUL2)
    return x ^ _srl(x, 31)


def row_key(seed: int, key: SampleKey, position: int) -> int:
    """The 64-bit key of one response position: a hash chain over its coordinates."""
    h = mix64_int(seed ^ _DOMAIN)
    for value in (key.step, key.prompt_id, key.sample_idx, position):
        h = mix64_int(h + GOLDEN + (value & _MASK64))
    return h


def row_keys(seed: int, keys: Sequence[SampleKey], position: int, device: torch.device) -> torch.Tensor:
    """int64 [b]: ``row_key`` of every row at response position ``position``."""
    return torch.tensor([_signed(row_key(seed, k, position)) for k in keys], dtype=torch.int64, device=device)


def uniform(keys_b: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """fp64 uniforms in (0, 1) for rows ``keys_b`` [b] and global token ids ``ids`` ([v] or [b, v])."""
    ids_bv = ids if ids.dim() == 2 else ids[None, :]
    words = mix64(keys_b[:, None] + (ids_bv.long() + 1) * _signed(GOLDEN))
    return (_srl(words, 11).double() + 0.5) * 2.0**-53  # 53 random bits, never 0 or 1


def gumbel(keys_b: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """fp64 standard Gumbel noise -log(-log u) for rows ``keys_b`` and token ids ``ids``."""
    return uniform(keys_b, ids).log_().neg_().log_().neg_()
