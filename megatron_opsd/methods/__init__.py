"""Training methods behind one interface (``base.Method``), one module each, selected by ``loss.mode``."""

from megatron_opsd.methods.base import Method, PolicyInputs, StepInputs, sample_prompts
from megatron_opsd.methods.grpo import GRPO
from megatron_opsd.methods.opd import OPD
from megatron_opsd.methods.opsd import OPSD
from megatron_opsd.methods.opsd_grpo import OPSDGRPO
from megatron_opsd.methods.sft import SFT

METHODS: dict[str, type[Method]] = {"opsd": OPSD, "opd": OPD, "sft": SFT, "grpo": GRPO, "opsd+grpo": OPSDGRPO}


def method_for(loss) -> Method:
    """The method of ``loss.mode`` (``loss``: the run's LossConfig)."""
    return METHODS[loss.mode](loss)


__all__ = ["GRPO", "METHODS", "OPD", "OPSD", "OPSDGRPO", "SFT", "Method", "PolicyInputs", "StepInputs",
           "method_for", "sample_prompts"]
