"""Run the original HF model and the converted megatron checkpoint on the same tokens; compare logits.

The HF side is transformers' own implementation (eager attention, fp32): the independent reference.
A checkpoint stored in bf16/fp16 is compared with the HF weights rounded to that dtype (what a correct
conversion to it holds), both computed in fp32, so the fp32 tolerance applies and the line says so.
The megatron side loads the dist checkpoint at the requested TP/PP layout (under torchrun, world size
a multiple of tp*pp; or a single process for TP=1/PP=1) and runs megatron-core's forward schedule.
Vocab-sharded logits are gathered here, for the comparison only; TP padding columns are dropped.

Metrics (over every token): max |Δlogit|, mean KL(HF || megatron) in nats, argmax agreement.
Verdict: pass when max |Δlogit| <= atol (and KL is finite).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass
class Comparison:
    max_abs_diff: float
    mean_kl: float
    argmax_agreement: float
    num_tokens: int

    def passed(self, atol: float) -> bool:
        return self.max_abs_diff <= atol and self.mean_kl == self.mean_kl  # NaN KL fails

    def line(self) -> str:
        return (f"max|dlogit|={self.max_abs_diff:.3e} KL(HF||megatron)={self.mean_kl:.3e} "
                f"argmax agreement={100 * self.argmax_agreement:.2f}% over {self.num_tokens} tokens")


def compare_logits(reference_blv: torch.Tensor, candidate_blv: torch.Tensor) -> Comparison:
    """Compare [B, L, V] logits (same V: drop padding columns first), in float64."""
    if reference_blv.shape != candidate_blv.shape:
        raise ValueError(f"logit shapes differ: {tuple(reference_blv.shape)} vs {tuple(candidate_blv.shape)}")
    ref, cand = reference_blv.double(), candidate_blv.double()
    logp_ref, logp_cand = ref.log_softmax(-1), cand.log_softmax(-1)
    kl_t = (logp_ref.exp() * (logp_ref - logp_cand)).sum(-1)
    return Comparison(max_abs_diff=(ref - cand).abs().max().item(), mean_kl=kl_t.mean().item(),
                      argmax_agreement=(ref.argmax(-1) == cand.argmax(-1)).double().mean().item(),
                      num_tokens=kl_t.numel())


def causal_inputs(tokens_bl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids and megatron's explicit causal mask [B, 1, L, L] (True = masked out)."""
    b, s = tokens_bl.shape
    position_ids = torch.arange(s, device=tokens_bl.device).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=tokens_bl.device), diagonal=1)
    mask = mask[None, None].expand(b, 1, s, s)
    return position_ids, mask


@torch.no_grad()
def megatron_logits(chunks: list[torch.nn.Module], runtime, tokens_bl: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary logits [B, L, Vp] on the last pipeline stage (None elsewhere).

    One forward through megatron-core's (pipelined) schedule, one sequence per micro-batch; the last
    stage all-gathers its vocab shards over the TP group (for comparison only: training keeps logits
    sharded). Interleaved pipelines (VPP) need B >= PP micro-batches.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_opsd import cpu_compat

    tokens_bl = tokens_bl.to(runtime.device)  # the model's device (token ids are made on the CPU)
    num_sequences, seq_len = tokens_bl.shape
    if runtime.vpp is not None and num_sequences < runtime.pp:
        raise ValueError(f"an interleaved pipeline (vpp={runtime.vpp}) needs at least pp={runtime.pp} "
                         f"sequences, got {num_sequences}")
    position_ids, mask = causal_inputs(tokens_bl[:1])
    seen: dict[int, torch.Tensor] = {}

    def forward_step(data_iterator, model):
        i = next(data_iterator)
        output = model(tokens_bl[i:i + 1], position_ids, mask)

        def loss_func(logits):
            seen[i] = logits.detach().clone()
            return logits.new_zeros(()), {}

        return output, loss_func

    indices = range(num_sequences)
    iterators = [iter(indices) for _ in chunks] if len(chunks) > 1 else iter(indices)
    schedule = get_forward_backward_func()
    with cpu_compat.placement_context():
        schedule(forward_step_func=forward_step, data_iterator=iterators,
                 model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=num_sequences,
                 seq_length=seq_len, micro_batch_size=1, forward_only=True)
    if not runtime.is_last_stage:
        return None
    local = torch.cat([seen[i] for i in indices])
    if runtime.tp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(runtime.tp)]
    dist.all_gather(parts, local.contiguous(), group=runtime.tp_group)
    return torch.cat(parts, dim=-1)


