"""LoRA in one process: config validation, PEFT adapter directories in and out, the adapters' forward
against transformers + peft (the OPSD step's gradients are checked in tests/distributed: lora_reference.py
and the layout test)."""

from __future__ import annotations


import pytest
import torch

from megatron_opsd.models.description import ModelConfig
from megatron_opsd.models.lora import PROJECTIONS, LoRAConfig, peft_shapes, read_peft_adapter, write_peft_adapter

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("fields, message", [
    (dict(rank=-1), "lora.rank=-1 must be >= 0"),
    (dict(rank=8, alpha=0), "lora.alpha=0 must be > 0"),
    (dict(rank=8, dropout=1.0), "lora.dropout=1.0"),
    (dict(rank=8, targets=["q_proj", "qkv"]), r"unknown projection\(s\) \['qkv'\]"),
    (dict(rank=8, targets=[]), "lora.targets is empty"),
])
def test_bad_lora_config_names_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**fields)


def _peft_dir(tmp_path, family="llama", name="adapter", **lora_fields):
    from tests.hf_fixtures import build_hf_model

    fields = dict(r=4, lora_alpha=8, target_modules=list(PROJECTIONS), lora_dropout=0.0)
    model = peft.get_peft_model(build_hf_model(family), peft.LoraConfig(**{**fields, **lora_fields}))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def _model_cfg(family="llama") -> ModelConfig:
    from tests.hf_fixtures import hf_config

    return ModelConfig.from_hf_dict(hf_config(family).to_dict())


def test_peft_adapter_round_trips_bit_for_bit(tmp_path):
    model, directory = _peft_dir(tmp_path)
    cfg = LoRAConfig(rank=4, alpha=8.0)
    tensors = read_peft_adapter(str(directory), _model_cfg(), cfg)
    write_peft_adapter(tmp_path / "again", tensors, cfg, _model_cfg())
    again = read_peft_adapter(str(tmp_path / "again"), _model_cfg(), cfg)
    assert tensors.keys() == again.keys() and all(torch.equal(tensors[k], again[k]) for k in tensors)
    from tests.hf_fixtures import build_hf_model

    reloaded = peft.PeftModel.from_pretrained(build_hf_model("llama"), tmp_path / "again")  # peft reads it
    tokens = torch.randint(0, 250, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, model(tokens).logits)


@pytest.mark.parametrize("lora_fields, cfg_fields, message", [
    (dict(use_dora=True), {}, "use_dora=True is not supported"),
    (dict(modules_to_save=["lm_head"]), {}, "modules_to_save"),
    (dict(bias="all"), {}, "bias='all' is not supported"),
    (dict(r=8), {}, "r=8, lora_alpha=8 but the run has lora.rank=4"),
    (dict(target_modules=["q_proj", "v_proj"]), {}, "target_modules="),
])
def test_unsupported_peft_adapters_are_refused(tmp_path, lora_fields, cfg_fields, message):
    _, directory = _peft_dir(tmp_path, **lora_fields)
    with pytest.raises(ValueError, match=message):
        read_peft_adapter(str(directory), _model_cfg(), LoRAConfig(rank=4, alpha=8.0, **cfg_fields))


def test_adapter_for_another_base_is_refused_naming_the_tensor(tmp_path):
    _, directory = _peft_dir(tmp_path, family="qwen3")  # hidden 64 but head_dim 32: other q/k/v/o shapes
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.\w_proj\.lora_\w\.weight has shape .* another base"):
        read_peft_adapter(str(directory), _model_cfg("llama"), LoRAConfig(rank=4, alpha=8.0))


def test_not_an_adapter_directory(tmp_path):
    with pytest.raises(ValueError, match="not a PEFT adapter directory"):
        read_peft_adapter(str(tmp_path), _model_cfg(), LoRAConfig(rank=4))


def _base_chunks(model, cfg, runtime) -> list:
    """megatron chunks holding the base weights of the PEFT-wrapped HF ``model``."""
    from megatron_opsd.models.hf_mapping import hf_to_unsharded
    from megatron_opsd.models.provider import build_model
    from megatron_opsd.models.sharding import load_unsharded
    from tests.hf_fixtures import to_checkpoint_names

    base = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
            for k, v in model.state_dict().items() if "lora_" not in k}
    chunks = build_model(cfg, runtime)
    load_unsharded(chunks, dict(hf_to_unsharded(to_checkpoint_names(base, cfg.model_type).items(), cfg)), 0, 1,
                   tied=cfg.tie_word_embeddings)
    return chunks


