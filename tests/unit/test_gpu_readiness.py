"""CPU guards for the GPU path: each test fails on code that would crash or silently train wrong on a
CUDA/NCCL run (issue: GPU readiness), with CUDA, Transformer Engine or the launcher mocked.

The GPU itself is exercised by tests/gpu/ (skipped without CUDA).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from megatron_opsd import parallel
from megatron_opsd.models.description import ModelConfig

REPO = Path(__file__).resolve().parents[2]


def tiny(**overrides) -> ModelConfig:
    fields = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return ModelConfig(**{**fields, **overrides})


@pytest.fixture
def cuda_available(monkeypatch):
    """torch reports a GPU; the calls that would touch it are recorded instead."""
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.setdefault("set_device", index))
    return calls


# ---- 1 and 10: process group backend, launcher environment --------------------------------------------
def _init_with_mocked_group(monkeypatch, env: dict) -> dict:
    seen = {}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_DEVICE_MAX_CONNECTIONS",
                "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID",
                "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend))
    parallel._init_process_group(1)
    seen["env"] = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                  "CUDA_DEVICE_MAX_CONNECTIONS")}
    return seen


def test_cuda_process_group_also_carries_gloo_for_cpu_tensors(monkeypatch, cuda_available):
    """A plain "nccl" group raises on the CPU tensors of metric/eval/stop-flag reductions."""
    seen = _init_with_mocked_group(monkeypatch, {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                                                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"})
    assert seen["backend"] == "cpu:gloo,cuda:nccl"
    assert cuda_available["set_device"] == 1
    assert seen["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"  # megatron's TP overlap / sequence parallel


def test_cpu_process_group_is_gloo(monkeypatch):
    seen = _init_with_mocked_group(monkeypatch, {})
    assert seen["backend"] == "gloo" and seen["env"]["WORLD_SIZE"] == "1"
    assert seen["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] is None


def test_srun_tasks_form_one_world(monkeypatch, cuda_available):
    """``srun python -m megatron_opsd.train`` (no torchrun): every task must not be a world of one."""
    seen = _init_with_mocked_group(monkeypatch, {
        "SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[017-020,031]", "SLURM_JOB_ID": "4242"})
    assert seen["env"] == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu017",
                           "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    assert cuda_available["set_device"] == 1


def test_python_inside_an_sbatch_script_is_a_world_of_one(monkeypatch):
    seen = _init_with_mocked_group(monkeypatch, {"SLURM_PROCID": "0", "SLURM_NTASKS": "8",
                                                 "SLURM_JOB_NODELIST": "n[1-2]"})
    assert seen["env"]["WORLD_SIZE"] == "1" and seen["env"]["RANK"] == "0"


@pytest.mark.parametrize("nodelist, first", [("gpu[003-005,9],cpu1", "gpu003"), ("node1,node2", "node1"),
                                             ("a-b[7]", "a-b7"), ("host", "host")])
def test_first_slurm_host(nodelist, first):
    assert parallel.first_slurm_host(nodelist) == first


def test_megatron_core_version_is_checked_on_gpu_too(monkeypatch, cuda_available):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.99.0")
    with pytest.raises(RuntimeError, match="megatron-core 0.16.1.*found 0.99.0"):
        parallel.init_parallel(parallel.ParallelConfig())


def test_megatron_gloo_groups_are_not_created(monkeypatch):
    from megatron.core import parallel_state

    seen = {}
    real = parallel_state.initialize_model_parallel

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(parallel_state, "initialize_model_parallel", spy)
    rt = parallel.init_parallel(parallel.ParallelConfig(), seed=0)
    rt.destroy()
    assert seen.get("create_gloo_process_groups") is False


def _fake_command(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def test_launchers_set_cuda_device_max_connections(tmp_path):
    """run_opsd.sh hands torchrun CUDA_DEVICE_MAX_CONNECTIONS=1 and hides no warnings wholesale;
    slurm_opsd.sh gives its job step the node's GPUs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_command(bin_dir, "python", 'echo "PYTHON $*"; env | grep -E "^(CUDA_DEVICE_MAX_CONNECTIONS|PYTHONWARNINGS)="\n')
    _fake_command(bin_dir, "srun", 'echo "SRUN $*"; env | grep -E "^CUDA_DEVICE_MAX_CONNECTIONS="\n')
    _fake_command(bin_dir, "scontrol", 'echo node001\n')
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_DEVICE_MAX_CONNECTIONS", "PYTHONWARNINGS")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", NPROC_PER_NODE="2")
    out = subprocess.run(["bash", str(REPO / "examples" / "run_opsd.sh"), "--train.steps", "1"], env=env,
                         capture_output=True, text=True, check=True).stdout
    launch = out[out.rindex("PYTHON -m torch.distributed.run"):]
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in launch and "PYTHONWARNINGS=ignore" not in launch, out
    env.update(SLURM_NNODES="2", SLURM_JOB_NODELIST="node[001-002]", NPROC_PER_NODE="8")
    out = subprocess.run(["bash", str(REPO / "examples" / "slurm_opsd.sh")], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert "--gpus-per-node=8" in out and "CUDA_DEVICE_MAX_CONNECTIONS=1" in out, out


# ---- 2: Transformer Engine's _extra_state -----------------------------------------------------------
class ExtraStateRMSNorm(torch.nn.RMSNorm):
    """Like TE's norms: a module with ``get_extra_state`` (its FP8 metadata)."""

    def get_extra_state(self):
        return {"fp8_meta": 1}

    def set_extra_state(self, state):
        self.loaded_extra_state = state


def _build(cfg, runtime, *, extra_state: bool, monkeypatch):
    from megatron_opsd.models.provider import build_model

    with monkeypatch.context() as m:
        if extra_state:  # the local spec builds torch.nn.RMSNorm at call time
            m.setattr(torch.nn, "RMSNorm", ExtraStateRMSNorm)
        return build_model(cfg, runtime)


@pytest.mark.parametrize("saved_with, loaded_with", [("plain", "extra"), ("extra", "plain")])
def test_checkpoints_load_across_extra_state(runtime, tmp_path, monkeypatch, saved_with, loaded_with):
    """A local-spec checkpoint loads into a model whose norms carry extra state (TE spec on a GPU), and a
    TE-written one into a local-spec model: by the trainer's loader and by the converter's."""
    from megatron_opsd.checkpoint import load_model, save_model
    from megatron_opsd.conversion.megatron_to_hf import load_into

    cfg = tiny(model_type="qwen3", head_dim=8)  # q/k norms too
    source = _build(cfg, runtime, extra_state=saved_with == "extra", monkeypatch=monkeypatch)
    norms = [n for n, _ in source[0].state_dict().items() if n.endswith("layernorm._extra_state")]
    assert bool(norms) == (saved_with == "extra")
    save_model(source, cfg, tmp_path / "ckpt")
    for load in (lambda c: load_model(c, tmp_path / "ckpt"), lambda c: load_into(c, tmp_path / "ckpt")):
        target = _build(cfg, runtime, extra_state=loaded_with == "extra", monkeypatch=monkeypatch)
        with torch.no_grad():
            for p in target[0].parameters():
                p.zero_()
        load(target)
        for (name, a), b in zip(source[0].named_parameters(), target[0].parameters()):
            assert torch.equal(a, b), name


def test_a_checkpoint_of_another_model_is_still_refused(runtime, tmp_path):
    from megatron_opsd.checkpoint import CheckpointError, load_model, save_model
    from megatron_opsd.models.provider import build_model

    save_model(build_model(tiny(), runtime), tiny(), tmp_path / "ckpt")
    qwen3 = tiny(model_type="qwen3", head_dim=8)
    with pytest.raises(CheckpointError, match="lacks .* e.g. .*q_layernorm"):
        load_model(build_model(qwen3, runtime), tmp_path / "ckpt")
    save_model(build_model(qwen3, runtime), qwen3, tmp_path / "qwen3")
    with pytest.raises(CheckpointError, match="holds .* this model does not have"):
        load_model(build_model(tiny(), runtime), tmp_path / "qwen3")


# ---- 3 and 4: fused softmax kernel, Transformer Engine detection ----------------------------------------
def test_fused_masked_softmax_only_with_its_kernel(cuda_available):
    from megatron_opsd.models.provider import ModelBuildConfig, transformer_config

    fake_runtime = SimpleNamespace(config=parallel.ParallelConfig(), tp=1, pp=1, vpp=None)
    config = transformer_config(tiny(), fake_runtime, ModelBuildConfig(dtype="bf16"))
    assert config.masked_softmax_fusion is False  # scaled_masked_softmax_cuda (Apex) is not installed


def test_te_that_megatron_cannot_use_is_not_used(monkeypatch, cuda_available):
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_opsd.models.provider import ModelBuildConfig, have_transformer_engine, layer_spec

    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    assert gpt_layer_specs.HAVE_TE is False  # megatron-core's own TE import failed here
    with pytest.warns(UserWarning, match="cannot use it"):
        assert have_transformer_engine() is False
    with pytest.warns(UserWarning):
        spec = layer_spec(tiny(), ModelBuildConfig(transformer_engine="auto"))
    assert "TE" not in type(spec.submodules.self_attention.submodules.linear_qkv).__name__
    assert spec.submodules.self_attention.submodules.linear_qkv.__name__ == "ColumnParallelLinear"


# ---- 5: EMA teacher in bf16 ---------------------------------------------------------------------------
def test_bf16_ema_teacher_follows_an_fp64_ema(runtime):
    """decay 0.999: each step moves the teacher by 1e-3 of the gap, far below a bf16 ulp of the weights;
    the teacher must still track the exact EMA (its fp32 average, rounded)."""
    from megatron_opsd.models.provider import ModelBuildConfig, build_model
    from megatron_opsd.opsd.teacher import EMATeacher

    cfg, build, decay = tiny(), ModelBuildConfig(dtype="bf16"), 0.999
    student = build_model(cfg, runtime, build)
    teacher = EMATeacher.copy_of(student, cfg, runtime, build, decay)
    initial = [p.detach().double().clone() for p in teacher.chunks[0].parameters()]
    expected = [p.clone() for p in initial]
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        with torch.no_grad():
            for p in student[0].parameters():
                p.add_(0.01 + 0.01 * torch.rand(p.shape, generator=gen).to(p))
        teacher.after_optimizer_step(student)
        for e, s in zip(expected, student[0].parameters()):
            e.mul_(decay).add_(s.detach().double(), alpha=1 - decay)
    assert {p.dtype for p in teacher.chunks[0].parameters()} >= {torch.bfloat16}
    moved = min((t.double() - i).abs().max().item() for t, i in zip(teacher.chunks[0].parameters(), initial)
                if t.dtype == torch.bfloat16)
    assert moved > 5e-3, f"the bf16 EMA teacher did not move ({moved:.1e})"
    for (name, t), m, e in zip(teacher.chunks[0].named_parameters(), teacher.shadow[0].parameters(), expected):
        assert m.dtype == torch.float32
        torch.testing.assert_close(m.double(), e, rtol=1e-6, atol=1e-6, msg=name)  # the fp32 average
        assert torch.equal(t, m.to(t.dtype)), name  # the teacher is its rounding (norms stay fp32)
    assert teacher.state_dict_to_save() is teacher.shadow  # checkpoints keep the fp32 average
    with torch.no_grad():
        for t in teacher.chunks[0].parameters():
            t.zero_()
    teacher.after_load()
    assert all(torch.equal(t, m.to(t.dtype)) for t, m in zip(teacher.chunks[0].parameters(), teacher.shadow[0].parameters()))


# ---- 6: fp16 loss scaling -------------------------------------------------------------------------------
def _sft_step(runtime, chunks_state, dtype: str):
    from megatron_opsd.data.batch import collate_pairs
    from megatron_opsd.data.contexts import build_pair
    from megatron_opsd.engine import OptimConfig, build_optimizer, wrap_ddp
    from megatron_opsd.models.provider import ModelBuildConfig, build_model
    from megatron_opsd.opsd import LossConfig, StepContext, train_step

    cfg = tiny()
    chunks = build_model(cfg, runtime, ModelBuildConfig(dtype=dtype))
    chunks[0].load_state_dict(chunks_state)
    ddp = wrap_ddp(chunks, runtime)
    optimizer = build_optimizer(ddp, runtime, OptimConfig(lr=1e-3, clip_grad=0.0))
    gen = torch.Generator().manual_seed(3)
    pairs = [build_pair(torch.randint(1, 64, (5,), generator=gen).tolist(), [1, 2],
                        torch.randint(1, 64, (12,), generator=gen).tolist(), stop_ids=set(), max_seq_len=64,
                        overlong="drop") for _ in range(2)]
    batches = [collate_pairs(pairs, 0)]
    ctx = StepContext(runtime=runtime, loss=LossConfig(mode="sft"), temperature=1.0, vocab_size=64, teacher=None)
    before = {n: p.detach().double().clone() for n, p in chunks[0].named_parameters()}
    for step in range(40):  # fp16: overflowing steps are skipped while the loss scale comes down
        ctx.step = step
        metrics = train_step(ctx, ddp, optimizer, batches, pad_id=0, clip_grad=0.0)
        if not metrics.get("skipped_step"):
            break
    return metrics, {n: p.detach().double() - before[n] for n, p in chunks[0].named_parameters()}


def test_fp16_updates_match_fp32(runtime):
    """Without the loss scale fed to the schedule, megatron's fp16 optimizer still divides gradients by its
    scale: updates ~1/scale of what they should be."""
    from megatron_opsd.models.provider import build_model

    state = build_model(tiny(), runtime)[0].state_dict()
    ref_metrics, ref = _sft_step(runtime, state, "fp32")
    metrics, got = _sft_step(runtime, state, "fp16")
    assert metrics["loss_scale"] >= 1 and math.isfinite(metrics["grad_norm"])
    assert abs(metrics["grad_norm"] / ref_metrics["grad_norm"] - 1) < 0.02, (metrics, ref_metrics)
    # Adam's first step is ~lr * sign(grad): the same direction where the gradients are not noise
    flat_ref, flat = torch.cat([d.flatten() for d in ref.values()]), torch.cat([got[n].flatten() for n in ref])
    assert torch.nn.functional.cosine_similarity(flat, flat_ref, dim=0) > 0.9
    assert abs(flat.norm() / flat_ref.norm() - 1) < 0.1


# ---- 8: random init does not depend on the layout: tests/distributed/workers/layouts.py (every layout)
def test_random_init_depends_on_seed_and_name_only(runtime):
    from megatron_opsd.models.provider import build_model

    a, b = build_model(tiny(), runtime)[0], build_model(tiny(), runtime)[0]
    layers = a.decoder.layers
    assert torch.equal(a.output_layer.weight, b.output_layer.weight)  # not the RNG's running state
    assert not torch.equal(layers[0].mlp.linear_fc1.weight, layers[1].mlp.linear_fc1.weight)
    std = a.decoder.layers[0].mlp.linear_fc2.weight.std().item()  # megatron's scaled output init
    assert abs(std - 0.02 / math.sqrt(2 * 2)) < 0.003


# ---- 9: rollout attention ---------------------------------------------------------------------------
def test_rollout_attention_reads_softmax_scale_from_the_config():
    """TE's core attention has no ``softmax_scale`` attribute; a model with a configured scale must use it."""
    from megatron_opsd.rollout.attention import RolloutAttention

    s, b, heads, groups, d = 5, 2, 4, 2, 8
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, b, n, d, generator=gen) for n in (heads, groups, groups))
    attention = RolloutAttention.__new__(RolloutAttention)
    attention._cos_sb1d, attention._sin_sb1d = torch.ones(s, 1, 1, d), torch.zeros(s, 1, 1, d)  # no rotation
    attention._keep_b1qk = torch.ones(s, s, dtype=torch.bool).tril()[None, None].expand(b, 1, s, s)
    core = SimpleNamespace(config=SimpleNamespace(softmax_scale=0.3))  # TE-like: no softmax_scale attribute
    out = attention._attend(core, q.clone(), k.clone(), v.clone())
    k_full, v_full = (t.repeat_interleave(heads // groups, dim=2) for t in (k, v))
    scores = torch.einsum("sbhd,kbhd->bhsk", q, k_full) * 0.3
    scores = scores.masked_fill(~attention._keep_b1qk, float("-inf"))
    expected = torch.einsum("bhsk,kbhd->sbhd", scores.softmax(-1), v_full).reshape(s, b, heads * d)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_rollout_attention_on_cuda_expands_groups_instead_of_enable_gqa():
    """With a mask, CUDA's fused SDPA kernels do not take enable_gqa: the math kernel would run."""
    import torch.nn.functional as F

    from megatron_opsd.rollout.attention import sdpa_operands

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(6, 2, n, 8, generator=gen) for n in (4, 2, 2))
    mask = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].expand(2, 1, 6, 6)
    *cpu_ops, cpu_gqa = sdpa_operands(q, k, v, on_cuda=False)
    *cuda_ops, cuda_gqa = sdpa_operands(q, k, v, on_cuda=True)
    assert cpu_gqa and not cuda_gqa and cuda_ops[1].shape[1] == 4
    torch.testing.assert_close(F.scaled_dot_product_attention(*cuda_ops, attn_mask=mask),
                               F.scaled_dot_product_attention(*cpu_ops, attn_mask=mask, enable_gqa=True))


