"""The HF <-> megatron name map and its split/merge functions (single process, no megatron model).

Expected layouts are built independently of the code under test: the fused qkv row order by an
explicit loop over KV groups and heads (MEGATRON_NOTES.md §3), the HF names and shapes from
transformers' own models.
"""

from __future__ import annotations

import pytest
import torch

from megatron_opsd.models.description import ModelConfig
from megatron_opsd.models.hf_mapping import (ConversionError, hf_shapes, hf_to_unsharded, megatron_shapes,
                                             merge_fc1, merge_qkv, split_fc1, split_qkv, unsharded_to_hf)
from tests.hf_fixtures import FAMILIES, build_hf_model


def tiny(model_type="llama", **overrides) -> ModelConfig:
    fields = dict(model_type=model_type, vocab_size=30, hidden_size=16, intermediate_size=24,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    fields.update(overrides)
    return ModelConfig(**fields)


def random_hf(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen) for n, s in hf_shapes(cfg).items()}


# ---- split / merge ------------------------------------------------------------------------------
@pytest.mark.parametrize("heads,groups,head_dim", [(4, 2, 8), (4, 4, 4), (6, 1, 4), (8, 2, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_merge_qkv_matches_per_group_layout(heads, groups, head_dim, bias):
    cfg = tiny(num_attention_heads=heads, num_key_value_heads=groups, head_dim=head_dim)
    rest = () if bias else (16,)
    q = torch.randn(heads * head_dim, *rest)
    k = torch.randn(groups * head_dim, *rest)
    v = torch.randn(groups * head_dim, *rest)
    rows = []
    per_group = heads // groups
    for g in range(groups):  # the group's query heads, then its k head, then its v head
        for h in range(g * per_group, (g + 1) * per_group):
            rows.append(q[h * head_dim:(h + 1) * head_dim])
        rows.append(k[g * head_dim:(g + 1) * head_dim])
        rows.append(v[g * head_dim:(g + 1) * head_dim])
    expected = torch.cat(rows)
    merged = merge_qkv(q, k, v, cfg)
    assert torch.equal(merged, expected)
    q2, k2, v2 = split_qkv(merged, cfg)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)
    assert q2.is_contiguous() and k2.is_contiguous() and v2.is_contiguous()


def test_merge_fc1_is_gate_then_up():
    gate, up = torch.randn(5, 3), torch.randn(5, 3)
    fc1 = merge_fc1(gate, up)
    assert torch.equal(fc1[:5], gate) and torch.equal(fc1[5:], up)
    g2, u2 = split_fc1(fc1)
    assert torch.equal(g2, gate) and torch.equal(u2, up)


# ---- the table against transformers ---------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_hf_names_and_shapes_match_transformers(family):
    model = build_hf_model(family)
    cfg = ModelConfig.from_hf_dict(model.config.to_dict())
    theirs = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        assert torch.equal(model.state_dict()["lm_head.weight"], model.state_dict()["model.embed_tokens.weight"])
        del theirs["lm_head.weight"]
    assert hf_shapes(cfg) == theirs


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_megatron_names_and_shapes(family):
    cfg = tiny(family, head_dim=8, tie_word_embeddings=family == "qwen3")
    shapes = megatron_shapes(cfg, padded_vocab_size=32)
    assert shapes["embedding.word_embeddings.weight"] == (32, 16)
    assert shapes["decoder.layers.1.self_attention.linear_qkv.weight"] == ((4 + 2 * 2) * 8, 16)
    assert shapes["decoder.layers.0.mlp.linear_fc1.weight"] == (48, 16)
    assert shapes["decoder.layers.0.self_attention.linear_proj.weight"] == (16, 32)
    assert ("decoder.layers.0.self_attention.linear_qkv.bias" in shapes) == (family == "qwen2")
    assert ("decoder.layers.0.self_attention.q_layernorm.weight" in shapes) == (family == "qwen3")
    assert ("output_layer.weight" in shapes) == (family != "qwen3")


# ---- streaming and errors ------------------------------------------------------------------------
def test_hf_to_unsharded_round_trip_and_padding():
    cfg = tiny("qwen2")
    hf = random_hf(cfg)
    unsharded = dict(hf_to_unsharded(hf.items(), cfg))
    assert set(unsharded) == set(megatron_shapes(cfg))
    assert torch.equal(unsharded["decoder.layers.1.self_attention.linear_qkv.bias"],
                       merge_qkv(hf["model.layers.1.self_attn.q_proj.bias"],
                                 hf["model.layers.1.self_attn.k_proj.bias"],
                                 hf["model.layers.1.self_attn.v_proj.bias"], cfg))
    # megatron pads vocabulary rows (to a multiple of TP); export drops them again
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        unsharded[name] = torch.cat([unsharded[name], torch.full((2, 16), 7.0)])
    back = dict(unsharded_to_hf(unsharded.items(), cfg))
    assert set(back) == set(hf)
    assert all(torch.equal(back[n], hf[n]) for n in hf)


def test_fused_tensor_is_yielded_as_soon_as_its_parts_arrived():
    cfg = tiny()
    hf = random_hf(cfg)
    order = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
             "model.layers.0.self_attn.v_proj.weight"]
    order += [n for n in hf if n not in order]
    consumed = []

    def source():
        for name in order:
            consumed.append(name)
            yield name, hf[name]

    stream = hf_to_unsharded(source(), cfg)
    name, _ = next(stream)
    assert name == "decoder.layers.0.self_attention.linear_qkv.weight"
    assert consumed == order[:3]  # nothing read ahead, nothing buffered beyond the fused tensor's parts


def test_unknown_tensor_raises_with_its_name():
    cfg = tiny()
    hf = random_hf(cfg)
    hf["model.layers.0.self_attn.rotary_scale.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.self_attn\.rotary_scale\.weight"):
        list(hf_to_unsharded(hf.items(), cfg))
    with pytest.raises(ConversionError, match=r"rotary_scale"):  # known up front: raised before reading
        next(hf_to_unsharded(iter([]), cfg, names=list(hf)))


def test_layer_beyond_num_layers_raises():
    cfg = tiny()
    hf = random_hf(cfg)
    hf["model.layers.2.input_layernorm.weight"] = torch.ones(16)
    with pytest.raises(ConversionError, match=r"model\.layers\.2\.input_layernorm\.weight.*num_hidden_layers=2"):
        list(hf_to_unsharded(hf.items(), cfg))


def test_missing_tensor_raises_with_its_name():
    cfg = tiny()
    hf = random_hf(cfg)
    del hf["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        list(hf_to_unsharded(hf.items(), cfg))
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        list(hf_to_unsharded(hf.items(), cfg, names=list(hf)))


def test_misshaped_tensor_raises_with_its_name():
    cfg = tiny()
    hf = random_hf(cfg)
    hf["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 16)  # 4 KV heads' worth, config has 2
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(16, 16\).*\(8, 16\)"):
        list(hf_to_unsharded(hf.items(), cfg))


def test_duplicate_tensor_raises():
    cfg = tiny()
    items = list(random_hf(cfg).items())
    with pytest.raises(ConversionError, match="appears twice"):
        list(hf_to_unsharded(items + items[:1], cfg))


@pytest.mark.parametrize("head_first", [True, False])
@pytest.mark.parametrize("names_known", [True, False])
def test_tied_lm_head_must_equal_embedding(head_first, names_known):
    cfg = tiny("qwen3", tie_word_embeddings=True)
    hf = random_hf(cfg)
    embed = hf["model.embed_tokens.weight"]
    for head, ok in ((embed.clone(), True), (embed + 1e-3, False)):
        items = [("lm_head.weight", head)] + list(hf.items()) if head_first else list(hf.items()) + [
            ("lm_head.weight", head)]
        kwargs = {"names": [n for n, _ in items]} if names_known else {}
        if ok:
            out = dict(hf_to_unsharded(items, cfg, **kwargs))
            assert "output_layer.weight" not in out
        else:
            with pytest.raises(ConversionError, match="lm_head.weight.*differs"):
                list(hf_to_unsharded(items, cfg, **kwargs))


def test_unsharded_to_hf_errors():
    cfg = tiny("qwen3", tie_word_embeddings=True)
    unsharded = dict(hf_to_unsharded(random_hf(cfg).items(), cfg))
    with pytest.raises(ConversionError, match="output_layer.weight.*tie_word_embeddings"):
        list(unsharded_to_hf([*unsharded.items(), ("output_layer.weight", torch.zeros(30, 16))], cfg))
    with pytest.raises(ConversionError, match=r"decoder\.layers\.0\.mlp\.linear_fc9\.weight"):
        list(unsharded_to_hf([*unsharded.items(), ("decoder.layers.0.mlp.linear_fc9.weight", torch.zeros(1))], cfg))
    missing = {k: v for k, v in unsharded.items() if k != "decoder.final_layernorm.weight"}
    with pytest.raises(ConversionError, match=r"decoder\.final_layernorm\.weight"):
        list(unsharded_to_hf(missing.items(), cfg))
    bad = dict(unsharded, **{"decoder.layers.1.self_attention.q_layernorm.weight": torch.ones(5)})
    with pytest.raises(ConversionError, match=r"q_layernorm\.weight.*\(5,\)"):
        list(unsharded_to_hf(bad.items(), cfg))
    short = dict(unsharded, **{"embedding.word_embeddings.weight": torch.zeros(29, 16)})
    with pytest.raises(ConversionError, match=r"word_embeddings\.weight.*\(29, 16\)"):
        list(unsharded_to_hf(short.items(), cfg))
    # _extra_state entries (None on the local spec, fp8 metadata with TE) are not weights
    out = dict(unsharded_to_hf([*unsharded.items(), ("decoder.layers.0.mlp.linear_fc1._extra_state", None)], cfg))
    assert "lm_head.weight" not in out and len(out) == len(hf_shapes(cfg))


def test_load_hf_unsharded_reads_a_saved_checkpoint(tmp_path):
    from megatron_opsd.conversion.hf_to_megatron import load_hf_unsharded
    from tests.hf_fixtures import save_hf_model

    model = build_hf_model("qwen2")
    save_hf_model("qwen2", tmp_path, max_shard_size="60KB", tokenizer=False)
    cfg, weights = load_hf_unsharded(tmp_path)
    assert cfg.model_type == "qwen2" and set(weights) == set(megatron_shapes(cfg))
    hf = model.state_dict()
    assert torch.equal(weights["embedding.word_embeddings.weight"], hf["model.embed_tokens.weight"])
    assert torch.equal(weights["decoder.layers.3.mlp.linear_fc1.weight"],
                       torch.cat([hf["model.layers.3.mlp.gate_proj.weight"], hf["model.layers.3.mlp.up_proj.weight"]]))


def test_llama3_rope_scaling_is_visible_in_the_logits():
    """The logit comparisons against HF can only catch a dropped/misread llama3 scaling if it matters:
    with the fixture's shapes it moves logits far beyond the 1e-5 tolerance."""
    import transformers

    from tests.hf_fixtures import hf_config

    scaled = build_hf_model("llama")
    plain = transformers.AutoModelForCausalLM.from_config(hf_config("llama", rope_scaling=None),
                                                          attn_implementation="eager").eval()
    plain.load_state_dict(scaled.state_dict())
    tokens = torch.randint(0, 250, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (scaled(input_ids=tokens).logits - plain(input_ids=tokens).logits).abs().max().item()
    assert diff > 1e-3, diff
