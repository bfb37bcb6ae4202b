"""Context parallelism: the load-balanced split, where response rows live, the loss shares, refusals.

The multi-process checks (CP2, TP2xCP2, TP2+SPxCP2, CP2xPP2 against TP1) are in
tests/distributed/workers/opsd_step.py.
"""

from __future__ import annotations

import pytest
import torch

from megatron_opsd.config import load_config
from megatron_opsd.config_io import ConfigError
from megatron_opsd.data.batch import (collate_pairs, context_parallel_positions, context_parallel_share, local_rows,
                                      split_for_context_parallel)
from megatron_opsd.data.contexts import build_pair
from megatron_opsd.models.provider import ModelBuildConfig, check_context_parallel, have_transformer_engine
from megatron_opsd.parallel import ParallelConfig


def test_positions_follow_megatrons_load_balanced_split():
    # 2*cp chunks; rank r holds chunks r and 2*cp-1-r (Megatron-LM's get_batch_on_this_cp_rank)
    assert context_parallel_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert context_parallel_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert context_parallel_positions(8, 4, 0).tolist() == [0, 7]
    assert context_parallel_positions(8, 4, 3).tolist() == [3, 4]
    assert context_parallel_positions(5, 1, 0).tolist() == [0, 1, 2, 3, 4]
    every = torch.cat([context_parallel_positions(24, 3, r) for r in range(3)])
    assert sorted(every.tolist()) == list(range(24))
    with pytest.raises(ValueError, match="not a multiple of 2 \\* cp = 4"):
        context_parallel_positions(6, 2, 0)


@pytest.mark.parametrize("cp, shards", [(1, 2), (2, 1), (2, 2), (3, 2)])
def test_each_position_has_exactly_one_holder_which_finds_it(cp, shards):
    length = 2 * cp * shards * 3
    hidden = torch.arange(length).float()  # position p carries the value p
    index = torch.tensor([[0, length - 1, 5, 6], [length // 2, 1, 2, length - 2]])
    found, holders = torch.zeros(index.shape), torch.zeros(index.shape, dtype=torch.long)
    for r in range(cp):
        held = hidden[context_parallel_positions(length, cp, r)]
        for t in range(shards):  # sequence parallelism: contiguous parts of the CP rank's rows
            part = held.chunk(shards)[t]
            rows = local_rows(index, length, cp, r, shards, t)
            own = rows >= 0
            found[own] = part[rows[own]]
            holders += own.long()
    assert holders.eq(1).all() and torch.equal(found, index.float())


def test_local_rows_by_hand():
    # L=8, cp=2: rank 1 holds positions [2, 3, 4, 5] as rows 0..3
    assert local_rows(torch.tensor([[2, 5, 0, 7]]), 8, 2, 1).tolist() == [[0, 3, -1, -1]]
    # ... and with SP over 2 TP ranks, TP rank 1 holds rows 2, 3 (positions 4, 5) as its rows 0, 1
    assert local_rows(torch.tensor([[4, 5, 3]]), 8, 2, 1, 2, 1).tolist() == [[0, 1, -1]]


def test_shares_are_disjoint_and_cover_the_scored_tokens():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    shares = [context_parallel_share(mask, 2, r) for r in range(2)]
    assert shares[0].tolist() == [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    assert torch.equal(shares[0] + shares[1], mask) and not (shares[0] * shares[1]).any()
    assert context_parallel_share(mask, 1, 0) is mask


def test_split_keeps_this_ranks_positions_and_their_mask_rows():
    pairs = [build_pair([5, 6, 7], [5, 6, 7, 8, 9], [11, 12], stop_ids=set(), max_seq_len=64, overlong="drop"),
             build_pair([5], [5, 6], [13, 14, 15, 16], stop_ids=set(), max_seq_len=64, overlong="drop")]
    batch = collate_pairs(pairs, 0, pad_to_multiple_of=4)
    part = split_for_context_parallel(batch, 2, 1)
    for whole, mine in ((batch.student, part.student), (batch.teacher, part.teacher)):
        keep = context_parallel_positions(whole.tokens.shape[1], 2, 1)
        assert torch.equal(mine.tokens, whole.tokens[:, keep])
        assert torch.equal(mine.position_ids, whole.position_ids[:, keep])
        assert torch.equal(mine.attention_mask, whole.attention_mask[:, :, keep])  # [B, 1, L/cp, L]
    assert torch.equal(part.student_index, batch.student_index) and torch.equal(part.loss_mask, batch.loss_mask)
    with pytest.raises(ValueError, match="packed micro-batches are not supported under context parallelism"):
        split_for_context_parallel(collate_pairs(pairs, 0, pack=True, pad_to_multiple_of=4), 2, 0)


def test_layout_sizes_name_cp():
    config = ParallelConfig(tp=2, cp=2)
    assert config.data_parallel_size(8) == 2
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by parallel.tp \* parallel.pp \* "
                                         r"parallel.cp = 2 \* 1 \* 2: launch a multiple of 4"):
        config.check_world_size(6)


@pytest.mark.skipif(have_transformer_engine(), reason="Transformer Engine on CUDA is present: CP is allowed")
@pytest.mark.parametrize("overrides, pattern", [
    (["--parallel.cp", "2"], r"^parallel.cp=2 needs Transformer Engine attention on CUDA .*: set parallel.cp: 1$"),
    (["--parallel.cp", "0"], r"parallel.cp=0 must be >= 1"),
    (["--parallel.cp", "2", "--train.max_tokens_per_micro_batch", "256"],
     r"train.max_tokens_per_micro_batch=256 with parallel.cp=2: packed micro-batches are not supported"),
    (["--parallel.cp", "2", "--lora.rank", "4"], r"parallel.cp=2 with lora.rank > 0"),
    (["--parallel.cp", "2", "--model.model_type", "qwen3_moe", "--model.num_experts", "4",
      "--model.num_experts_per_tok", "2", "--model.moe_intermediate_size", "32"],
     r"parallel.cp=2 with a mixture of experts .* is not supported"),
])
def test_unsupported_context_parallelism_is_refused(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


@pytest.mark.skipif(have_transformer_engine(), reason="Transformer Engine on CUDA is present: CP is allowed")
def test_model_building_refuses_cp_without_transformer_engine():
    # (every entry point builds its models through transformer_config, which calls this)
    with pytest.raises(ValueError, match=r"parallel.cp=2 needs Transformer Engine"):
        check_context_parallel(2, ModelBuildConfig())
    with pytest.raises(ValueError, match=r"model_build.transformer_engine=off"):
        check_context_parallel(2, ModelBuildConfig(transformer_engine="off"))
    check_context_parallel(1, ModelBuildConfig())
