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

Attention. While sampling, ``attention.RolloutAttention`` replaces each layer's core attention: RoPE is
applied once, to queries and to keys as they enter megatron's cache, at each row's own positions
(starting at its first real token, exactly as if it were alone), and the kernel is torch SDPA.
megatron-core's static cache would re-rotate every cached key at every step, by cache slot.

Megatron-core's ``GPTModel`` insists on gathering logits across TP ranks in inference mode
(``runtime_gather_output=True``); a forward pre-hook on the last stage's output layer keeps them sharded
and restricts them to the last position (the only one sampled from).

Pipeline: stages run one after another for every forward (prefill and each decode step), passing
[tokens, b, hidden] activations with point-to-point send/recv on ``runtime.pp_group``; interleaved
chunks (VPP) are walked in model order. Data parallel: each DP rank samples its own prompts.

Shared prefill (``shared_prefill``, with the KV cache): rows of a batch with identical prompts (GRPO's
n samples per prompt) are prefilled once; the cache rows and the first logits are then replicated to
every sample of the prompt, so decoding starts from n copies of one prefill. Samples are those of n
independent prompts with the same keys (each row's noise is its own key's).

The model runs in eval mode under ``torch.no_grad()`` and is put back in its previous mode; the KV
cache lives only for one batch of one call.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from megatron_opsd import cpu_compat
from megatron_opsd.parallel import ParallelRuntime
from megatron_opsd.rollout import noise
from megatron_opsd.rollout.attention import RolloutAttention, select_cache_rows
from megatron_opsd.rollout.packed_linear import PackedLinears, packed_kernel_available
from megatron_opsd.losses.sharding import VocabShard, vocab_shard
from megatron_opsd.rollout.sampler import sample_next
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
    the full sequence every step (reference path). ``packed_weights``: on CPU, run the linears on
    oneDNN-prepacked copies of their weights while sampling (``packed_linear.py``; ignored on CUDA).
    ``leave_placement_mode``: on CPU, run the decode steps of a model on one rank outside
    ``cpu_compat``'s placement mode once a first step has shown they need none
    (``cpu_compat.PlacementFreeRepeats``; False keeps the mode, for comparisons). Neither option changes
    the samples.
    """

    def __init__(self, chunks: Sequence[torch.nn.Module], runtime: ParallelRuntime, *, vocab_size: int,
                 pad_id: int = 0, max_batch_size: int | None = None, kv_cache: bool = True,
                 shared_prefill: bool = True, packed_weights: bool = True,
                 leave_placement_mode: bool = True) -> None:
        self.chunks = list(chunks)
        self.runtime = runtime
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.max_batch_size = max_batch_size
        self.kv_cache = kv_cache
        self.shared_prefill = shared_prefill
        self.packed_weights = packed_weights and runtime.device.type == "cpu" and packed_kernel_available()
        config = _unwrap(self.chunks[0]).config
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1 (or None: one batch)")
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id={pad_id} must be a token id in [0, vocab_size={vocab_size})")
        self._attention = RolloutAttention([_unwrap(c) for c in self.chunks])
        self.hidden_size = config.hidden_size
        self.dtype = config.pipeline_dtype or config.params_dtype
        pp_ranks = dist.get_process_group_ranks(runtime.pp_group)
        self._next_rank = pp_ranks[(runtime.pp_rank + 1) % runtime.pp]
        self._prev_rank = pp_ranks[(runtime.pp_rank - 1) % runtime.pp]
        self._last_rank = pp_ranks[-1]
        # Mixtures of experts with expert parallelism: every forward exchanges tokens with the other
        # ranks of the expert-parallel group (alltoall), whose data-parallel replicas have other prompts.
        # They decode in lockstep: as many batches and steps as the busiest of them, finished ranks
        # running their finished rows (outputs discarded), or a placeholder batch.
        self._lockstep = runtime.ep_group if getattr(config, "num_moe_experts", None) and runtime.ep > 1 else None
        # only on one rank: a call re-run under the mode must not leave peers waiting in a collective
        self._leave_placement_mode = leave_placement_mode and runtime.tp == runtime.pp == runtime.cp == runtime.ep == 1
        self.stats = _new_stats()

    # ---- public --------------------------------------------------------------------------------
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams,
                 keys: Sequence[SampleKey] | None = None) -> Rollout:
        prompts = [list(map(int, p)) for p in prompt_token_ids]
        keys = list(keys) if keys is not None else [SampleKey(prompt_id=i) for i in range(len(prompts))]
        self._check(prompts, keys, sampling)
        self.stats = _new_stats()
        rollout = Rollout()
        size = self.max_batch_size or max(len(prompts), 1)
        starts = range(0, len(prompts), size)
        with self._inference_mode(rows=min(size, len(prompts))):
            for i in range(self._most_in_group(len(starts))):
                if i < len(starts):
                    rollout.extend(self._generate_batch(prompts[starts[i]:starts[i] + size],
                                                        keys[starts[i]:starts[i] + size], sampling))
                else:  # an expert-parallel peer has more batches
                    self._generate_batch([[self.pad_id]], [SampleKey(prompt_id=0)], sampling, placeholder=True)
        return rollout

    def _most_in_group(self, count: int) -> int:
        """The largest ``count`` over the lockstep group (``count`` itself without one)."""
        if self._lockstep is None:
            return count
        t = torch.tensor([count], dtype=torch.int64, device=self.runtime.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._lockstep)
        return int(t.item())

    # ---- one batch -----------------------------------------------------------------------------
    def _generate_batch(self, prompts: list[list[int]], keys: list[SampleKey],
                        sampling: SamplingParams, placeholder: bool = False) -> Rollout:
        from megatron.core.inference.contexts import StaticInferenceContext

        device = self.runtime.device
        b, max_new = len(prompts), sampling.max_new_tokens
        prompt_len = max(len(p) for p in prompts)
        total = prompt_len + max_new
        tokens_bt = torch.full((b, total), self.pad_id, dtype=torch.int64, device=device)
        for i, p in enumerate(prompts):
            tokens_bt[i, prompt_len - len(p): prompt_len] = torch.tensor(p, device=device)
        first_b = prompt_len - torch.tensor([len(p) for p in prompts], device=device)  # first real slot
        slots_t = torch.arange(total, device=device)
        real_bt = slots_t[None, :] >= first_b[:, None]  # pad slots are never attended to
        padded = any(len(p) < prompt_len for p in prompts)  # else no attention mask is needed
        positions_bt = (slots_t[None, :] - first_b[:, None]).clamp_(min=0)
        stop_ids = torch.tensor(sampling.stop_ids or [-1], device=device)

        rows = list(range(b))  # original row of each batch entry (finished rows are compacted away)
        out = Rollout(response_ids=[[] for _ in rows], sampling_logprobs=[[] for _ in rows],
                      model_logprobs=[[] for _ in rows], finish_reasons=["length"] * b)
        done_b = torch.full((b,), placeholder, dtype=torch.bool, device=device)
        first, inverse = _distinct_rows(prompts)
        shared = self.kv_cache and self.shared_prefill and len(first) < b
        context = StaticInferenceContext(len(first) if shared else b, total) if self.kv_cache else None
        if context is not None:
            self._attention.allocate_cache(context, context.max_batch_size, self.dtype, device)
        self._attention.prepare(total)
        # CPU: the decode forwards and the sampling of a single-rank model run outside cpu_compat's placement
        # mode once each has shown that it places nothing on CUDA (the mode's handler sees every torch call;
        # benchmarks/rollout.py prints the engine with the mode kept beside the default)
        outside_mode = self._leave_placement_mode and context is not None
        decode_forward = cpu_compat.PlacementFreeRepeats(enabled=outside_mode)
        sample = cpu_compat.PlacementFreeRepeats(enabled=outside_mode)
        try:
            for step in range(max_new):
                end = prompt_len + step  # slots [0, end) are known
                start = 0 if (context is None or step == 0) else end - 1
                began = time.perf_counter()
                if step == 0 and shared:  # each distinct prompt once; its cache and logits to every sample
                    first_t, inverse_t = torch.tensor(first, device=device), torch.tensor(inverse, device=device)
                    logits_bv = self._forward(tokens_bt[first_t, :end], positions_bt[first_t, :end],
                                              _attention_keep(real_bt[first_t], slots_t, start, end, padded), context)
                    _compact_cache(context, inverse_t)
                    logits_bv = None if logits_bv is None else logits_bv[inverse_t]
                else:
                    forward = self._forward if step == 0 else functools.partial(decode_forward, self._forward)
                    logits_bv = forward(tokens_bt[:, start:end], positions_bt[:, start:end],
                                        _attention_keep(real_bt, slots_t, start, end, padded), context)
                if step == 0:
                    self.stats["prefill_s"] += time.perf_counter() - began
                    self.stats["prefill_rows"] += len(first) if shared else b
                if context is not None:
                    context.sequence_len_offset = end
                self.stats["row_steps"] += len(rows)
                token_b, sampling_b, model_b = sample(self._sample_and_share, logits_bv, keys, step, sampling,
                                                      len(rows))
                stopped_b = ~done_b & torch.isin(token_b, stop_ids)
                # the step's one device-to-host copy: per row the token, both log-probs (rounded to
                # fp32), whether it was done before and whether it stopped now
                host_b5 = torch.stack([token_b.double(), sampling_b.float().double(), model_b.float().double(),
                                       done_b.double(), stopped_b.double()], dim=1).tolist()
                for i, (t, lp, mlp, done, stopped) in zip(rows, host_b5):
                    if not done:
                        out.response_ids[i].append(int(t))
                        out.sampling_logprobs[i].append(lp)
                        out.model_logprobs[i].append(mlp)
                        if stopped:
                            out.finish_reasons[i] = "stop"
                done_b |= stopped_b
                num_done = sum(1 for *_, done, stopped in host_b5 if done or stopped)
                if self._most_in_group(int(num_done < len(rows))) == 0:
                    break
                tokens_bt[:, end] = torch.where(done_b, self.pad_id, token_b)
                if len(rows) > num_done and num_done * 4 >= len(rows):  # drop finished rows once they are a
                    # quarter of the batch (all of them only at the end: lockstep peers may still decode)
                    keep = (~done_b).nonzero()[:, 0]
                    rows, keys = [rows[j] for j in keep.tolist()], [keys[j] for j in keep.tolist()]
                    tokens_bt, real_bt, positions_bt = tokens_bt[keep], real_bt[keep], positions_bt[keep]
                    done_b = done_b[keep]
                    if context is not None:
                        _compact_cache(context, keep)
                    self.stats["compactions"] += 1
        finally:
            if context is not None:  # free the cache now, not when the caller drops the engine
                context.key_value_memory_dict.clear()
            self.stats["steps_outside_placement_mode"] += decode_forward.calls_without_mode
        self.stats["tokens"] += sum(len(r) for r in out.response_ids)
        return out

    def _sample_and_share(self, logits_bv: torch.Tensor | None, keys: list[SampleKey], step: int,
                          sampling: SamplingParams, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids (int64 [b]), sampling and model log-probs (fp64 [b]), the same on every rank."""
        runtime = self.runtime
        packed = torch.empty((b, 3), dtype=torch.float64, device=runtime.device)
        if runtime.is_last_stage:
            vs = self._vocab_shard(logits_bv.shape[-1])
            keys_b = noise.row_keys(sampling.seed, keys, step, runtime.device)
            s = sample_next(logits_bv, keys_b, sampling, vs)
            packed[:, 0], packed[:, 1], packed[:, 2] = s.token_ids.double(), s.sampling_logprobs, s.model_logprobs
        if runtime.pp > 1:
            dist.broadcast(packed, src=self._last_rank, group=runtime.pp_group)
        return packed[:, 0].long(), packed[:, 1], packed[:, 2]

    def _vocab_shard(self, num_local: int) -> VocabShard:
        group = self.runtime.tp_group if self.runtime.tp > 1 else None
        return vocab_shard(num_local, self.vocab_size, group)

    # ---- model forward across chunks and stages ------------------------------------------------
    def _forward(self, tokens_bs: torch.Tensor, positions_bs: torch.Tensor, keep_b1qk: torch.Tensor | None,
                 context) -> torch.Tensor | None:
        """Run every chunk of this rank in model order; the last stage returns logits [b, V/TP] of the
        last position, other ranks None. ``keep_b1qk``: True where a query may attend to a key (None: to
        every key up to its own slot)."""
        runtime = self.runtime
        b, s = tokens_bs.shape
        num_chunks = len(self.chunks)
        logits_bv = None
        self._attention.set_inputs(positions_bs, keep_b1qk, self.dtype)
        # megatron's convention (True = masked out); unused by RolloutAttention
        mask_b1qk = None if keep_b1qk is None else ~keep_b1qk
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
    def _inference_mode(self, rows: int) -> Iterator[None]:
        """Eval mode, no autograd, sharded last-position logits, packed weights on CPU; everything
        restored on exit."""
        modes = [c.training for c in self.chunks]
        hooks = []
        packed = PackedLinears([_unwrap(c) for c in self.chunks], rows) if self.packed_weights else None
        try:
            self._attention.install()
            if packed is not None:
                packed.install()
            for chunk in self.chunks:
                chunk.eval()
                model = _unwrap(chunk)
                if getattr(model, "post_process", False):
                    hooks.append(model.output_layer.register_forward_pre_hook(_last_position_sharded,
                                                                              with_kwargs=True))
            with torch.no_grad(), cpu_compat.placement_context(), \
                    sequence_parallel_off([_unwrap(c) for c in self.chunks]):
                yield
        finally:
            for hook in hooks:
                hook.remove()
            self._attention.remove()
            if packed is not None:
                packed.remove()
                self.stats["packed_products"] = packed.calls
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


