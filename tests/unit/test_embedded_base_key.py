"""The embedded default's warm-up base is cached under a key of everything that shapes it: a run that
changes any of those must not reuse another run's base."""

from __future__ import annotations

import pytest

from megatron_opsd.config import load_config
from megatron_opsd.train import EMBEDDED_CONFIG, embedded_base_dir


@pytest.mark.parametrize("override", [
    ["--model_build.init_method_std", "0.05"],
    ["--train.warmup_teacher_fraction", "0.25"],
    ["--train.warmup_lr", "1e-2"],
    ["--train.warmup_sft_steps", "7"],
    ["--seed", "3"],
    ["--model.hidden_size", "64"],
])
def test_every_warm_up_setting_changes_the_cached_base(override):
    default = embedded_base_dir(load_config(str(EMBEDDED_CONFIG), []))
    assert embedded_base_dir(load_config(str(EMBEDDED_CONFIG), override)) != default


def test_opsd_settings_reuse_the_cached_base():
    default = embedded_base_dir(load_config(str(EMBEDDED_CONFIG), []))
    assert embedded_base_dir(load_config(str(EMBEDDED_CONFIG), ["--optim.lr", "3e-3", "--train.steps", "5"])) == default
