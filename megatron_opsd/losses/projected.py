"""A per-token loss on logits that are projected chunk by chunk and never exist whole.

The output layer's logits at R response positions are an ``[R, V/TP]`` tensor per rank (311 MiB fp32
for 512 tokens of a 151,936-entry vocabulary), and a loss on them normally keeps the student's and the
teacher's copies plus the gradient alive between forward and backward. Here the projection is fused
with the loss, as in "cut cross-entropy" kernels: for each chunk of ``c`` tokens

    s = h_S[c] W_S^T,  t = h_T[c] W_T^T                    [c, V/TP]   (teacher: no grad)
    l = token_loss(s, t)                                  [c]
    g = d(sum w * l) / ds                                  [c, V/TP]   (autograd, local to the chunk)
    dh_S[c] = g W_S;  dW_S += g^T h_S[c]                   (fp32 accumulator for W; the product in W's dtype)

all inside the forward; the backward only scales the stored ``dh_S`` [n, H] and ``dW_S`` [V/TP, H] by
the incoming scalar. Peak extra memory is a few ``[c, V/TP]`` buffers and one weight-sized fp32
accumulator, independent of the number of tokens. The FLOPs are those of the unfused projection.

When the caller knows that scalar in advance (``grad_scale``: megatron-core's schedule multiplies a
per-token loss sum by the optimizer's loss scale and nothing else) and the weight has megatron's fp32
``main_grad``, each chunk's ``dW`` goes straight into ``main_grad`` during forward, scaled by it: no
weight-sized accumulator at all (148 MiB fp32 at V=151,936, H=256, the largest buffer of the loss);
backward checks that the scalar it brings is the one promised.

Tensor parallelism: ``W`` is this rank's vocabulary slice. ``h_S`` must already be the output of
``copy_to_tensor_model_parallel_region`` (as inside megatron-core's ``ColumnParallelLinear``), whose
backward all-reduces ``dh_S`` over the TP group. ``token_loss`` may use vocab-parallel collectives in
its forward (every rank walks the same chunks) but none in its backward (true of every kernel in
``megatron_opsd.losses``), because its backward runs here, inside this forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_opsd.losses.sharding import row_chunks, rows_within_budget
from megatron_opsd.losses.vocab_parallel import gradient_in_forward

# Elements per [c, V/TP] logits buffer when the caller does not choose the chunk: large enough that
# the three matmuls per chunk read W a handful of times per micro-batch, small next to the weights.
# CPU, measured on vs_trl.py's main case (V=151,936, 2,048 response tokens, our side alone): 2^24 ->
# 2^23 lowered the step's peak by 0.05 (bf16) / 0.08 GiB (fp32) at the same train time; 2^22 by another
# 0.10 / 0.04 GiB but +18% / +24% train time (more passes of the fp32 dW accumulator).
_PROJECTION_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 26}

TokenLoss = Callable[[torch.Tensor, torch.Tensor | None, slice], torch.Tensor]
"""``(student_logits [c, v], teacher_logits [c, v] or None, rows) -> per-token loss [c]``."""
ChunkHook = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, slice], None]
"""``(student_logits, teacher_logits, per-token loss, rows)``, called under no_grad (e.g. metrics)."""


def projection_rows(chunk_tokens: int | None, num_local: int, device: torch.device) -> int:
    """Tokens per projected chunk: ``chunk_tokens`` if given, else a fixed element budget (the chunk
    size hardly changes the time: ``python benchmarks/projection.py``)."""
    return rows_within_budget(chunk_tokens, num_local, device, _PROJECTION_ELEMENTS)


class _ProjectedTokenLoss(torch.autograd.Function):
    # The gradients are kept as ctx attributes rather than saved tensors so that backward can drop the
    # reference and hand dW to autograd without a copy (AccumulateGrad steals a tensor nobody else
    # holds): one weight-sized buffer from the loss's forward until the parameter's grad hook.
    #
    # Under megatron-core's DDP (the weight has an fp32 ``main_grad`` and ``grad_added_to_main_grad``),
    # dW goes straight into ``main_grad``, as megatron's own linears do with gradient accumulation
    # fusion: no weight-sized cast to the weight's dtype and back, and the DDP hook, seeing
    # ``grad_added_to_main_grad``, adds nothing. The parameter still receives a placeholder grad (so its
    # hook runs, e.g. for overlapped reduction): uninitialised, never read, or zeros when megatron
    # marks the weight ``zero_out_wgrad`` (tied to the embedding on this stage: the embedding's own
    # gradient is summed into it and the hook adds that). ``ctx.grad_scale`` is set when dW went into
    # ``main_grad`` during forward, times that factor: backward then checks the incoming scalar.

    @staticmethod
    def forward(ctx, hidden_nh, weight_vh, run, grad_scale):
        loss, ctx.grad_h, ctx.grad_w = run(hidden_nh, weight_vh)
        ctx.weight, ctx.grad_scale = weight_vh, grad_scale
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, weight = ctx.grad_h, ctx.grad_w, ctx.weight
        if grad_h is None:
            raise RuntimeError("projected_token_loss: backward called twice (the gradients are consumed)")
        ctx.grad_h = ctx.grad_w = ctx.weight = None
        if ctx.grad_scale is not None:  # dW went into main_grad during forward, times grad_scale
            if float(grad_loss) != ctx.grad_scale:  # one host sync per micro-batch on GPU
                raise RuntimeError(
                    f"projected_token_loss: backward brought a gradient of {float(grad_loss)!r} for the loss, "
                    f"but its weight gradient was added to main_grad in forward scaled by grad_scale="
                    f"{ctx.grad_scale!r}; pass grad_scale=None unless the loss reaches backward unscaled "
                    "except by that factor")
            grad_w = _added_to_main_grad(weight)
        elif grad_w is not None:
            grad_w.mul_(grad_loss)
            main_grad = _main_grad_of(weight)
            if main_grad is not None:
                main_grad.add_(grad_w)
                grad_w = _added_to_main_grad(weight)
            else:
                grad_w = grad_w.to(weight.dtype)
        return grad_h.mul_(grad_loss), grad_w, None, None


def _added_to_main_grad(weight: torch.Tensor) -> torch.Tensor:
    """Flag ``weight``'s gradient as already in ``main_grad``; its placeholder grad (see above)."""
    weight.grad_added_to_main_grad = True
    new = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    return new(weight.shape, dtype=weight.dtype, device=weight.device)


