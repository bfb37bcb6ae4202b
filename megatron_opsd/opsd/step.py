"""The OPSD step: teacher and student context passes of each micro-batch in one pipeline schedule.

Per micro-batch, on every pipeline stage (chunk):

    teacher part   no_grad, teacher weights, teacher context  [L_t, B, H]
    student part   autograd, student weights, student context [L_s, B, H]
    to next stage  cat([student, teacher], dim=0)              [L_s + L_t, B, H]

so teacher activations are never stored for backward. With sequence parallelism (SP) every hidden
state between layers is a sequence shard [L/TP, B, H] (both lengths are padded to a multiple of TP),
so the message is cat([student shard, teacher shard]) [(L_s + L_t)/TP, B, H], split at L_s/TP.

Context parallelism (CP, Transformer Engine attention only): each context is padded to a multiple of
2*CP (times TP under SP) and every CP rank runs the positions megatron's load-balanced split gives it
(``split_for_context_parallel``: chunks r and 2*CP-1-r of 2*CP) [L/CP, B, H]; the two contexts are split
separately, so the message is cat([student part, teacher part]) [(L_s + L_t)/CP, B, H] (/TP with SP).
Attention exchanges keys and values over CP inside TE (with RoPE sliced alike by megatron). Per
micro-batch and context on the last stage: one all-reduce of [B, R, H] over CP (TP x CP with SP) to
select the response rows (``ResponseProjection``), and one of its gradient in backward; each CP rank
then projects and scores a disjoint share of the response tokens (every CP-th), so the vocabulary
projection is not repeated CP times (the materialised reference path computes every row's logits on
each CP rank and scores its share). Rollouts decode without CP: every CP rank samples the same
responses, as TP peers do.

On the last stage the output layer runs only at the response positions of each context (a forward
pre-hook selects them). By default (``loss.fused_projection``) it does not even run there: the hidden
states at those positions go to the loss, which projects student and teacher onto the vocabulary shard
a chunk of tokens at a time and computes the student's gradient in the same pass
(``losses.projected``), so no [R, V/TP] logits tensor exists at any time; the reference path
materialises vocab-sharded logits [B, R, V/TP] for both (the teacher's live only inside their
micro-batch's loss function). The loss is the method's per-token loss (``methods/``, by ``loss.mode``;
OPSD's: ``vocab_parallel_divergence`` or a variant) summed over response tokens.

Normalisation: the loss is the mean over every response token of the step, across all micro-batches
and data-parallel ranks. Each micro-batch's loss function returns (sum over its tokens, its token
count); with ``calculate_per_token_loss`` megatron-core's ``finalize_model_grads`` divides the summed
gradients by the token count summed over micro-batches and DP ranks. Under CP megatron's DDP sums the
gradients over DP x CP and the token counts too: the CP ranks' loss sums are their shares' and CP rank
0 alone counts the micro-batch's tokens. Loss and gradients therefore do not depend on the layout or
the number of micro-batches.

Mixtures of experts: both contexts are routed; megatron-core's routers attach the student's
load-balancing loss (coefficient ``router_aux_loss_coef``) to its routing probabilities, only when
gradients are enabled, so the teacher part adds nothing (``moe_aux_loss``, reported as a metric).
With ``calculate_per_token_loss`` megatron weighs each micro-batch's aux loss by its routed tokens
before the global division by response tokens.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import weakref
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.distributed as dist

from megatron_opsd import cpu_compat
from megatron_opsd.data.batch import (OPSDMicroBatch, context_parallel_share, gather_response_positions, local_rows,
                                      pad_to_lengths, split_for_context_parallel)
from megatron_opsd.engine import forward_backward
from megatron_opsd.losses import vocab_parallel_token_logprobs
from megatron_opsd.losses.projected import projected_token_loss
from megatron_opsd.methods.base import Method, PolicyInputs
from megatron_opsd.opsd.config import LossConfig
from megatron_opsd.opsd.teacher import Teacher, unwrap
from megatron_opsd.parallel import ParallelRuntime


class NonFiniteError(FloatingPointError):
    """NaN or Inf in a loss or gradient; the step and micro-batch are named."""


class ResponseProjection:
    """Makes a GPTModel's output layer run only at selected positions of the last stage.

    ``at(index)``: a forward pre-hook selects the hidden states at ``index`` ([B, R] positions), so the
    output layer returns logits [B, R, V/TP] (the model's output). ``at(index, deferred=True)``: the
    output layer returns those hidden states [B, R, H] instead, with the TP copy its own forward would
    apply (backward all-reduces their gradient over TP), and records the weight it would have used
    (its own, or the tied embedding passed in) in ``weight``: the loss then projects chunk by chunk
    (``losses.projected``), so no [R, V/TP] logits tensor ever exists.

    With sequence parallelism the output layer's input is this rank's sequence shard [L/TP, B, H];
    its own forward would all-gather the whole [L, B, H]. Instead each rank picks the response rows it
    holds (zeros elsewhere) and one all-reduce over TP assembles [B, R, H]; the output layer (or the
    fused loss) then runs on those rows without any further gather. Collectives per micro-batch and
    context on the last stage: forward, one all-reduce of B*R*H over TP (instead of the all-gather of
    L*B*H); backward (student), one all-reduce of the [B, R, H] gradient over TP (instead of the
    reduce-scatter of [L, B, H]), from which each rank keeps its own rows. The same in both paths.

    Context parallelism is the same pattern over the CP group (over TP x CP with sequence parallelism
    too): this rank holds the positions ``context_parallel_positions`` [L/CP, B, H] (then its TP part
    of them under SP), ``local_rows`` maps the response positions to those rows, and one all-reduce of
    B*R*H over CP (TP x CP) assembles [B, R, H] on every rank; backward, one all-reduce of its gradient
    there. Each CP rank then scores its own share of the response tokens (``context_parallel_share``),
    so the rows' gradient is the sum of the CP ranks' parts, which that all-reduce forms.
    """

    def __init__(self, chunk: torch.nn.Module):
        self.index: torch.Tensor | None = None
        self.deferred = False
        self.weight: torch.Tensor | None = None
        output_layer = getattr(chunk, "output_layer", None)
        if output_layer is not None and getattr(chunk, "post_process", False):
            self._sequence_parallel = bool(getattr(output_layer, "sequence_parallel", False))
            self._shards, self._shard_group = _sequence_shards(chunk.pg_collection, self._sequence_parallel)
            output_layer.register_forward_pre_hook(self._select, with_kwargs=True)
            # a weak reference: the layer holds this object (its forward), so a strong one back would
            # make a cycle and keep a dropped model's weights alive until the cyclic GC runs
            self._layer = weakref.ref(output_layer)
            self._tp_group = output_layer.tp_group
            output_layer.forward = self._forward

    def _select(self, module, args, kwargs):
        if self.index is None:
            return None
        hidden_lbh = args[0]
        if self._shard_group is not None:
            selected_brh = _gather_from_sequence_shards(hidden_lbh, self.index, self._shard_group, **self._shards)
        else:
            selected_brh = gather_response_positions(hidden_lbh, self.index)
        return (selected_brh.transpose(0, 1).contiguous(), *args[1:]), kwargs

    def _forward(self, input_, weight=None, runtime_gather_output=None):
        layer = self._layer()
        if self.index is None or not (self.deferred or self._sequence_parallel):
            return type(layer).forward(layer, input_, weight=weight, runtime_gather_output=runtime_gather_output)
        weight = layer.weight if weight is None else weight
        if self._sequence_parallel:  # whole rows already, their gradient reduced over TP (_select)
            if self.deferred:
                self.weight = weight
                return input_, None
            return torch.matmul(input_, weight.t()), None  # vocab-sharded logits, as parallel_output
        self.weight = weight
        return _ReduceGradOverTP.apply(input_, self._tp_group), None

    @contextlib.contextmanager
    def at(self, index: torch.Tensor | None, *, deferred: bool = False):
        self.index, self.deferred, self.weight = index, deferred, None
        try:
            yield self
        finally:
            self.index, self.deferred = None, False


class _ReduceGradOverTP(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient over the TP group, as ColumnParallelLinear
    does for its input. Not megatron-core's ``copy_to_tensor_model_parallel_region``: its backward
    all-reduces ``grad.contiguous()`` and returns ``grad``, so a non-contiguous gradient (ours comes
    back through GPTModel's [s, b, h] -> [b, s, h] transpose when B > 1) would silently stay unreduced.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if ctx.group is not None and dist.get_world_size(ctx.group) > 1:
            dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _sequence_shards(pg_collection, sequence_parallel: bool) -> tuple[dict, dist.ProcessGroup | None]:
    """How the last stage's hidden states are split over ranks (``local_rows``' arguments), and the
    group whose ranks hold the other parts: TP (sequence parallelism), CP, TP x CP, or None (whole)."""
    cp, tp = pg_collection.cp.size(), pg_collection.tp.size()
    shards = dict(cp=cp, cp_rank=pg_collection.cp.rank(), shards=tp if sequence_parallel else 1,
                  shard_rank=pg_collection.tp.rank() if sequence_parallel else 0)
    if sequence_parallel:
        return shards, pg_collection.tp_cp if cp > 1 else pg_collection.tp
    return shards, pg_collection.cp if cp > 1 else None


def _gather_from_sequence_shards(hidden_lbh: torch.Tensor, index: torch.Tensor, group, **shards) -> torch.Tensor:
    """``gather_response_positions`` of the whole sequence, given this rank's part [L/(CP*TP), B, H] of it
    (``local_rows``: under SP rank ``r`` of TP holds rows ``r*L/TP .. (r+1)*L/TP - 1`` of the CP rank's
    positions): [B, R, H] on every rank of ``group``."""
    local = hidden_lbh.shape[0]
    rows_br = local_rows(index, local * shards["cp"] * shards["shards"], **shards)
    own_br = rows_br >= 0
    picked = gather_response_positions(hidden_lbh, rows_br.clamp(min=0))
    return _SumOverRanks.apply(picked * own_br[..., None].to(picked.dtype), group)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) over ``group`` (TP, CP or TP x CP) in forward, and of the gradient in backward:
    every TP rank computes its vocabulary shard's part of the loss from the same rows, every CP rank
    its share of the tokens, so each row's gradient is the sum of the ranks' parts."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def packed_seq_params(side):
    """THD ``PackedSeqParams`` (cu_seqlens) of a packed side: megatron's attention then rotates each
    pair from position 0 and the core attention (Transformer Engine's on GPU, the local spec's
    ``PackedDotProductAttention``) attends within each pair; trailing padding is one more sequence."""
    from megatron.core.packed_seq_params import PackedSeqParams

    sizes = side.pack_lengths.tolist()
    if side.tokens.shape[1] > sum(sizes):
        sizes.append(side.tokens.shape[1] - sum(sizes))
    cu_seqlens = torch.tensor([0, *sizes], dtype=torch.int32, device=side.tokens.device).cumsum(0, dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max(sizes), max_seqlen_kv=max(sizes))


def _model_inputs(chunk: torch.nn.Module, side) -> dict:
    """The model call's inputs for one side: THD packed-sequence parameters for a packed side; for a
    padded one the explicit causal + key-padding mask, or none under Transformer Engine, whose
    attention applies its causal mask type itself (right padding: a real query never sees a padded
    key), so no [B, 1, L, L] mask is built for it (under CP that would be [B, 1, L/CP, L])."""
    cores = [layer.self_attention.core_attention for layer in getattr(unwrap(chunk).decoder, "layers", [])]
    te = bool(cores) and all(type(core).__name__.startswith("TE") for core in cores)
    if not side.packed:
        return dict(attention_mask=None if te else side.attention_mask)
    for core in cores:
        if not (te or getattr(core, "supports_packed_sequences", False)):
            raise ValueError(f"packed micro-batches need a core attention that takes THD sequences; "
                             f"this model has {type(core).__name__}")
    return dict(attention_mask=None, packed_seq_params=packed_seq_params(side))


def _projection(chunk: torch.nn.Module) -> ResponseProjection:
    if not hasattr(chunk, "_opsd_projection"):
        chunk._opsd_projection = ResponseProjection(chunk)
    return chunk._opsd_projection


@dataclass
class StepContext:
    """What the forward step needs besides the micro-batch."""

    runtime: ParallelRuntime
    loss: LossConfig
    temperature: float
    vocab_size: int
    teacher: Teacher | None  # None: no teacher pass (sft, grpo without KL)
    step: int = 0
    detailed_metrics: bool = True
    token_budget: int | None = None
    """loss.advantage=dr_grpo: the constant per-response length the token sum is divided by."""
    logprob_metrics: bool = False
    """Also sum the response tokens' log-probabilities (temperature 1) under student and teacher
    (``opsd.diagnostics.teacher_advantage``)."""
    num_microbatches_seen: int = field(default=0)
    method: Method | None = None
    """The per-token loss, normaliser and metrics on the last stage; None: loss.mode's method."""

    def __post_init__(self) -> None:
        if self.method is None:
            from megatron_opsd.methods import method_for  # (the methods import this package)

            self.method = method_for(self.loss)


