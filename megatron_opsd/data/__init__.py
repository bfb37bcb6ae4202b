"""The OPSD data path: problems -> prompts -> student/teacher pairs -> padded micro-batches."""

from megatron_opsd.data.answers import answers_match, extract_answer, extract_boxed
from megatron_opsd.data.batch import OPSDMicroBatch, SideBatch, collate_pairs, gather_response_positions
from megatron_opsd.data.config import DataConfig
from megatron_opsd.data.contexts import ContextBuilder, OPSDPair, PairStats, PromptIds, build_pair
from megatron_opsd.data.dataset import Problem, ProblemSampler, load_problems, load_splits
from megatron_opsd.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "ContextBuilder", "DataConfig", "OPSDMicroBatch", "OPSDPair", "PairStats", "Problem", "ProblemSampler",
    "PromptIds", "SideBatch", "Tokenizer", "answers_match", "build_pair", "collate_pairs", "extract_answer", "extract_boxed",
    "gather_response_positions", "load_problems", "load_splits", "load_tokenizer",
]
