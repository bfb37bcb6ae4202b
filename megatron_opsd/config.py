"""The run configuration: one typed section per concern, loaded from YAML with dotted overrides.

    cfg = load_config("examples/configs/tiny_llama_tp2.yaml", ["--parallel.tp", "2"])

Sections validate themselves; ``JobConfig.__post_init__`` checks what spans sections (the model shape
against the parallel layout). The world size is checked when the runtime starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_opsd.config_io import describe, doc, load
from megatron_opsd.data.config import DataConfig
from megatron_opsd.engine import OptimConfig
from megatron_opsd.models.description import ModelConfig
from megatron_opsd.models.provider import ModelBuildConfig
from megatron_opsd.parallel import ParallelConfig


@dataclass
class JobConfig:
    """Everything a run needs."""

    model: ModelConfig = doc("The model (HF config.json field names).", default_factory=ModelConfig)
    model_build: ModelBuildConfig = doc("dtype, recompute, layer spec.", default_factory=ModelBuildConfig)
    parallel: ParallelConfig = doc("TP/PP/VPP layout; DP is derived.", default_factory=ParallelConfig)
    optim: OptimConfig = doc("Optimizer and LR schedule.", default_factory=OptimConfig)
    data: DataConfig = doc("Problems, tokenizer, templates, length budget.", default_factory=DataConfig)
    seed: int = doc("Global seed (weights init, sampling, data order).", default=1234)

    def __post_init__(self) -> None:
        self.parallel.check_model(self.model.num_hidden_layers, self.model.num_attention_heads,
                                  self.model.num_key_value_heads)
        self.model.check_sequence_length(self.data.max_seq_len)


def load_config(path: str | None = None, overrides: list[str] | None = None) -> JobConfig:
    return load(JobConfig, path, overrides)


def help_text() -> str:
    return "\n".join(describe(JobConfig))