def forward_step(ctx: StepContext, student_chunks: list[torch.nn.Module], data_iterator, model, *,
                 grad_scale: float | None = None):
    """megatron-core forward step: ``(output_tensor, loss_func)`` for one OPSD micro-batch.

    ``grad_scale``: the gradient the schedule's backward brings to the loss sum, when known (see
    ``run_schedule``); the fused projection then adds the output layer's dW to ``main_grad`` in forward."""
    index, batch = next(data_iterator)
    student = unwrap(model)
    chunk_id = next(i for i, c in enumerate(student_chunks) if unwrap(c) is student)
    last = bool(student.post_process)
    received = student.decoder.input_tensor  # set by the schedule; None where this chunk embeds
    len_s = batch.student.tokens.shape[1]
    if ctx.runtime.config.sequence_parallel:  # stage messages are sequence shards
        len_s //= ctx.runtime.tp
    student_in = teacher_in = None
    if received is not None:
        student_in, teacher_in = received[:len_s], received[len_s:]

    deferred = ctx.loss.fused_projection
    teacher_out = teacher_weight = None
    if ctx.teacher is not None:
        from megatron_opsd.models.attention import fused_attention_without_grad  # imports megatron-core

        teacher = ctx.teacher.chunks[chunk_id]
        with torch.no_grad(), ctx.teacher.context(), fused_attention_without_grad(), \
                _projection(teacher).at(batch.teacher_index if last else None, deferred=deferred) as head:
            teacher.set_input_tensor(teacher_in.detach() if teacher_in is not None else None)
            teacher_out = teacher(batch.teacher.tokens, batch.teacher.position_ids,
                                  **_model_inputs(teacher, batch.teacher))
            teacher_weight = head.weight

    student.set_input_tensor(student_in)
    with _projection(student).at(batch.student_index if last else None, deferred=deferred) as head:
        student_out = model(batch.student.tokens, batch.student.position_ids, **_model_inputs(model, batch.student))

    if not last:
        if teacher_out is None:
            return student_out, None
        return torch.cat([student_out, teacher_out], dim=0), None
    if deferred:
        return student_out, partial(projected_loss_func, ctx, index, batch, teacher_out, teacher_weight,
                                    head.weight, grad_scale=grad_scale)
    return student_out, partial(loss_func, ctx, index, batch, teacher_out)