def _logits(chunks, model, cfg):
    """Ours, PEFT's and PEFT's with the adapters off, on the same random tokens."""
    tokens = torch.randint(0, cfg.vocab_size, (2, 7))
    mask = torch.triu(torch.ones(7, 7, dtype=torch.bool), 1)[None, None].expand(2, 1, 7, 7)
    with torch.no_grad():
        ours = chunks[0](tokens, torch.arange(7).expand(2, 7), mask)[..., :cfg.vocab_size]  # [b, s, V]
        reference = model(tokens).logits
        with model.disable_adapter():
            base_logits = model(tokens).logits
    return ours, reference, base_logits


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_adapters_forward_equals_peft(runtime, tmp_path, family):
    """Our adapters on megatron's fused qkv / gate-up layers give PEFT's logits (targets: a subset, so the
    untargeted parts of the fused layers are exercised too)."""
    from megatron_opsd.models.lora import attach_lora, load_peft_tensors

    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    model, directory = _peft_dir(tmp_path, family=family, target_modules=targets)
    cfg = _model_cfg(family)
    chunks = _base_chunks(model, cfg, runtime)
    lora = LoRAConfig(rank=4, alpha=8.0, targets=targets)
    attach_lora(chunks, cfg, lora, runtime, seed=0)
    load_peft_tensors(chunks, read_peft_adapter(str(directory), cfg, lora), "adapter")
    ours, reference, base_logits = _logits(chunks, model, cfg)
    assert (reference - base_logits).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(ours.float(), reference, atol=2e-5, rtol=1e-5)


def test_peft_init_is_layout_free_kaiming_a_and_zero_b(runtime):
    from megatron_opsd.models.lora import adapter_items, attach_lora
    from megatron_opsd.models.provider import build_model

    cfg = _model_cfg()
    chunks = build_model(cfg, runtime)
    attach_lora(chunks, cfg, LoRAConfig(rank=4), runtime, seed=3)
    shapes = peft_shapes(cfg, LoRAConfig(rank=4))
    for key, lora, name in adapter_items(chunks):
        value = getattr(lora, name)
        assert tuple(value.shape) == shapes[key]
        if name.endswith("_B"):
            assert not value.any()
        else:
            assert value.abs().max() <= 1 / shapes[key][1] ** 0.5 and value.std() > 0
    trainable = {n for c in chunks for n, p in c.named_parameters() if p.requires_grad}
    assert trainable and all("_lora." in n for n in trainable)


def test_rollout_samples_with_the_adapters_on(runtime, tmp_path):
    """The student samples with its adapters: greedy tokens equal PEFT's ``generate`` (KV-cached and
    left-padded prompts in our engine); switched off, they equal the base model's."""
    from megatron_opsd.models.lora import adapters_set, attach_lora, load_peft_tensors
    from megatron_opsd.rollout import MegatronRolloutEngine, SamplingParams
    from tests.distributed.workers.rollout_common import PROMPTS, hf_greedy, megatron_from_hf

    from tests.hf_fixtures import build_hf_model

    model, directory = _peft_dir(tmp_path)
    chunks, cfg = megatron_from_hf(build_hf_model("llama"), runtime)  # the same base weights (seed 0)
    lora = LoRAConfig(rank=4, alpha=8.0)
    attach_lora(chunks, cfg, lora, runtime, seed=0)
    load_peft_tensors(chunks, read_peft_adapter(str(directory), cfg, lora), "adapter")
    engine = MegatronRolloutEngine(chunks, runtime, vocab_size=cfg.vocab_size)
    greedy = SamplingParams(greedy=True, max_new_tokens=8)
    ours = engine.generate(PROMPTS, greedy).response_ids
    expected = [hf_greedy(model, p, 8, ()) for p in PROMPTS]
    assert ours == expected
    with adapters_set(chunks, "off"), model.disable_adapter():
        base = [hf_greedy(model, p, 8, ()) for p in PROMPTS]
        assert engine.generate(PROMPTS, greedy).response_ids == base
    assert base != expected  # the adapters change the samples


