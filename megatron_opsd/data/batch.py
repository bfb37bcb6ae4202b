"""Micro-batches of OPSD pairs: right-padded tokens with explicit masks, and response index maps.

Shapes: ``B`` pairs; ``L_s``/``L_t`` the student/teacher padded lengths (they differ); ``R`` the
longest response. Right padding keeps every sequence at positions ``0 .. len - 1``, so positions and
index maps of a pair do not depend on its neighbours.

Masks follow megatron-core: ``attention_mask[b, 0, q, k]`` is True where query ``q`` must NOT attend to
key ``k`` (``k > q``, or ``k`` is padding). Padded query rows still see the real keys, so no softmax row
is empty.

Packing (``collate_pairs(pack=True)``): the micro-batch is one row holding every pair's context back
to back with no padding between them (student contexts in the student row, teacher contexts in the
teacher row), position ids restarting at 0 for each pair, and a block-diagonal causal mask confining
attention to each pair (trailing padding, if a length is imposed, is a block of its own). The model
receives the same boundaries as THD ``PackedSeqParams`` (``opsd.step.packed_seq_params``); the mask
describes them for tests and tools. The index maps point into the packed rows, so the loss sees
exactly the tokens of the padded layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch

from megatron_opsd.data.contexts import OPSDPair


@dataclass
class SideBatch:
    """One role's inputs to the model."""

    tokens: torch.Tensor
    """[B, L] int64, right-padded with ``pad_id``."""
    position_ids: torch.Tensor
    """[B, L] int64, ``0 .. L - 1`` on every row."""
    attention_mask: torch.Tensor
    """[B, 1, L, L] bool, True = masked out (causal + key padding)."""
    lengths: torch.Tensor
    """[B] int64, unpadded sequence lengths."""
    pack_lengths: torch.Tensor
    """[N] int64, the lengths of the N sequences in order: one per row (== ``lengths``), or, packed
    (B == 1), the sequences packed back to back in the row."""

    @property
    def packed(self) -> bool:
        return self.pack_lengths.numel() != self.tokens.shape[0]


@dataclass
class OPSDMicroBatch:
    """Student and teacher inputs of the same responses, and where each response token is scored."""

    student: SideBatch
    teacher: SideBatch
    response_ids: torch.Tensor
    """[B, R] int64, right-padded with ``pad_id``."""
    loss_mask: torch.Tensor
    """[B, R] float32, 1 on response tokens (end of turn included), 0 on padding."""
    student_index: torch.Tensor
    """[B, R] int64: position in ``student.tokens`` whose logits predict ``response_ids[:, r]``
    (padded entries point at a valid position and are masked)."""
    teacher_index: torch.Tensor
    """[B, R] int64: the same for ``teacher.tokens``."""
    advantages: torch.Tensor | None = None
    """GRPO: [B, R] float32, each response's advantage on its tokens (0 on padding)."""
    old_logprobs: torch.Tensor | None = None
    """GRPO: [B, R] float32, the rollout's log-probabilities of the response tokens (0 on padding)."""

    @property
    def num_response_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    def to(self, device: torch.device | str) -> OPSDMicroBatch:
        """A copy with every tensor on ``device``."""

        def move(obj):
            return type(obj)(**{f.name: getattr(obj, f.name).to(device) for f in fields(obj)})

        return OPSDMicroBatch(student=move(self.student), teacher=move(self.teacher),
                              **{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                                 for f in fields(self) if f.name not in ("student", "teacher")})