def loss_func(ctx: StepContext, index: int, batch: OPSDMicroBatch, teacher_logits: torch.Tensor | None,
              student_logits: torch.Tensor):
    """(sum of per-token losses, response-token count, metric sums) from materialised logits [B, R, V/TP].

    The reference path (``loss.fused_projection: false``); ``projected_loss_func`` is the default.
    """
    mask, method = _scored_share(ctx, batch.loss_mask), ctx.method
    stats: dict = {}
    policy = None if batch.advantages is None else PolicyInputs(batch.advantages, batch.old_logprobs, mask)
    per_token = method.token_loss(ctx, batch.response_ids, student_logits, teacher_logits, policy, stats)
    loss_sum = (per_token * mask).sum()
    detailed = (method.detailed_metrics(ctx, mask, student_logits, teacher_logits, per_token)
                if ctx.detailed_metrics else {})
    if ctx.logprob_metrics:
        detailed.update(_logprob_sums(ctx, mask, batch.response_ids, student_logits, teacher_logits))
    return _loss_output(ctx, index, batch, loss_sum, {**detailed, **stats})


def projected_loss_func(ctx: StepContext, index: int, batch: OPSDMicroBatch, teacher_hidden: torch.Tensor | None,
                        teacher_weight: torch.Tensor | None, student_weight: torch.Tensor,
                        student_hidden: torch.Tensor, *, grad_scale: float | None = None):
    """The same triple from the hidden states [B, R, H] at the response positions.

    Only the response tokens (loss mask != 0) are projected, chunk by chunk, inside the loss
    (``losses.projected``): logits exist for one chunk at a time, for student and teacher alike.
    """
    mask_n = _scored_share(ctx, batch.loss_mask).flatten()
    rows = mask_n.nonzero().squeeze(1)
    hidden_s = student_hidden.flatten(0, 1).index_select(0, rows)
    hidden_t = None if teacher_hidden is None else teacher_hidden.flatten(0, 1).index_select(0, rows)
    ids_n, weights_n = batch.response_ids.flatten()[rows], mask_n[rows]
    policy_n = None
    if batch.advantages is not None:
        policy_n = PolicyInputs(batch.advantages.flatten()[rows], batch.old_logprobs.flatten()[rows], weights_n)
    sums: dict[str, torch.Tensor] = {}

    def token_loss(s_cv, t_cv, chunk):
        policy = None if policy_n is None else PolicyInputs(*(x[chunk] for x in policy_n))
        return ctx.method.token_loss(ctx, ids_n[chunk], s_cv, t_cv, policy, sums)

    def add_metrics(s_cv, t_cv, per_token_c, chunk):
        found = (ctx.method.detailed_metrics(ctx, weights_n[chunk], s_cv, t_cv, per_token_c)
                 if ctx.detailed_metrics else {})
        if ctx.logprob_metrics:
            found.update(_logprob_sums(ctx, weights_n[chunk], ids_n[chunk], s_cv, t_cv))
        for key, value in found.items():
            sums[key] = sums[key] + value if key in sums else value

    loss_sum, _ = projected_token_loss(
        hidden_s, student_weight, hidden_t, teacher_weight, token_loss,
        weights_n, chunk_tokens=ctx.loss.projection_chunk,
        on_chunk=add_metrics if ctx.detailed_metrics or ctx.logprob_metrics else None, grad_scale=grad_scale)
    return _loss_output(ctx, index, batch, loss_sum, sums)


