"""Where a rank's vocabulary slice sits, how tokens are chunked, and the collectives (explicit group).

Layout: the (padded) vocabulary of ``num_local * TP`` columns is split contiguously over the ranks of
``tp_group``; rank r holds global ids ``[r * num_local, (r + 1) * num_local)``. Ids ``>= vocab_size``
are padding. Since padding is a suffix of the vocabulary, each rank's real columns are a prefix of its
slice (``VocabShard.num_valid`` of them, possibly none). No global parallel state is ever read.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Tokens per chunk = _CHUNK_ELEMENTS // V_local. On CPU, 4 MiB fp32 buffers keep a chunk's five of them
# within a 32 MiB L3 (fastest on the benchmark machine: V=151,936 gives 6 tokens per chunk); on GPU larger
# chunks amortise kernel launches.
_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 25}


@dataclass(frozen=True)
class VocabShard:
    """Where this rank's vocabulary slice sits in the global vocabulary."""

    group: dist.ProcessGroup | None
    world_size: int
    rank: int
    num_local: int  # columns per rank (padded vocab / TP)
    num_valid: int  # leading local columns with global id < vocab_size
    start: int  # global id of local column 0


def vocab_shard(num_local: int, vocab_size: int | None, tp_group: dist.ProcessGroup | None) -> VocabShard:
    """Describe this rank's slice; ``tp_group=None`` means no tensor parallelism."""
    world_size = 1 if tp_group is None else dist.get_world_size(tp_group)
    rank = 0 if tp_group is None else dist.get_rank(tp_group)
    if rank < 0:
        raise ValueError("this process is not a member of tp_group")
    if num_local < 1:
        raise ValueError(f"logits have {num_local} vocabulary columns; need at least 1")
    padded = num_local * world_size
    vocab_size = padded if vocab_size is None else vocab_size
    if not 1 <= vocab_size <= padded:
        raise ValueError(f"vocab_size={vocab_size} must lie in [1, {padded}] (the padded vocabulary "
                         f"{num_local} columns x {world_size} ranks)")
    start = rank * num_local
    return VocabShard(tp_group, world_size, rank, num_local,
                      num_valid=min(max(vocab_size - start, 0), num_local), start=start)


def chunk_rows(chunk_size: int | None, shard: VocabShard, device: torch.device) -> int:
    """Tokens per chunk: ``chunk_size`` if given, else a fixed element budget per ``[c, v]`` buffer."""
    # num_local, not num_valid: equal on all ranks
    return rows_within_budget(chunk_size, shard.num_local, device, _CHUNK_ELEMENTS)


def rows_within_budget(chunk_size: int | None, num_columns: int, device: torch.device,
                       budgets: dict[str, int]) -> int:
    """``chunk_size`` if given (validated), else ``budgets[device kind] // num_columns`` rows."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be a positive number of tokens (or None)")
        return chunk_size
    return max(1, budgets["cuda" if device.type == "cuda" else "cpu"] // num_columns)


def row_chunks(num_rows: int, rows_per_chunk: int) -> Iterator[slice]:
    for start in range(0, num_rows, rows_per_chunk):
        yield slice(start, min(start + rows_per_chunk, num_rows))


def gather_ranks(x: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """[...] -> [r, ...], rank order; one all-gather."""
    if shard.world_size == 1:
        return x.unsqueeze(0)
    out = x.new_empty((shard.world_size, *x.shape))
    dist.all_gather(list(out.unbind(0)), x.contiguous(), group=shard.group)
    return out


def all_reduce_sum_(x: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    if shard.world_size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=shard.group)
    return x