def hf_reference_logits(hf_dir: str | Path, tokens_bl: torch.Tensor,
                        round_to: torch.dtype = torch.float32) -> torch.Tensor:
    """transformers' fp32 logits; with ``round_to`` the weights are first rounded to that dtype, as a
    conversion to it rounds them (except norms: megatron keeps them in fp32), and computed in fp32."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(param.to(round_to).float())
        return model(input_ids=tokens_bl, use_cache=False).logits


def config_differences(hf_dir: str | Path, megatron_dir: str | Path) -> list[str]:
    """Fields where the HF config and the checkpoint's model.json disagree."""
    from megatron_opsd.checkpoint import read_model_json
    from megatron_opsd.models.description import ModelConfig

    a, b = ModelConfig.from_hf(hf_dir), read_model_json(megatron_dir)
    return [f"{f.name}: HF {getattr(a, f.name)!r} vs megatron {getattr(b, f.name)!r}"
            for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]


def verify(hf_dir: str | Path, megatron_dir: str | Path, *, tp: int = 1, pp: int = 1, ep: int = 1,
           etp: int | None = None, atol: float = 1e-4,
           batch_size: int = 2, seq_len: int = 64, seed: int = 0, log=print) -> tuple[Comparison, bool]:
    """Compare logits; every rank returns the same (comparison, passed). Collective under torchrun."""
    from megatron_opsd.checkpoint import read_model_json
    from megatron_opsd.conversion.megatron_to_hf import checkpoint_dtype, load_into, resolve_checkpoint_dir
    from megatron_opsd.models.provider import ModelBuildConfig, build_model
    from megatron_opsd.parallel import ParallelConfig, init_parallel

    megatron_dir = resolve_checkpoint_dir(megatron_dir, log=lambda *a: None)
    cfg = read_model_json(megatron_dir)
    cfg.check_sequence_length(seq_len)  # sliding window: refuse sequences the model cannot handle
    if seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len={seq_len} exceeds max_position_embeddings={cfg.max_position_embeddings}")
    runtime = init_parallel(ParallelConfig(tp=tp, pp=pp, ep=ep, etp=etp))
    rank0 = runtime.rank == 0
    try:
        differences = config_differences(hf_dir, megatron_dir)
        if differences and rank0:
            log("config mismatch between HF config.json and model.json:\n  " + "\n  ".join(differences))
        tokens_bl = torch.randint(0, cfg.vocab_size, (batch_size, seq_len),
                                  generator=torch.Generator().manual_seed(seed))
        chunks = build_model(cfg, runtime, ModelBuildConfig(dtype="fp32", init_weights=False,
                                                             transformer_engine="off"))
        for chunk in chunks:
            chunk.eval()
        load_into(chunks, megatron_dir)
        stored = checkpoint_dtype(megatron_dir)
        logits = megatron_logits(chunks, runtime, tokens_bl)
        # One rank (last stage, TP rank 0, first DP replica) computes the reference and the metrics.
        judge = runtime.is_last_stage and runtime.tp_rank == 0 and runtime.dp_rank == 0
        result = torch.zeros(5, dtype=torch.float64, device=runtime.device)
        if judge:  # the HF reference runs on the CPU
            reference = hf_reference_logits(hf_dir, tokens_bl, round_to=stored)
            c = compare_logits(reference, logits[..., :cfg.vocab_size].cpu())
            result = torch.tensor([c.max_abs_diff, c.mean_kl, c.argmax_agreement, c.num_tokens, 1.0],
                                  dtype=torch.float64, device=runtime.device)
        dist.all_reduce(result)  # only the judge contributes
        assert result[4] == 1, "exactly one rank computes the comparison"
        comparison = Comparison(result[0].item(), result[1].item(), result[2].item(), int(result[3]))
        passed = comparison.passed(atol) and not differences
        if rank0:
            name = str(stored).removeprefix("torch.")
            compared = ("fp32 weights" if stored == torch.float32 else
                        f"{name} checkpoint vs HF weights rounded to {name}; both computed in fp32")
            experts = f" EP={ep} ETP={runtime.config.etp}" if cfg.is_moe else ""
            log(f"verify TP={tp} PP={pp}{experts} ({compared}): {comparison.line()} -> {'PASS' if passed else 'FAIL'} "
                f"(atol={atol:g})")
        return comparison, passed
    finally:
        runtime.destroy()


def write_report(path: str | Path, comparison: Comparison, passed: bool, atol: float) -> None:
    Path(path).write_text(json.dumps({**dataclasses.asdict(comparison), "passed": passed, "atol": atol},
                                     indent=2))