def _scored_share(ctx: StepContext, loss_mask: torch.Tensor) -> torch.Tensor:
    """The response tokens this rank scores: all of them, or under context parallelism this CP rank's
    share (the CP ranks of a micro-batch hold the same [B, R, H] rows and score disjoint shares; their
    loss sums and metric sums add up over CP, as megatron-core sums gradients and token counts over DP x CP)."""
    return context_parallel_share(loss_mask, ctx.runtime.cp, ctx.runtime.cp_rank)


def _loss_output(ctx: StepContext, index: int, batch: OPSDMicroBatch, loss_sum: torch.Tensor, detailed: dict):
    """(loss sum, normaliser, metrics): the normaliser is the method's, the token count or for Dr.GRPO
    the number of responses times the token budget (megatron-core divides the gradients by its global sum,
    over DP x CP: under context parallelism CP rank 0 counts the micro-batch's normaliser and tokens, the
    others 0)."""
    num_tokens = batch.loss_mask.sum()
    normalizer = ctx.method.normalizer(ctx, batch)
    if ctx.runtime.cp_rank:
        num_tokens, normalizer = torch.zeros_like(num_tokens), torch.zeros_like(normalizer)
    metrics = {"loss_sum": loss_sum.detach(), "tokens": num_tokens.detach(), "normalizer": normalizer.detach(),
               **detailed}
    if not torch.isfinite(loss_sum):
        # Raised after the schedule on every rank (raising here would leave the other stages waiting).
        metrics["nonfinite_microbatch"] = index + 1
    return loss_sum, normalizer.to(torch.int), metrics


