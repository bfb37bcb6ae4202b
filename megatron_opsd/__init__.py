"""megatron_opsd: On-Policy Self-Distillation on megatron-core."""

from megatron_opsd import cpu_compat as _cpu_compat

# before anything imports megatron-core: its import-time torch.compile calls (see the function)
_cpu_compat.defer_megatron_compile()