# ---- 11: the single-GPU check script, its CPU-side parts ----------------------------------------------
def test_gpu_check_script_refuses_bad_arguments_and_a_machine_without_gpu():
    script = REPO / "tests" / "gpu" / "run_gpu_checks.sh"
    bad = subprocess.run(["bash", str(script), "--gpus", "8"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument --gpus" in bad.stderr
    no_gpu = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert no_gpu.returncode == 2 and "no CUDA GPU" in no_gpu.stderr, no_gpu.stderr


def test_gpu_check_report_names_items_and_what_is_not_covered(tmp_path):
    xml = tmp_path / "gpu.xml"
    xml.write_text("""<testsuites><testsuite>
      <testcase classname="tests.gpu.test_single_gpu" name="test_fp16_training_step_on_cuda" time="3.5"/>
      <testcase classname="tests.gpu.test_single_gpu" name="test_convert_and_verify_on_cuda" time="1">
        <failure message="x"/></testcase>
      <testcase classname="tests.unit.test_x" name="test_other" time="0"><skipped/></testcase>
    </testsuite></testsuites>""")
    out = subprocess.run([sys.executable, str(REPO / "tests" / "gpu" / "report.py"), str(xml)], capture_output=True,
                         text=True, check=True).stdout
    assert "test_fp16_training_step_on_cuda  passed" in out and "6 fp16 loss scaling" in out
    assert "FAILED" in out and "1 passed, 1 failed, 1 skipped" in out
    assert "not covered here: Transformer Engine" in out