def _padded_length(longest: int, multiple: int) -> int:
    return -(-longest // multiple) * multiple


def _side(sequences: Sequence[list[int]], pad_id: int, multiple: int, length: int | None = None) -> SideBatch:
    num, longest = len(sequences), max(map(len, sequences))
    if length is not None and length < longest:
        raise ValueError(f"cannot pad to length {length}: the longest sequence has {longest} tokens")
    length = length if length is not None else _padded_length(longest, multiple)
    tokens = torch.full((num, length), pad_id, dtype=torch.long)
    for b, ids in enumerate(sequences):
        tokens[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    lengths = torch.tensor([len(ids) for ids in sequences], dtype=torch.long)
    positions = torch.arange(length)
    future_ll = positions[None, :] > positions[:, None]
    padding_bl = positions[None, :] >= lengths[:, None]
    mask = future_ll[None, None] | padding_bl[:, None, None, :]
    return SideBatch(tokens=tokens, position_ids=positions.expand(num, length).clone(),
                     attention_mask=mask, lengths=lengths, pack_lengths=lengths.clone())


def _packed_side(sequences: Sequence[list[int]], pad_id: int, multiple: int, length: int | None = None) -> SideBatch:
    sizes = [len(ids) for ids in sequences]
    total = sum(sizes)
    if length is not None and length < total:
        raise ValueError(f"cannot pad to length {length}: the packed sequences have {total} tokens")
    length = length if length is not None else _padded_length(total, multiple)
    tokens = torch.full((1, length), pad_id, dtype=torch.long)
    tokens[0, :total] = torch.tensor([t for ids in sequences for t in ids], dtype=torch.long)
    blocks = sizes + ([length - total] if length > total else [])
    segment = torch.repeat_interleave(torch.arange(len(blocks)), torch.tensor(blocks))
    positions = torch.cat([torch.arange(n) for n in blocks])
    slots = torch.arange(length)
    mask = (slots[None, :] > slots[:, None]) | (segment[None, :] != segment[:, None])
    return SideBatch(tokens=tokens, position_ids=positions[None], attention_mask=mask[None, None],
                     lengths=torch.tensor([total]), pack_lengths=torch.tensor(sizes, dtype=torch.long))


def collate_pairs(pairs: Sequence[OPSDPair], pad_id: int, *, pad_to_multiple_of: int = 1,
                  pack: bool = False, advantages: Sequence[float] | None = None,
                  old_logprobs: Sequence[Sequence[float]] | None = None) -> OPSDMicroBatch:
    """Collate pairs into a padded micro-batch, or with ``pack=True`` into one packed row per side.

    ``pad_to_multiple_of`` rounds each side's length up (e.g. to the tensor-parallel size for sequence
    parallelism). Packed, the index maps, response ids and loss mask are [1, sum of response lengths].
    GRPO: ``advantages`` (one per pair) and ``old_logprobs`` (per pair, at least as long as its response:
    a cut response keeps its head) fill the fields of the same names (packed alike).
    """
    if not pairs:
        raise ValueError("collate_pairs: no pairs to collate")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of}: must be at least 1")
    num, width = len(pairs), max(len(p.response_ids) for p in pairs)
    response_ids = torch.full((num, width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((num, width), dtype=torch.float32)
    offsets = torch.arange(width)
    student_index = torch.zeros((num, width), dtype=torch.long)
    teacher_index = torch.zeros((num, width), dtype=torch.long)
    for b, pair in enumerate(pairs):
        size = len(pair.response_ids)
        response_ids[b, :size] = torch.tensor(pair.response_ids, dtype=torch.long)
        loss_mask[b, :size] = 1.0
        clamped = offsets.clamp(max=size - 1)  # padded entries repeat the last valid position
        student_index[b] = pair.student_start + clamped
        teacher_index[b] = pair.teacher_start + clamped
    adv = old = None
    if advantages is not None:
        adv = loss_mask * torch.tensor(list(advantages), dtype=torch.float32)[:, None]
        old = torch.zeros((num, width), dtype=torch.float32)
        for b, pair in enumerate(pairs):
            old[b, :len(pair.response_ids)] = torch.tensor(old_logprobs[b][:len(pair.response_ids)])
    if pack:
        return _pack(pairs, response_ids, loss_mask, student_index, teacher_index, pad_id, pad_to_multiple_of,
                     adv, old)
    return OPSDMicroBatch(
        student=_side([p.student_ids for p in pairs], pad_id, pad_to_multiple_of),
        teacher=_side([p.teacher_ids for p in pairs], pad_id, pad_to_multiple_of),
        response_ids=response_ids, loss_mask=loss_mask,
        student_index=student_index, teacher_index=teacher_index, advantages=adv, old_logprobs=old)


def token_budget_groups(costs: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of ``costs`` grouped so each group's total is at most ``budget`` (an item above it is a
    group of its own): first-fit over the items sorted longest first. Groups keep index order."""
    groups: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        fit = next((g for g, free in enumerate(room) if costs[i] <= free), None)
        if fit is None:
            groups.append([i])
            room.append(budget - costs[i])
        else:
            groups[fit].append(i)
            room[fit] -= costs[i]
    return [sorted(g) for g in groups]


def _pack(pairs, response_ids, loss_mask, student_index, teacher_index, pad_id, multiple, advantages=None,
          old_logprobs=None) -> OPSDMicroBatch:
    """The padded layout's tensors flattened to one row: each pair's valid entries, its index maps
    shifted by where its context starts in the packed row."""
    keep = loss_mask.flatten() > 0
    offset_s = torch.tensor([0] + [len(p.student_ids) for p in pairs]).cumsum(0)[:-1, None]
    offset_t = torch.tensor([0] + [len(p.teacher_ids) for p in pairs]).cumsum(0)[:-1, None]
    return OPSDMicroBatch(
        student=_packed_side([p.student_ids for p in pairs], pad_id, multiple),
        teacher=_packed_side([p.teacher_ids for p in pairs], pad_id, multiple),
        response_ids=response_ids.flatten()[keep][None], loss_mask=loss_mask.flatten()[keep][None],
        student_index=(student_index + offset_s).flatten()[keep][None],
        teacher_index=(teacher_index + offset_t).flatten()[keep][None],
        advantages=None if advantages is None else advantages.flatten()[keep][None],
        old_logprobs=None if old_logprobs is None else old_logprobs.flatten()[keep][None])


def gather_response_positions(x: torch.Tensor, index: torch.Tensor, *,
                              layout: Literal["lbd", "bld"] = "lbd") -> torch.Tensor:
    """Rows of ``x`` at the response positions: ``out[b, r] = x[index[b, r], b]`` -> ``[B, R, ...]``.

    ``layout="lbd"``: ``x`` is ``[L, B, ...]``, megatron-core's sequence-first hidden states (and
    logits). ``layout="bld"``: ``x`` is ``[B, L, ...]``. ``index`` is ``[B, R]`` (``student_index`` or
    ``teacher_index``). Advanced indexing copies only the selected rows (no ``[B, R, D]`` index tensor)
    and is differentiable.
    """
    if layout not in ("lbd", "bld"):
        raise ValueError(f"layout={layout!r}: use 'lbd' ([L, B, ...], megatron-core) or 'bld'")
    batch_dim = 1 if layout == "lbd" else 0
    if index.dim() != 2 or index.shape[0] != x.shape[batch_dim]:
        raise ValueError(f"index of shape {tuple(index.shape)} does not match x of shape "
                         f"{tuple(x.shape)} in layout {layout!r}: expected [B={x.shape[batch_dim]}, R]")
    rows = torch.arange(index.shape[0], device=index.device)[:, None]
    return x[index, rows] if layout == "lbd" else x[rows, index]


def pad_to_lengths(batch: OPSDMicroBatch, student_len: int, teacher_len: int, pad_id: int) -> OPSDMicroBatch:
    """The same micro-batch with each side right-padded to a fixed length (index maps are unchanged).

    Interleaved pipelines exchange fixed-shape messages, so every micro-batch of a step gets the
    step's longest lengths.
    """

    def repad(side: SideBatch, length: int) -> SideBatch:
        if side.packed:
            packed = side.tokens[0, :int(side.lengths[0])].split(side.pack_lengths.tolist())
            return _packed_side([ids.tolist() for ids in packed], pad_id, 1, length)
        rows = [side.tokens[b, :n].tolist() for b, n in enumerate(side.lengths.tolist())]
        return _side(rows, pad_id, 1, length)

    return OPSDMicroBatch(student=repad(batch.student, student_len), teacher=repad(batch.teacher, teacher_len),
                          response_ids=batch.response_ids, loss_mask=batch.loss_mask,
                          student_index=batch.student_index, teacher_index=batch.teacher_index,
                          advantages=batch.advantages, old_logprobs=batch.old_logprobs)


# ---- context parallelism: megatron's load-balanced sequence split ------------------------------------
def context_parallel_positions(length: int, cp: int, cp_rank: int) -> torch.Tensor:
    """The positions of a ``length``-token sequence that context-parallel rank ``cp_rank`` of ``cp`` holds,
    in its local order. megatron's load-balanced split (Megatron-LM's ``get_batch_on_this_cp_rank``; its
    RotaryEmbedding slices the RoPE table the same way) cuts the sequence into 2*cp equal chunks and
    rank r keeps chunks r and 2*cp-1-r, so under a causal mask every rank has as much attention work.
    ``length`` must be a multiple of 2*cp (``pad_for_layout`` pads to it)."""
    if cp == 1:
        return torch.arange(length)
    if length % (2 * cp):
        raise ValueError(f"length {length} is not a multiple of 2 * cp = {2 * cp}")
    chunk = length // (2 * cp)
    mirror = 2 * cp - 1 - cp_rank
    return torch.cat([torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk),
                      torch.arange(mirror * chunk, (mirror + 1) * chunk)])


def split_for_context_parallel(batch: OPSDMicroBatch, cp: int, cp_rank: int) -> OPSDMicroBatch:
    """This CP rank's part of a micro-batch, as megatron's ``get_batch_on_this_cp_rank``: each side's tokens
    and position ids at ``context_parallel_positions`` [B, L/cp], the attention mask's query rows likewise
    [B, 1, L/cp, L] (keys stay global). Response ids, loss mask and index maps stay whole: the index maps
    hold global positions (``local_rows`` finds where this rank holds them)."""

    def part(side: SideBatch) -> SideBatch:
        if side.packed:
            raise ValueError("packed micro-batches are not supported under context parallelism")
        keep = context_parallel_positions(side.tokens.shape[1], cp, cp_rank).to(side.tokens.device)
        return replace(side, tokens=side.tokens[:, keep], position_ids=side.position_ids[:, keep],
                       attention_mask=side.attention_mask[:, :, keep])

    return replace(batch, student=part(batch.student), teacher=part(batch.teacher))


def local_rows(index: torch.Tensor, length: int, cp: int = 1, cp_rank: int = 0, shards: int = 1,
               shard_rank: int = 0) -> torch.Tensor:
    """Where this rank holds each global position of ``index`` [B, R] among its hidden-state rows: the
    row, or -1 where another rank holds it. ``length``: the global sequence length. Context parallelism
    keeps ``context_parallel_positions`` (cp, cp_rank); sequence parallelism then splits those rows into
    ``shards`` contiguous parts (TP ranks) of which this rank holds part ``shard_rank``."""
    held = context_parallel_positions(length, cp, cp_rank).to(index.device)
    where = torch.full((length,), -1, dtype=torch.long, device=index.device)
    where[held] = torch.arange(held.numel(), device=index.device)
    per_shard = held.numel() // shards
    row = where[index] - shard_rank * per_shard
    return torch.where((where[index] >= 0) & (row >= 0) & (row < per_shard), row, -1)


def context_parallel_share(mask: torch.Tensor, cp: int, cp_rank: int) -> torch.Tensor:
    """``mask`` [B, R] keeping every cp-th scored token (row-major order, from the ``cp_rank``-th): the CP
    ranks of a micro-batch score disjoint shares which together hold each token once."""
    if cp == 1:
        return mask
    scored = mask.flatten() != 0
    ordinal = scored.long().cumsum(0) - 1
    return mask * (scored & (ordinal % cp == cp_rank)).view_as(mask).to(mask.dtype)
