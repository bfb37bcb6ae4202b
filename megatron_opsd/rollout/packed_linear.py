"""CPU decoding on prepacked weights: megatron's parallel linears run oneDNN's packed-weight kernel.

A decode step multiplies a handful of rows (one new token per sequence) by every weight matrix of the
model. On CPU, torch's default kernels for such skinny products are 1.4-3.3x slower than oneDNN's
linear on a weight reordered once into its blocked layout (``torch.ops.mkldnn._reorder_linear_weight``,
the op behind inductor's weight prepacking; per shape and dtype: ``python benchmarks/cpu_kernels.py``,
fp32 2.2-3.3x, bf16 1.4-2.0x on one thread of the development machine). The weights change only between rollouts, so
``PackedLinears`` reorders each linear weight when a rollout starts (one pass over the weights, a
packed copy of each held until the rollout ends) and, while it runs, megatron's
``ColumnParallelLinear`` / ``RowParallelLinear`` compute their local product from the packed copy.

What changes: only the local matmul, through the layer's ``_forward_impl`` (overridden on the
instance and restored afterwards, as ``attention.RolloutAttention`` does with the core attention); the
layer's own TP communication (gathers, all-reduces) is untouched. bf16 results are bit-identical to
the unpacked kernel's; fp32 ones differ in summation order (~1e-5 relative on the logits).

Used only on CPU, in fp32 / bf16, without sequence parallelism (the engine turns it off while
sampling), with no autograd, and for layers whose ``_forward_impl`` nobody else has replaced (LoRA's
row-parallel adapters do: those layers keep the default kernel). ``packed_kernel_available`` probes
the op once.
"""

from __future__ import annotations

import functools

import torch

_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def packed_kernel_available() -> bool:
    """Whether this torch build has oneDNN's packed linear (and it runs)."""
    try:
        weight = torch.ones(4, 4)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 4), packed, None, "none", [], "")
        return bool(torch.equal(out, torch.full((1, 4), 4.0)))
    except (AttributeError, RuntimeError):
        return False


class PackedLinears:
    """Install on ``models`` (unwrapped GPTModel chunks on CPU) for the duration of a rollout."""

    def __init__(self, models: list[torch.nn.Module], rows: int) -> None:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        self.linears = [m for model in models for m in model.modules()
                        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and "_forward_impl" not in vars(m)]
        self.rows = rows  # the typical row count: oneDNN picks the packed layout for it
        self._packed: dict[tuple, torch.Tensor] = {}
        self.calls = 0  # products computed on a packed weight (tests check the path is taken)

    def install(self) -> None:
        for linear in self.linears:
            linear._forward_impl = functools.partial(self._forward_impl, type(linear)._forward_impl.__get__(linear))

    def remove(self) -> None:
        for linear in self.linears:
            vars(linear).pop("_forward_impl", None)
        self._packed.clear()

    def _weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The packed copy of ``weight`` (made at its first use in this rollout)."""
        key = (weight.data_ptr(), weight.shape, weight.dtype)
        if key not in self._packed:
            self._packed[key] = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), self.rows)
        return self._packed[key]

    def _forward_impl(self, default, input, weight, bias=None, *args, sequence_parallel=False, **kwargs):
        if (sequence_parallel or torch.is_grad_enabled() or input.is_cuda or input.dtype not in _DTYPES
                or weight.dtype != input.dtype or (bias is not None and bias.dtype != input.dtype)):
            return default(input, weight, bias, *args, sequence_parallel=sequence_parallel, **kwargs)
        self.calls += 1
        return torch.ops.mkldnn._linear_pointwise(input, self._weight(weight), bias, "none", [], "")
