"""The built-in rollout engine: KV-cached sampling on the training model's own megatron-core shards.

One call of ``generate`` runs, per batch of prompts:

1. Left-pad the prompts to a common length P (pad slots are masked out of attention as keys).
2. Prefill: one forward of the [b, P] prompt block with megatron-core's ``StaticInferenceContext``,
   which stores every layer's keys/values; then one forward per new token, of the [b, 1] last tokens
   against the cache. ``kv_cache=False`` instead recomputes the whole sequence every step (a
   reference for tests and benchmarks; same sampler, same masks).
3. The last pipeline stage samples from its vocabulary-sharded logits (``sampler.py``: nothing
   vocabulary-sized crosses ranks) and broadcasts the tokens and log-probabilities to the other
   stages; every rank of the model-parallel group ends with the same ``Rollout``.

Positions. Megatron's static KV cache applies RoPE at the cache slot (the absolute index in the padded
block), not at ``position_ids``; a row with q pad slots therefore sees its tokens rotated by q more
than when alone. RoPE attention scores depend only on position differences, so this is the same model
(tests check tokens against HF ``generate`` on each prompt alone); ``position_ids`` passed to the model
still start at each row's first real token for models with learned absolute positions.

Megatron-core's ``GPTModel`` insists on gathering logits across TP ranks in inference mode
(``runtime_gather_output=True``); a forward pre-hook on the last stage's output layer keeps them sharded
and restricts them to the last position (the only one sampled from).

Pipeline: stages run one after another for every forward (prefill and each decode step), passing
[tokens, b, hidden] activations with point-to-point send/recv on ``runtime.pp_group``; interleaved
chunks (VPP) are walked in model order. Data parallel: each DP rank samples its own prompts.

The model runs in eval mode under ``torch.no_grad()`` and is put back in its previous mode; the KV
cache lives only for one batch of one call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from megatron_opsd import cpu_compat
from megatron_opsd.parallel import ParallelRuntime
from megatron_opsd.rollout import noise
from megatron_opsd.rollout.sampler import VocabSlice, sample_next, vocab_slice
from megatron_opsd.rollout.types import Rollout, SampleKey, SamplingParams


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside a DDP (or other ``.module``) wrapper."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


class MegatronRolloutEngine:
    """Samples from ``chunks`` (this rank's GPTModel chunks, DDP-wrapped or not) under ``runtime``.

    ``vocab_size``: the true vocabulary (the model's may be padded; padded ids are never sampled).
    ``pad_id``: token fed at pad slots (never attended to). ``max_batch_size``: prompts per forward
    (larger requests are split; results do not depend on the split). ``kv_cache``: False recomputes
    the full sequence every step (reference path).
    """

    def __init__(self, chunks: Sequence[torch.nn.Module], runtime: ParallelRuntime, *, vocab_size: int,
                 pad_id: int = 0, max_batch_size: int | None = None, kv_cache: bool = True) -> None:
        self.chunks = list(chunks)
        self.runtime = runtime
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.max_batch_size = max_batch_size
        self.kv_cache = kv_cache
        config = _unwrap(self.chunks[0]).config
        if config.sequence_parallel:
            raise ValueError("rollout does not support sequence_parallel=true (stage activations would be "
                             "sequence-sharded); turn it off or use an external rollout engine")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1 (or None: one batch)")
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id={pad_id} must be a token id in [0, vocab_size={vocab_size})")
        self.hidden_size = config.hidden_size
        self.dtype = config.pipeline_dtype or config.params_dtype
        pp_ranks = dist.get_process_group_ranks(runtime.pp_group)
        self._next_rank = pp_ranks[(runtime.pp_rank + 1) % runtime.pp]
        self._prev_rank = pp_ranks[(runtime.pp_rank - 1) % runtime.pp]
        self._last_rank = pp_ranks[-1]

    # ---- public --------------------------------------------------------------------------------
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams,
                 keys: Sequence[SampleKey] | None = None) -> Rollout:
        prompts = [list(map(int, p)) for p in prompt_token_ids]
        keys = list(keys) if keys is not None else [SampleKey(prompt_id=i) for i in range(len(prompts))]
        self._check(prompts, keys, sampling)
        rollout = Rollout()
        size = self.max_batch_size or max(len(prompts), 1)
        with self._inference_mode():
            for start in range(0, len(prompts), size):
                rollout.extend(self._generate_batch(prompts[start:start + size], keys[start:start + size],
                                                    sampling))
        return rollout

    # ---- one batch -----------------------------------------------------------------------------
    def _generate_batch(self, prompts: list[list[int]], keys: list[SampleKey],
                        sampling: SamplingParams) -> Rollout:
        from megatron.core.inference.contexts import StaticInferenceContext

        device = self.runtime.device
        b, max_new = len(prompts), sampling.max_new_tokens
        prompt_len = max(len(p) for p in prompts)
        total = prompt_len + max_new
        tokens_bt = torch.full((b, total), self.pad_id, dtype=torch.int64, device=device)
        lens_b = torch.tensor([len(p) for p in prompts], device=device)
        for i, p in enumerate(prompts):
            tokens_bt[i, prompt_len - len(p): prompt_len] = torch.tensor(p, device=device)
        first_b = prompt_len - lens_b  # slot of each row's first real token
        slots_t = torch.arange(total, device=device)
        real_bt = slots_t[None, :] >= first_b[:, None]  # pad slots are never attended to
        positions_bt = (slots_t[None, :] - first_b[:, None]).clamp_(min=0)
        stop_ids = torch.tensor(sampling.stop_ids or [-1], device=device)

        context = StaticInferenceContext(b, total) if self.kv_cache else None
        out_tokens, out_sampling, out_model = [], [], []
        finished_b = torch.zeros(b, dtype=torch.bool, device=device)
        done_at = torch.full((b,), max_new, dtype=torch.int64, device=device)
        try:
            for step in range(max_new):
                end = prompt_len + step  # slots [0, end) are known
                start = 0 if (context is None or step == 0) else end - 1
                mask = ~(real_bt[:, None, None, :end]
                         & (slots_t[None, None, start:end, None] >= slots_t[None, None, None, :end]))
                logits_bv = self._forward(tokens_bt[:, start:end], positions_bt[:, start:end], mask, context)
                if context is not None:
                    context.sequence_len_offset = end
                sample = self._sample_and_share(logits_bv, keys, step, sampling, b)
                token_b = sample[:, 0].long()
                out_tokens.append(token_b)
                out_sampling.append(sample[:, 1])
                out_model.append(sample[:, 2])
                tokens_bt[:, end] = torch.where(finished_b, self.pad_id, token_b)
                newly_b = ~finished_b & torch.isin(token_b, stop_ids)
                done_at = torch.where(newly_b, step + 1, done_at)
                finished_b |= newly_b
                if bool(finished_b.all()):
                    break
        finally:
            if context is not None:  # free the cache now, not when the caller drops the engine
                context.key_value_memory_dict.clear()
        return self._to_rollout(out_tokens, out_sampling, out_model, done_at, finished_b)

    def _sample_and_share(self, logits_bv: torch.Tensor | None, keys: list[SampleKey], step: int,
                          sampling: SamplingParams, b: int) -> torch.Tensor:
        """fp64 [b, 3] (token id, sampling log-prob, model log-prob), the same on every rank."""
        runtime = self.runtime
        packed = torch.empty((b, 3), dtype=torch.float64, device=runtime.device)
        if runtime.is_last_stage:
            vs = self._vocab_slice(logits_bv.shape[-1])
            keys_b = noise.row_keys(sampling.seed, keys, step, runtime.device)
            s = sample_next(logits_bv, keys_b, sampling, vs)
            packed[:, 0], packed[:, 1], packed[:, 2] = s.token_ids.double(), s.sampling_logprobs, s.model_logprobs
        if runtime.pp > 1:
            dist.broadcast(packed, src=self._last_rank, group=runtime.pp_group)
        return packed

    def _vocab_slice(self, num_local: int) -> VocabSlice:
        group = self.runtime.tp_group if self.runtime.tp > 1 else None
        return vocab_slice(num_local, self.vocab_size, group)

    def _to_rollout(self, tokens, sampling_lp, model_lp, done_at_b, finished_b) -> Rollout:
        tokens_bn = torch.stack(tokens, dim=1).tolist()
        sampling_bn = torch.stack(sampling_lp, dim=1).float().tolist()
        model_bn = torch.stack(model_lp, dim=1).float().tolist()
        rollout = Rollout()
        for i, n in enumerate(done_at_b.tolist()):
            n = min(n, len(tokens_bn[i]))
            rollout.response_ids.append(tokens_bn[i][:n])
            rollout.sampling_logprobs.append(sampling_bn[i][:n])
            rollout.model_logprobs.append(model_bn[i][:n])
            rollout.finish_reasons.append("stop" if finished_b[i] else "length")
        return rollout

    # ---- model forward across chunks and stages ------------------------------------------------
    def _forward(self, tokens_bs: torch.Tensor, positions_bs: torch.Tensor, mask_b1qk: torch.Tensor,
                 context) -> torch.Tensor | None:
        """Run every chunk of this rank in model order; the last stage returns logits [b, V/TP] of the
        last position, other ranks None."""
        runtime = self.runtime
        b, s = tokens_bs.shape
        num_chunks = len(self.chunks)
        logits_bv = None
        for v, chunk in enumerate(self.chunks):
            model = _unwrap(chunk)
            if not (v == 0 and runtime.is_first_stage):
                hidden_sbh = torch.empty((s, b, self.hidden_size), dtype=self.dtype, device=runtime.device)
                dist.recv(hidden_sbh, src=self._prev_rank)
                model.set_input_tensor(hidden_sbh)
            kwargs = dict(inference_context=context, runtime_gather_output=True) if context is not None else {}
            out = chunk(tokens_bs, positions_bs, mask_b1qk, **kwargs)
            if v == num_chunks - 1 and runtime.is_last_stage:
                logits_bv = out[:, -1, :]
            else:
                dist.send(out.contiguous(), dst=self._next_rank)
        return logits_bv

    @contextlib.contextmanager
    def _inference_mode(self) -> Iterator[None]:
        """Eval mode, no autograd, sharded last-position logits; everything restored on exit."""
        modes = [c.training for c in self.chunks]
        hooks = []
        try:
            for chunk in self.chunks:
                chunk.eval()
                model = _unwrap(chunk)
                if getattr(model, "post_process", False):
                    hooks.append(model.output_layer.register_forward_pre_hook(_last_position_sharded,
                                                                              with_kwargs=True))
            with torch.no_grad(), cpu_compat.placement_context():
                yield
        finally:
            for hook in hooks:
                hook.remove()
            for chunk, mode in zip(self.chunks, modes):
                chunk.train(mode)
                _unwrap(chunk).set_input_tensor(None)

    # ---- validation ----------------------------------------------------------------------------
    def _check(self, prompts: list[list[int]], keys: list[SampleKey], sampling: SamplingParams) -> None:
        if len(keys) != len(prompts):
            raise ValueError(f"got {len(keys)} sample keys for {len(prompts)} prompts: pass one per prompt")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
            bad = [t for t in p if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids {bad[:5]} outside [0, vocab_size={self.vocab_size})")
        bad_stops = [t for t in sampling.stop_ids if t >= self.vocab_size]
        if bad_stops:
            raise ValueError(f"sampling.stop_ids {bad_stops} are outside [0, vocab_size={self.vocab_size})")


def _last_position_sharded(module, args, kwargs):
    """Output-layer pre-hook: only the last position's logits, left vocabulary-sharded.

    Why: GPTModel asserts ``runtime_gather_output=True`` in inference mode, which would all-gather the
    full vocabulary on every TP rank each step; the sampler works on the shards instead.
    """
    assert "runtime_gather_output" in kwargs, "megatron-core changed how GPTModel calls its output layer"
    hidden_sbh, *rest = args
    return (hidden_sbh[-1:], *rest), {**kwargs, "runtime_gather_output": False}