@contextlib.contextmanager
def sequence_parallel_off(models: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Run ``models`` without sequence parallelism (restored on exit).

    Decoding feeds one new token per sequence per step, which cannot be split over TP ranks. SP only
    changes where activations live between layers (whole on every TP rank instead of a sequence shard
    each), not the function: the same weights decode as without SP. megatron-core reads the flag from
    the shared ``TransformerConfig`` and from the copies its modules took at construction (parallel
    linears' ``sequence_parallel``, the embedding's ``reduce_scatter_embeddings``).
    """
    config = models[0].config
    flags = [(m, name) for model in models for m in model.modules()
             for name in ("sequence_parallel", "reduce_scatter_embeddings") if getattr(m, name, None) is True]
    was = config.sequence_parallel
    try:
        config.sequence_parallel = False
        for module, name in flags:
            setattr(module, name, False)
        yield
    finally:
        config.sequence_parallel = was
        for module, name in flags:
            setattr(module, name, True)


def _attention_keep(real_bt: torch.Tensor, slots_t: torch.Tensor, start: int, end: int,
                    padded: bool) -> torch.Tensor | None:
    """[b, 1, end - start, end]: query slot q may attend to key slot k iff k <= q and k is a real
    token, or k == q (a pad slot attends to itself only, so no attention row is empty). None when no
    row is ``padded``: then every query attends to every key up to its own slot (no mask to build or
    apply)."""
    if not padded:
        return None
    q_1qk, k_1qk = slots_t[None, start:end, None], slots_t[None, None, :end]
    return ((real_bt[:, None, :end] & (k_1qk <= q_1qk)) | (k_1qk == q_1qk))[:, None]


def _new_stats() -> dict[str, float]:
    """Counters of the last ``generate`` call: sampled tokens kept, rows x decode steps computed (the
    static batch keeps finished rows until they are compacted away), compactions, prompts prefilled
    (distinct ones under shared prefill), the seconds spent prefilling, the matrix products computed on
    packed weights and the decode steps run outside cpu_compat's placement mode (CPU)."""
    return {"tokens": 0, "row_steps": 0, "compactions": 0, "prefill_rows": 0, "prefill_s": 0.0,
            "packed_products": 0, "steps_outside_placement_mode": 0}


def _distinct_rows(prompts: list[list[int]]) -> tuple[list[int], list[int]]:
    """(the first row of each distinct prompt, each row's index into that list)."""
    seen: dict[tuple[int, ...], int] = {}
    first, inverse = [], []
    for i, p in enumerate(prompts):
        key = tuple(p)
        if key not in seen:
            seen[key] = len(first)
            first.append(i)
        inverse.append(seen[key])
    return first, inverse


def _compact_cache(context, keep_b: torch.Tensor) -> None:
    """Keep only batch entries ``keep_b`` in megatron's static KV cache ([seq, batch, groups, dim] views
    per layer, layout kept); the context then serves the smaller batch. With repeated entries it
    replicates rows (shared prefill)."""
    for layer, (key, value) in list(context.key_value_memory_dict.items()):
        context.key_value_memory_dict[layer] = (select_cache_rows(key, keep_b), select_cache_rows(value, keep_b))
    context.max_batch_size = len(keep_b)


def _last_position_sharded(module, args, kwargs):
    """Output-layer pre-hook: only the last position's logits, left vocabulary-sharded.

    Why: GPTModel asserts ``runtime_gather_output=True`` in inference mode, which would all-gather the
    full vocabulary on every TP rank each step; the sampler works on the shards instead.
    """
    assert "runtime_gather_output" in kwargs, "megatron-core changed how GPTModel calls its output layer"
    hidden_sbh, *rest = args
    return (hidden_sbh[-1:], *rest), {**kwargs, "runtime_gather_output": False}