def _main_grad_of(weight: torch.Tensor) -> torch.Tensor | None:
    """megatron-core DDP's fp32 gradient buffer view of ``weight``, or None."""
    main_grad = getattr(weight, "main_grad", None)
    if (main_grad is None or not hasattr(weight, "grad_added_to_main_grad") or main_grad.dtype != torch.float32
            or main_grad.shape != weight.shape):
        return None
    return main_grad


def projected_token_loss(hidden_s: torch.Tensor, weight_s: torch.Tensor, hidden_t: torch.Tensor | None,
                         weight_t: torch.Tensor | None, token_loss: TokenLoss, token_weights: torch.Tensor, *,
                         chunk_tokens: int | None = None, on_chunk: ChunkHook | None = None,
                         grad_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_n w_n * token_loss(h_S W_S^T, h_T W_T^T)_n`` with gradient to ``hidden_s`` and ``weight_s``.

    ``hidden_s``, ``hidden_t``: ``[n, H]`` (the teacher's is treated as constant); ``weight_s``,
    ``weight_t``: this rank's ``[V/TP, H]`` output weights (the same tensor for a live teacher);
    ``token_weights``: ``[n]`` (the loss mask). ``grad_scale``: the gradient backward will bring for
    the returned loss, when the caller knows it (megatron-core's schedule on a per-token loss sum: the
    optimizer's loss scale); with it, a weight under megatron DDP gets its dW added to ``main_grad``
    chunk by chunk in forward (scaled by it) instead of through a weight-sized accumulator, and a
    different gradient in backward raises. Returns the scalar loss and the detached fp32
    per-token losses ``[n]``. Gradients are computed only when grad mode is on and ``hidden_s`` or
    ``weight_s`` requires grad (``dW`` only when ``weight_s`` does).

    Collectives per call: none of its own; ``token_loss``'s forward ones once per chunk of
    ``projection_rows`` tokens (all ranks of the TP group walk the same chunks); backward none.
    dtypes: the matmuls run in the weight's dtype (each chunk's ``dW`` product too), ``dW`` accumulates
    over chunks in fp32 and is returned in the weight's dtype (or added to ``main_grad``). Memory while
    running: one ``[2c, V/TP]`` logits buffer (``[c, V/TP]`` without a teacher), ``token_loss``'s
    gradient ``[c, V/TP]`` and workspace, the fp32 ``[V/TP, H]`` accumulator unless ``main_grad`` takes
    its place (for bf16/fp16 also a [16384, H] product block and its fp32 copy).
    """
    if hidden_s.dim() != 2 or weight_s.dim() != 2 or hidden_s.shape[1] != weight_s.shape[1]:
        raise ValueError(f"hidden {tuple(hidden_s.shape)} and weight {tuple(weight_s.shape)}: expected "
                         "[n, H] and [V_local, H]")
    if (hidden_t is None) != (weight_t is None):
        raise ValueError("give both the teacher's hidden states and its output weight, or neither")
    if hidden_t is not None and hidden_t.shape != hidden_s.shape:
        raise ValueError(f"teacher hidden {tuple(hidden_t.shape)} != student hidden {tuple(hidden_s.shape)}")
    if hidden_t is not None and weight_t.shape != weight_s.shape:
        raise ValueError(f"teacher weight {tuple(weight_t.shape)} != student weight {tuple(weight_s.shape)}")
    num_rows = hidden_s.shape[0]
    rows_per_chunk = projection_rows(chunk_tokens, weight_s.shape[0], hidden_s.device)
    need_grad = torch.is_grad_enabled() and (hidden_s.requires_grad or weight_s.requires_grad)
    need_grad_w = need_grad and weight_s.requires_grad  # a frozen output layer (LoRA) needs no dW
    main_grad = _main_grad_of(weight_s) if need_grad_w and grad_scale is not None else None
    per_token = torch.zeros(num_rows, dtype=torch.float32, device=hidden_s.device)

    def run(h_s: torch.Tensor, w_s: torch.Tensor):
        grad_h = torch.zeros_like(h_s) if need_grad else None
        grad_w, alpha = (main_grad, grad_scale) if main_grad is not None else (
            torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device) if need_grad_w else None, 1.0)
        loss = torch.zeros((), dtype=torch.float32, device=h_s.device)
        # Buffers reused by every chunk (fresh [c, V] allocations page-fault on CPU, and their freed
        # pages pile up in the heap): the logits, the kernels' workspace (kept by gradient_in_forward),
        # the gradient and the dW product blocks. A live teacher shares the student's weight: both
        # sides are then projected by a single matmul.
        sides, max_rows = 1 if hidden_t is None else 2, min(rows_per_chunk, num_rows)
        flat = w_s.new_empty((sides * max_rows, w_s.shape[0]))
        grad_buffer = w_s.new_zeros((max_rows, w_s.shape[0])) if need_grad else None  # padding columns: 0
        blocks = _product_blocks(grad_w, w_s.dtype) if need_grad_w else None
        w_s_t = w_s.detach().t()
        with gradient_in_forward() as in_forward:  # each chunk is differentiated right away, on c rows
            for rows in row_chunks(num_rows, rows_per_chunk):
                n = rows.stop - rows.start
                with torch.no_grad():
                    if hidden_t is not None and weight_t is w_s:
                        torch.mm(torch.cat([h_s[rows].detach(), hidden_t[rows]]), w_s_t, out=flat[:2 * n])
                    else:
                        torch.mm(h_s[rows].detach(), w_s_t, out=flat[:n])
                        if hidden_t is not None:
                            torch.mm(hidden_t[rows], weight_t.t(), out=flat[n:2 * n])
                    s = flat[:n].detach()
                    t = None if hidden_t is None else flat[n:2 * n]
                with torch.enable_grad():
                    s.requires_grad_(need_grad)
                    if need_grad:
                        in_forward.offer_gradient_buffer(grad_buffer)
                    loss_c = token_loss(s, t, rows)
                    weighted = (loss_c * token_weights[rows]).sum()
                    grad_s = torch.autograd.grad(weighted, s)[0] if need_grad else None
                loss += weighted.detach()
                per_token[rows] = loss_c.detach()
                if on_chunk is not None:
                    with torch.no_grad():
                        on_chunk(s.detach(), t, per_token[rows], rows)
                if need_grad:
                    grad_h[rows] = grad_s.to(w_s.dtype) @ w_s
                    if need_grad_w:
                        _add_product_(grad_w, grad_s.t().to(w_s.dtype), h_s[rows].detach(), alpha, blocks)
                del s, t, grad_s
        return loss, grad_h, None if main_grad is not None else grad_w

    if need_grad:
        loss = _ProjectedTokenLoss.apply(hidden_s, weight_s, run, None if main_grad is None else grad_scale)
    else:
        with torch.no_grad():
            loss = run(hidden_s, weight_s)[0]
    return loss, per_token


# Rows of the weight per block in ``_add_product_``: a [block, H] product and its fp32 copy stay small
# (4 MiB + 8 MiB at H=256) and are reused, instead of a weight-sized temporary per chunk.
_PRODUCT_BLOCK = 16384


def _product_blocks(acc_vh: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``_add_product_``'s [block, H] product buffer and its fp32 copy (None for fp32 operands)."""
    if dtype == torch.float32:
        return None
    rows = min(_PRODUCT_BLOCK, acc_vh.shape[0])
    return acc_vh.new_empty((rows, acc_vh.shape[1]), dtype=dtype), acc_vh.new_empty((rows, acc_vh.shape[1]))


def _add_product_(acc_vh: torch.Tensor, a_vc: torch.Tensor, b_ch: torch.Tensor, alpha: float = 1.0,
                  blocks: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """``acc += alpha * (a @ b)`` for the fp32 dW accumulator (or ``main_grad``). fp32 operands: in place
    (addmm_). Low-precision ones: the product runs in their dtype (bf16 matrix units; fp32 accumulation
    inside the product), block by block of rows, each block converted into a reused fp32 buffer (``blocks``,
    from ``_product_blocks``: the caller's, kept over chunks, or fresh) and added. Why: a mixed-dtype
    ``acc.add_(product)`` makes a weight-sized fp32 copy each time (fresh pages on CPU: ~3x slower than
    the product itself), and an fp32 GEMM on upcast copies runs at a fraction of the bf16 rate; measured
    per chunk of 110 rows at V=151,936, H=256, one thread (``python benchmarks/cpu_kernels.py``): 38 ms
    this way, 109 ms for ``add_(mm)``, 122 ms for the fp32 GEMM."""
    if a_vc.dtype == torch.float32:
        acc_vh.addmm_(a_vc, b_ch.float(), alpha=alpha)
        return
    product, product_fp32 = blocks if blocks is not None else _product_blocks(acc_vh, a_vc.dtype)
    rows = product.shape[0]
    for start in range(0, acc_vh.shape[0], rows):
        n = min(rows, acc_vh.shape[0] - start)
        torch.mm(a_vc[start:start + n], b_ch, out=product[:n])
        acc_vh[start:start + n].add_(product_fp32[:n].copy_(product[:n]), alpha=alpha)