@torch.no_grad()
def _logprob_sums(ctx: StepContext, mask, response_ids, student_logits, teacher_logits) -> dict:
    """Masked sums of the response tokens' log-probabilities at temperature 1, student and teacher."""
    common = dict(vocab_size=ctx.vocab_size, tp_group=ctx.runtime.tp_group, chunk_size=ctx.loss.chunk_size)
    out = {"student_logprob_sum": (vocab_parallel_token_logprobs(student_logits, response_ids, **common) * mask).sum()}
    if teacher_logits is not None:
        out["teacher_logprob_sum"] = (vocab_parallel_token_logprobs(teacher_logits, response_ids, **common)
                                      * mask).sum()
    return out


def pad_for_layout(batches: list[OPSDMicroBatch], runtime: ParallelRuntime, pad_id: int) -> list[OPSDMicroBatch]:
    """Interleaved pipelines: every micro-batch of the step one length (fixed-shape messages), and their
    number a multiple of PP (megatron runs them in groups of PP; token-budget batching makes the
    number vary): fully masked copies fill it up. Sequence parallelism: each context's length a
    multiple of TP (the embedding scatters it over TP ranks); context parallelism: of 2 * CP (times TP
    with SP; ``split_for_context_parallel`` cuts it into 2 * CP chunks). Expert parallelism: every rank of an
    expert-parallel group runs as many forwards and backwards (each one's token all-to-all needs all of
    them), so a data-parallel rank with fewer micro-batches (token budget, dropped pairs) gets fully
    masked copies up to the most of any rank (their routed pad tokens reach the aux loss only)."""
    if runtime.config.ep > 1:
        most = torch.tensor([len(batches)], dtype=torch.float64, device=runtime.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=runtime.dp_group)
        empty = replace(batches[-1], loss_mask=torch.zeros_like(batches[-1].loss_mask))
        batches = batches + [empty] * (int(most.item()) - len(batches))
    multiple = (runtime.tp if runtime.config.sequence_parallel else 1) * (2 * runtime.cp if runtime.cp > 1 else 1)

    def rounded(n: int) -> int:
        return -(-n // multiple) * multiple

    if runtime.vpp is not None:
        len_s = rounded(max(b.student.tokens.shape[1] for b in batches))
        len_t = rounded(max(b.teacher.tokens.shape[1] for b in batches))
        padded = [pad_to_lengths(b, len_s, len_t, pad_id) for b in batches]
        empty = replace(padded[-1], loss_mask=torch.zeros_like(padded[-1].loss_mask))
        return padded + [empty] * (-len(padded) % runtime.pp)
    if multiple == 1:
        return batches
    return [pad_to_lengths(b, rounded(b.student.tokens.shape[1]), rounded(b.teacher.tokens.shape[1]), pad_id)
            for b in batches]


def run_schedule(ctx: StepContext, ddp_chunks: list[torch.nn.Module], batches: list[OPSDMicroBatch], *,
                 pad_id: int, forward_only: bool = False, grad_scale_func=None) -> dict:
    """Forward (and backward) of this DP rank's micro-batches; returns globally reduced metrics."""
    runtime = ctx.runtime
    batches = pad_for_layout(batches, runtime, pad_id)
    batches = [b.to(runtime.device) for b in batches]
    # the stage message: the student context, and the teacher's when there is a teacher (not in sft);
    # whole lengths (megatron divides them by CP, and by TP under SP)
    longest = max(b.student.tokens.shape[1] + (b.teacher.tokens.shape[1] if ctx.teacher is not None else 0)
                  for b in batches)
    if runtime.cp > 1:
        batches = [split_for_context_parallel(b, runtime.cp, runtime.cp_rank) for b in batches]
    items = list(enumerate(batches))
    iterators = [iter(items) for _ in ddp_chunks] if len(ddp_chunks) > 1 else iter(items)
    moe = moe_layer_count(ddp_chunks)
    if moe:
        clear_moe_aux_losses()
    # With a per-token loss the schedule backpropagates each micro-batch's loss sum times the loss scale
    # (grad_scale_func) and nothing else: a factor known now (fp16's dynamic scale changes only in the
    # optimizer step), which lets the fused projection put dW into main_grad during forward.
    grad_scale = None
    if not forward_only and ddp_chunks[0].config.calculate_per_token_loss:
        grad_scale = 1.0 if grad_scale_func is None else float(grad_scale_func(torch.ones((), device=runtime.device)))
    with torch.no_grad() if forward_only else contextlib.nullcontext():
        stored = forward_backward(
            ddp_chunks, runtime, partial(forward_step, ctx, ddp_chunks, grad_scale=grad_scale), iterators,
            num_microbatches=len(batches), seq_length=longest,
            micro_batch_size=batches[0].loss_mask.shape[0], forward_only=forward_only,
            grad_scale_func=grad_scale_func)
    metrics = reduce_metrics(stored, runtime)
    if moe and not forward_only:
        metrics["moe_aux_loss"] = moe_aux_loss(runtime, moe, len(batches))
    return metrics


def moe_layer_count(chunks: list[torch.nn.Module]) -> int:
    """MoE layers of the whole model (0 for dense models)."""
    pattern = getattr(chunks[0].config, "moe_layer_freq", None) if chunks[0].config.num_moe_experts else None
    return sum(pattern) if isinstance(pattern, list) else (chunks[0].config.num_layers if pattern else 0)


def clear_moe_aux_losses() -> None:
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    clear_aux_losses_tracker()


def moe_aux_loss(runtime: ParallelRuntime, num_moe_layers: int, num_microbatches: int) -> float:
    """The student's load-balancing loss (without its coefficient), averaged over MoE layers, micro-batches
    and data-parallel ranks: what megatron-core's routers added to the objective this step, as
    ``router_aux_loss_coef`` x this value per micro-batch (its gradient enters through
    ``MoEAuxLossAutoScaler``).

    megatron-core's routers record it in a process-wide tracker, only when gradients are enabled: the
    teacher part (under no_grad) neither adds to it nor attaches an aux-loss gradient (nor updates an
    expert bias). Each stage holds its own layers' values; every TP rank holds the same value.
    """
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    tracker = get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
    total = torch.zeros(1, dtype=torch.float64, device=runtime.device)
    if tracker is not None:
        total += tracker["values"].double().sum().to(runtime.device)
    if runtime.pp > 1:
        dist.all_reduce(total, group=runtime.pp_group)
    dist.all_reduce(total, group=runtime.dp_group)
    clear_moe_aux_losses()
    return total.item() / (num_moe_layers * num_microbatches * runtime.dp)


METRIC_KEYS = ("loss_sum", "tokens", "normalizer", "entropy_student_sum", "entropy_teacher_sum", "divergence_sum",
               "clipped_tokens", "ratio_clipped_sum", "kl_sum", "student_logprob_sum", "teacher_logprob_sum")


def reduce_metrics(stored: list[dict], runtime: ParallelRuntime) -> dict:
    """Sum the micro-batch metrics over micro-batches and DP x CP ranks (CP ranks score disjoint shares of
    their DP rank's tokens, CP rank 0 counts them); share them with every stage."""
    sums = torch.zeros(len(METRIC_KEYS), dtype=torch.float64)  # filled on the CPU, reduced on the device
    present = torch.zeros(len(METRIC_KEYS), dtype=torch.float64)
    for item in stored:
        for i, key in enumerate(METRIC_KEYS):
            if key in item:
                sums[i] += float(item[key])
                present[i] = 1
    bad = max((int(item.get("nonfinite_microbatch", 0)) for item in stored), default=0)
    both = torch.cat([sums, present, torch.tensor([float(bad)], dtype=torch.float64)]).to(runtime.device)
    if runtime.pp > 1:  # metrics exist on the last stage only
        dist.broadcast(both, src=runtime.last_stage_global_rank, group=runtime.pp_group)
    sums, flags = both.split([len(METRIC_KEYS), len(METRIC_KEYS) + 1])
    dist.all_reduce(sums, group=runtime.dp_cp_group)
    # a metric reported by any DP rank is reported (a rank whose micro-batches hold no response token
    # has no per-chunk metrics in the fused path)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=runtime.dp_cp_group)
    present, bad = flags.split([len(METRIC_KEYS), 1])
    if bad.item():
        raise NonFiniteError(f"non-finite loss in micro-batch {int(bad.item()) - 1} (of some data-parallel "
                             "rank): the step was not applied")
    tokens = max(sums[1].item(), 1.0)
    out = {"loss": sums[0].item() / max(sums[2].item(), 1.0), "response_tokens": int(sums[1].item())}
    names = {"entropy_student_sum": "entropy_student", "entropy_teacher_sum": "entropy_teacher",
             "divergence_sum": "divergence", "clipped_tokens": "clip_fraction",
             "ratio_clipped_sum": "ratio_clip_fraction", "kl_sum": "kl", "student_logprob_sum": "student_logprob",
             "teacher_logprob_sum": "teacher_logprob"}
    for i, key in enumerate(METRIC_KEYS[3:], start=3):
        if present[i]:
            out[names[key]] = sums[i].item() / tokens
    return out


def zero_grads(ddp_chunks: list[torch.nn.Module], optimizer) -> None:
    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    if optimizer is not None:
        optimizer.zero_grad()


def optimizer_step(optimizer, clip_grad: float, step: int) -> float | None:
    """megatron-core optimizer step with a finite-gradient check before any update is applied.

    Returns the global gradient norm before clipping, or None for a step skipped by fp16's dynamic
    loss scaling (an overflow: megatron's scaler has already lowered the scale, as in Megatron-LM).
    Non-finite gradients under bf16/fp32 (no scaler to blame) stop the run.
    """
    found_inf = optimizer.prepare_grads()  # fp16: unscale, check for overflow, update the loss scale
    if found_inf and _dynamic_loss_scaling(optimizer):
        return None
    grad_norm = optimizer.get_grad_norm()
    if found_inf or not math.isfinite(grad_norm):
        raise NonFiniteError(f"non-finite gradient norm ({grad_norm}) at step {step}: no update applied")
    if clip_grad > 0:
        clip_by_total_norm(optimizer, clip_grad, grad_norm)
    optimizer.step_with_ready_grads()
    cpu_compat.release_free_heap()  # the backward's freed pages, before the next rollout allocates on top
    return grad_norm


def clip_by_total_norm(optimizer, max_norm: float, total_norm: float) -> None:
    """Scale every gradient by max_norm / total_norm when above, as megatron-core's ChainedOptimizer.step:
    with expert parallelism the optimizer chains a dense and an expert optimizer (their parameters
    reduce over different data-parallel groups), and ``clip_grad_norm`` of a chain is refused."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = opt.get_parameters()
        if params:
            clip_grad_by_total_norm_fp32(params, max_norm=max_norm, total_norm=total_norm,
                                         use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)


def _dynamic_loss_scaling(optimizer) -> bool:
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler

    return any(isinstance(getattr(opt, "grad_scaler", None), DynamicGradScaler)
               for opt in getattr(optimizer, "chained_optimizers", [optimizer]))


def check_finite_weights(chunks: list[torch.nn.Module], runtime: ParallelRuntime, step: int) -> None:
    """After the update: stop if any weight on any rank became NaN/Inf (a finite gradient can still
    give a non-finite update, e.g. an fp16/bf16 overflow). One fused max-abs per rank (NaN propagates,
    no overflow) and one scalar all-reduce over the world (ranks hold other shards and stages)."""
    if os.environ.get("MEGATRON_OPSD_FAULT") == f"nonfinite_update:{step}":  # tests: a poisoned update
        with torch.no_grad():
            next(chunks[0].parameters()).view(-1)[0] = float("nan")
    params = [p.detach() for chunk in chunks for p in chunk.parameters() if p.requires_grad]  # (LoRA: adapters)
    largest = torch.stack(torch._foreach_norm(params, float("inf"))).max() if params else torch.zeros(())
    flag = torch.tensor([0.0 if torch.isfinite(largest) else 1.0], device=runtime.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        raise NonFiniteError(f"step {step}: the optimizer update made weights non-finite (NaN/Inf); "
                             "lower optim.lr or optim.clip_grad")


def train_step(ctx: StepContext, ddp_chunks: list[torch.nn.Module], optimizer, batches: list[OPSDMicroBatch],
               *, pad_id: int, clip_grad: float, scheduler=None) -> dict:
    """One optimizer step on this DP rank's micro-batches; returns metrics (same on every rank)."""
    start = time.perf_counter()
    zero_grads(ddp_chunks, optimizer)
    try:
        metrics = run_schedule(ctx, ddp_chunks, batches, pad_id=pad_id, grad_scale_func=optimizer.scale_loss)
    except NonFiniteError as exc:
        raise NonFiniteError(f"step {ctx.step}: {exc}") from None
    grad_norm = optimizer_step(optimizer, clip_grad, ctx.step)
    metrics["skipped_step"] = float(grad_norm is None)
    if ddp_chunks[0].config.fp16:
        metrics["loss_scale"] = float(optimizer.get_loss_scale())
    if grad_norm is not None:
        metrics["grad_norm"] = grad_norm
        check_finite_weights(ddp_chunks, ctx.runtime, ctx.step)
        if ctx.teacher is not None:
            ctx.teacher.after_optimizer_step(ddp_chunks)
    if scheduler is not None:
        scheduler.step(increment=1)
        metrics["lr"] = optimizer.param_groups[0]["lr"]
    elapsed = time.perf_counter() - start
    metrics["step_time_s"] = elapsed
    metrics["tokens_per_s"] = metrics["response_tokens"] / max(elapsed, 1e-9)
    return metrics