def test_init_from_adapter_exports_bit_identical(runtime, tmp_path):
    """lora.init_from's path (read, check, shard into the adapters) and back out (adapter_items, the
    PEFT writer): the same tensors, bit for bit."""
    from megatron_opsd.models.lora import adapter_items, attach_lora, load_peft_tensors
    from megatron_opsd.models.provider import build_model

    _, directory = _peft_dir(tmp_path)
    cfg, lora = _model_cfg(), LoRAConfig(rank=4, alpha=8.0)
    chunks = build_model(cfg, runtime)
    attach_lora(chunks, cfg, lora, runtime, seed=0)
    original = read_peft_adapter(str(directory), cfg, lora)
    load_peft_tensors(chunks, original, "adapter")
    write_peft_adapter(tmp_path / "out", {k: getattr(m, n).detach() for k, m, n in adapter_items(chunks)}, lora, cfg)
    again = read_peft_adapter(str(tmp_path / "out"), cfg, lora)
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)


def test_ema_teacher_averages_the_adapters_only(runtime):
    """teacher: ema under LoRA: an fp32 average of the adapters (decay 0.5 here), used for the teacher
    forward; the student keeps its own adapters; the base is untouched."""
    from megatron_opsd.models.lora import adapter_items, attach_lora
    from megatron_opsd.models.provider import build_model
    from megatron_opsd.opsd import AdapterTeacher

    cfg = _model_cfg()
    chunks = build_model(cfg, runtime)
    attach_lora(chunks, cfg, LoRAConfig(rank=4, alpha=8.0), runtime, seed=0)
    teacher = AdapterTeacher(chunks, "ema", decay=0.5)
    first = {k: getattr(m, n).detach().clone() for k, m, n in adapter_items(chunks)}
    with torch.no_grad():
        for _, m, n in adapter_items(chunks):
            getattr(m, n).add_(0.3)
    teacher.after_optimizer_step(chunks)
    tokens = torch.randint(0, cfg.vocab_size, (1, 6))
    mask = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)[None, None]
    with torch.no_grad(), teacher.context():
        ema_logits = chunks[0](tokens, torch.arange(6)[None], mask)
    with torch.no_grad():
        student_logits = chunks[0](tokens, torch.arange(6)[None], mask)
        for key, m, n in adapter_items(chunks):
            torch.testing.assert_close(m.ema[n], 0.5 * first[key] + 0.5 * getattr(m, n))
            getattr(m, n).copy_(m.ema[n])  # the student set to the average: the teacher's function
        expected = chunks[0](tokens, torch.arange(6)[None], mask)
    torch.testing.assert_close(ema_logits, expected)
    assert (ema_logits - student_logits).abs().max() > 1e-4


def test_lora_on_moe_attention_adapters_equal_peft_and_mlp_targets_are_refused(runtime, tmp_path):
    """Mixture of experts: attention adapters give PEFT's logits on a Qwen3-MoE; MLP targets (experts)
    are refused up front, naming the option, before any weight is frozen."""
    from megatron_opsd.config import load_config
    from megatron_opsd.models.lora import attach_lora, load_peft_tensors

    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model, directory = _peft_dir(tmp_path, family="qwen3_moe", target_modules=attention)
    cfg = _model_cfg("qwen3_moe")
    chunks = _base_chunks(model, cfg, runtime)
    with pytest.raises(ValueError, match=r"lora.targets \['gate_proj', 'up_proj', 'down_proj'\].*mixture-of-experts"):
        attach_lora(chunks, cfg, LoRAConfig(rank=4, alpha=8.0), runtime, seed=0)
    assert all(p.requires_grad for p in chunks[0].parameters())  # refused before anything changed
    with pytest.raises(ValueError, match="lora.targets"):  # and at start-up, from the config
        load_config(None, ["--model.model_type", "qwen3_moe", "--model.num_experts", "4",
                           "--model.moe_intermediate_size", "32", "--lora.rank", "4"])
    lora = LoRAConfig(rank=4, alpha=8.0, targets=attention)
    attach_lora(chunks, cfg, lora, runtime, seed=0)
    load_peft_tensors(chunks, read_peft_adapter(str(directory), cfg, lora), "adapter")
    ours, reference, base_logits = _logits(chunks, model, cfg)
    assert (reference - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(ours.float(), reference, atol=2e-5, rtol=1e-5)
