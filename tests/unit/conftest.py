"""Shared unit-test fixtures: the two tokenizer kinds the data path supports."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures_tokenizers import build_qwen3_style_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
ARITH_DIR = REPO_ROOT / "megatron_opsd" / "assets" / "arith"


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(tmp_path_factory) -> Path:
    """An HF tokenizer directory with a Qwen3-style chat template (see tests/fixtures_tokenizers.py)."""
    return build_qwen3_style_tokenizer(tmp_path_factory.mktemp("qwen3_style_tokenizer"))


@pytest.fixture(scope="session")
def hf_tokenizer(qwen3_tokenizer_dir):
    from megatron_opsd.data.tokenizer import load_tokenizer

    return load_tokenizer(qwen3_tokenizer_dir)


@pytest.fixture(scope="session")
def sp_tokenizer():
    """The sentencepiece tokenizer shipped with the arithmetic data."""
    from megatron_opsd.data.tokenizer import load_tokenizer

    return load_tokenizer(ARITH_DIR / "tokenizer.model")


@pytest.fixture(scope="module")
def runtime(request):
    """A single-process parallel runtime (TP = PP = DP = 1) for one test module; a module may set
    ``RUNTIME_SEED`` (default 0)."""
    from megatron_opsd.parallel import ParallelConfig, init_parallel

    rt = init_parallel(ParallelConfig(), seed=getattr(request.module, "RUNTIME_SEED", 0))
    yield rt
    rt.destroy()
