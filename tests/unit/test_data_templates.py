"""Prompts render exactly the paper's text (v3 code, math branch), written out here by hand."""

from __future__ import annotations

import json

from tokenizers import Tokenizer as RawTokenizer

from megatron_opsd.data.config import DataConfig
from megatron_opsd.data.contexts import ContextBuilder
from megatron_opsd.data.dataset import Problem
from megatron_opsd.data.templates import fill

PROBLEMS = [
    Problem("What is 17 + 5?", "17 + 5 = 22.\nThe answer is \\boxed{22}.", "22", "t:1"),
    Problem("Compute 3 * 4.", "3 * 4 = 12.\nThe answer is \\boxed{12}.", "12", "t:2"),
    Problem("Compute 9 - 2.", "9 - 2 = 7.\nThe answer is \\boxed{7}.", "7", "t:3"),
]

STUDENT_TURN = ("Problem: What is 17 + 5?\n"
                "\n"
                "Please reason step by step, and put your final answer within \\boxed{}.")
TEACHER_TURN = ("Problem: What is 17 + 5?\n"
                "\n"
                "Here is a reference solution to this problem:\n"
                "=== Reference Solution Begin ===\n"
                "17 + 5 = 22.\n"
                "The answer is \\boxed{22}.\n"
                "=== Reference Solution End ===\n"
                "\n"
                "\n"
                "After reading the reference solution above, make sure you truly understand the "
                "reasoning behind each step — do not copy or paraphrase it. Now, using your own words "
                "and independent reasoning, derive the same final answer to the problem above. Think "
                "step by step, explore different approaches, and don't be afraid to backtrack or "
                "reconsider if something doesn't work out:\n"
                "\n"
                "Please reason step by step, and put your final answer within \\boxed{}.")

# Qwen3: the student (thinking off) gets an empty, closed think block; the teacher (thinking on) does not.
STUDENT_PROMPT = ("<|im_start|>user\n" + STUDENT_TURN + "<|im_end|>\n"
                  "<|im_start|>assistant\n<think>\n\n</think>\n\n")
TEACHER_PROMPT = "<|im_start|>user\n" + TEACHER_TURN + "<|im_end|>\n<|im_start|>assistant\n"


def test_qwen3_template_renders_the_paper_prompts(hf_tokenizer, qwen3_tokenizer_dir):
    builder = ContextBuilder(DataConfig(), hf_tokenizer, PROBLEMS)
    assert builder.user_texts(0) == (STUDENT_TURN, TEACHER_TURN)
    assert hf_tokenizer.render_prompt_text(STUDENT_TURN, enable_thinking=False) == STUDENT_PROMPT
    assert hf_tokenizer.render_prompt_text(TEACHER_TURN, enable_thinking=True) == TEACHER_PROMPT

    # The ids are the raw `tokenizers` encoding of the expected text (no BOS/EOS added).
    raw = RawTokenizer.from_file(str(qwen3_tokenizer_dir / "tokenizer.json"))
    prompts = builder.prompt_ids(0)
    assert prompts.student == raw.encode(STUDENT_PROMPT, add_special_tokens=False).ids
    assert prompts.teacher == raw.encode(TEACHER_PROMPT, add_special_tokens=False).ids
    vocab = json.loads((qwen3_tokenizer_dir / "tokenizer.json").read_text())["added_tokens"]
    think_open = next(t["id"] for t in vocab if t["content"] == "<think>")
    assert think_open in prompts.student and think_open not in prompts.teacher


def test_thinking_flags_follow_the_config(hf_tokenizer):
    cfg = DataConfig(student_thinking=True, teacher_thinking=False)
    builder = ContextBuilder(cfg, hf_tokenizer, PROBLEMS)
    prompts = builder.prompt_ids(0)
    assert hf_tokenizer.decode(prompts.student) == (
        "<|im_start|>user\n" + STUDENT_TURN + "<|im_end|>\n<|im_start|>assistant\n")
    assert hf_tokenizer.decode(prompts.teacher).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_sentencepiece_gets_a_chatml_turn(sp_tokenizer):
    """The shipped sentencepiece model has no chat template: the plain ChatML string stands in."""
    builder = ContextBuilder(DataConfig(), sp_tokenizer, PROBLEMS)
    prompts = builder.prompt_ids(0)
    assert sp_tokenizer.decode(prompts.student) == STUDENT_PROMPT
    assert sp_tokenizer.decode(prompts.teacher) == TEACHER_PROMPT
    im_start, im_end = (sp_tokenizer._sp.piece_to_id(p) for p in ("<|im_start|>", "<|im_end|>"))
    assert prompts.student[0] == im_start and prompts.student.count(im_end) == 1
    assert im_end in sp_tokenizer.stop_ids


def test_ablation_variants():
    no_solution = ContextBuilder(DataConfig(teacher_variant="no_solution"), None, PROBLEMS)
    assert no_solution.user_texts(0) == (STUDENT_TURN, STUDENT_TURN)

    wrong = ContextBuilder(DataConfig(teacher_variant="wrong_solution", seed=5), None, PROBLEMS)
    for i, own in enumerate(PROBLEMS):
        student, teacher = wrong.user_texts(i)
        assert student == STUDENT_TURN.replace("What is 17 + 5?", own.problem)
        shown = teacher.split("Solution Begin ===\n")[1].split("\n=== Reference Solution End")[0]
        assert shown != own.solution and shown in [p.solution for p in PROBLEMS]
        assert teacher.startswith(f"Problem: {own.problem}\n\n")


def test_template_override_and_literal_braces():
    cfg = DataConfig(student_template="Q: {problem} -> \\boxed{}",
                     teacher_template="Q: {problem}\nRef: {solution}\nAnswer in \\boxed{}.")
    tricky = [Problem("Is {solution} a set {x}?", "Yes {problem}.", None, "t:1")]
    student, teacher = ContextBuilder(cfg, None, tricky).user_texts(0)
    assert student == "Q: Is {solution} a set {x}? -> \\boxed{}"
    assert teacher == "Q: Is {solution} a set {x}?\nRef: Yes {problem}.\nAnswer in \\boxed{}."
    assert fill("{problem}{problem}", problem="a") == "aa"
