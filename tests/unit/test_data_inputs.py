"""Bad inputs get clear errors (file, line, field) or counted drops; the sampler is seeded and resumable."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_opsd.data.config import DataConfig
from megatron_opsd.data.contexts import ContextBuilder, PairStats, build_pair
from megatron_opsd.data.dataset import Problem, ProblemSampler, load_problems, load_splits, split_held_out
from megatron_opsd.data.templates import wrong_solution_index
from megatron_opsd.data.tokenizer import load_tokenizer

GOOD = {"problem": "What is 2 + 3?", "solution": "2 + 3 = 5. \\boxed{5}", "answer": "5"}


def write_jsonl(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines))
    return path


# --- Problem files ---

def test_jsonl_loads_with_configured_columns_and_answer_fallback(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        json.dumps({"question": "Q1", "worked": "so \\boxed{\\frac{1}{2}}"}),
        "",
        json.dumps({"question": "Q2", "worked": "S2", "final": 42}),
    ])
    result = load_problems(path, problem_key="question", solution_key="worked", answer_key="final")
    assert [(p.problem, p.solution, p.answer) for p in result.problems] == [
        ("Q1", "so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"), ("Q2", "S2", "42")]
    assert [p.source for p in result.problems] == [f"{path}:1", f"{path}:3"]


@pytest.mark.parametrize("line, needles", [
    ('{"problem": "Q", "solution": ', ["malformed JSON"]),
    (json.dumps({"problem": "Q"}), ["'solution'", "missing"]),
    (json.dumps({"problem": "   ", "solution": "S"}), ["'problem'", "empty"]),
    (json.dumps({"problem": "Q", "solution": 5}), ["'solution'", "must be a string", "int"]),
    (json.dumps({"problem": "Q", "solution": "S", "answer": ["5"]}),
     ["'answer'", "must be a string", "list"]),
    (json.dumps(["Q", "S"]), ["expected an object", "list"]),
])
def test_bad_jsonl_row_names_file_line_and_field(tmp_path, line, needles):
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(GOOD), json.dumps(GOOD), line, json.dumps(GOOD)])
    with pytest.raises(ValueError) as info:
        load_problems(path)
    message = str(info.value)
    assert f"{path}:3:" in message
    for needle in needles:
        assert needle in message


def test_skip_policy_counts_bad_rows(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        json.dumps(GOOD), "{not json", json.dumps({"problem": "Q"}), json.dumps({**GOOD, "problem": "Q4"})])
    result = load_problems(path, on_bad_row="skip")
    assert [p.problem for p in result.problems] == ["What is 2 + 3?", "Q4"]
    assert result.num_skipped == 2
    assert f"{path}:2:" in result.skipped[0] and f"{path}:3:" in result.skipped[1]


def test_json_file_reports_the_line_where_the_bad_record_starts(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[\n'
                    '  {"problem": "Q1", "solution": "S1"},\n'
                    '  {"problem": "Q2",\n'
                    '   "solution": "S2"},\n'
                    '  {"problem": "Q3",\n'
                    '   "solution": ""}\n'
                    ']\n')
    with pytest.raises(ValueError, match=f"{path}:5: field 'solution' is empty"):
        load_problems(path)
    path.write_text('[{"problem": "Q", "solution": "S"},\n {"problem": "Q" "solution": "S"}]\n')
    with pytest.raises(ValueError, match=f"{path}:2: malformed JSON"):
        load_problems(path)
    path.write_text('{"problem": "Q", "solution": "S"}')
    with pytest.raises(ValueError, match="must hold a list of objects"):
        load_problems(path)


def test_parquet_rows_and_bad_row(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"problem": ["Q1", "Q2"], "solution": ["S1", "S2"]}), path)
    assert [p.source for p in load_problems(path).problems] == [f"{path}:1", f"{path}:2"]
    pq.write_table(pa.table({"problem": ["Q1", "Q2"], "solution": ["S1", " "]}), path)
    with pytest.raises(ValueError, match=f"{path}:2: field 'solution' is empty"):
        load_problems(path)
    pq.write_table(pa.table({"problem": [1, 2], "solution": ["S1", "S2"]}), path)
    with pytest.raises(ValueError, match=f"{path}:1: field 'problem' must be a string, got int"):
        load_problems(path)


def test_unknown_extension_and_missing_file(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("problem,solution\nQ,S\n")
    with pytest.raises(ValueError, match=r"p\.csv: unknown problem file type '\.csv'"):
        load_problems(path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_problems(tmp_path / "nope.jsonl")


def test_held_out_split_is_deterministic_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [json.dumps({**GOOD, "problem": f"Q{i}"}) for i in range(20)])
    cfg = DataConfig(train_path=str(path), eval_path=None, eval_fraction=0.25)
    train, held = load_splits(cfg)
    assert len(held) == 5 and len(train) == 15
    assert {p.problem for p in train}.isdisjoint({p.problem for p in held})
    assert load_splits(cfg) == (train, held)
    assert split_held_out(train + held, 0.25, seed=99) != (train, held)


# --- Over-long pairs: counted, and the teacher prompt is never cut ---

def test_overlong_pair_is_dropped_or_truncated_and_counted():
    student, teacher, response = [1] * 3, [2] * 6, [7, 8, 9, 0, 5, 5]  # stop id 0, then padding
    stats = PairStats()
    assert build_pair(student, teacher, response, stop_ids={0}, max_seq_len=9, overlong="drop",
                      stats=stats) is None
    assert stats.num_dropped_overlong == 1 and stats.num_pairs == 0

    pair = build_pair(student, teacher, response, stop_ids={0}, max_seq_len=9, overlong="truncate_response",
                      stats=stats)
    assert stats.num_truncated == 1 and stats.num_pairs == 1
    assert pair.truncated and pair.response_ids == [7, 8, 9]  # 9 - 6 = 3 tokens fit
    assert pair.teacher_ids == [2] * 6 + [7, 8, 9] and pair.student_ids == [1] * 3 + [7, 8, 9]

    pair = build_pair(student, teacher, response, stop_ids={0}, max_seq_len=10, overlong="drop", stats=stats)
    assert not pair.truncated and pair.response_ids == [7, 8, 9, 0]  # fits exactly; padding dropped


@pytest.mark.parametrize("overlong", ["drop", "truncate_response"])
def test_teacher_prompt_alone_over_budget_drops_the_pair(overlong):
    stats = PairStats()
    for budget in (5, 6):  # teacher prompt of 6 leaves no room for one response token
        assert build_pair([1, 2], [3] * 6, [4, 5], stop_ids={0}, max_seq_len=budget, overlong=overlong,
                          stats=stats) is None
    assert stats.num_dropped_long_prompt == 2 and stats.num_truncated == 0 and stats.num_pairs == 0


def test_long_teacher_prompt_is_dropped_by_the_builder_never_cut(sp_tokenizer):
    problems = [Problem("What is 1 + 1?", "1 + 1 = 2. " * 40 + "\\boxed{2}", "2", "t:1"),
                Problem("What is 2 + 2?", "\\boxed{4}", "4", "t:2")]
    short = ContextBuilder(DataConfig(max_prompt_len=4096, max_seq_len=8192), sp_tokenizer, problems)
    long_len = len(short.prompt_ids(0).teacher)
    cfg = DataConfig(max_prompt_len=long_len - 1, max_seq_len=long_len + 10)
    builder = ContextBuilder(cfg, sp_tokenizer, problems)
    assert builder.prompt_ids(0) is None and builder.stats.num_dropped_long_prompt == 1
    kept = builder.prompt_ids(1)
    assert kept is not None and len(kept.teacher) < long_len
    assert sp_tokenizer.decode(kept.teacher).startswith("<|im_start|>user\nProblem: What is 2 + 2?")


# --- Tokenizers ---

def test_tokenizer_larger_than_model_vocab_is_refused(sp_tokenizer, hf_tokenizer):
    sp_tokenizer.check_model_vocab(448)
    with pytest.raises(ValueError, match=r"tokenizer .*tokenizer\.model has 448 token ids but the model's "
                                         r"vocabulary has 300"):
        sp_tokenizer.check_model_vocab(300)
    hf_tokenizer.check_model_vocab(hf_tokenizer.vocab_size)
    with pytest.raises(ValueError, match=f"has {hf_tokenizer.vocab_size} token ids"):
        hf_tokenizer.check_model_vocab(hf_tokenizer.vocab_size - 1)


def test_stop_and_pad_ids(sp_tokenizer, hf_tokenizer):
    # Shipped sentencepiece model: </s> = 2, <pad> = 3, <|im_end|> is the second user-defined piece (5).
    assert (sp_tokenizer.eos_id, sp_tokenizer.pad_id, sp_tokenizer.stop_ids) == (2, 3, {2, 5})
    # Fixture: BPE specials in order <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2 (eos); pad=<|endoftext|>.
    assert (hf_tokenizer.eos_id, hf_tokenizer.pad_id, hf_tokenizer.stop_ids) == (2, 0, {0, 2})


def test_unloadable_tokenizer_path_is_named(tmp_path):
    with pytest.raises(ValueError, match="missing.model.*does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model: not a loadable sentencepiece model"):
        load_tokenizer(bad)


# --- Config validation ---

@pytest.mark.parametrize("kwargs, needle", [
    ({"on_bad_row": "ignore"}, "on_bad_row='ignore'"),
    ({"overlong": "cut_prompt"}, "overlong='cut_prompt'"),
    ({"teacher_variant": "answer"}, "teacher_variant='answer'"),
    ({"eval_fraction": 0.1}, "eval_fraction=0.1 with eval_path"),
    ({"eval_path": None, "eval_fraction": 1.0}, "eval_fraction=1.0"),
    ({"max_seq_len": 512, "max_prompt_len": 512}, "max_seq_len=512 <= max_prompt_len=512"),
    ({"problem_key": "x", "solution_key": "x"}, "must differ"),
    ({"answer_key": ""}, "answer_key=''"),
    ({"student_template": "Solve: {problem} using {solution}"}, "student_template="),
    ({"teacher_template": "Problem: {problem}"}, "teacher_template='Problem: {problem}'"),
    ({"teacher_template": "{problem} {solution}", "teacher_variant": "no_solution"},
     "teacher_variant='no_solution'"),
])
def test_config_errors_name_field_and_value(kwargs, needle):
    with pytest.raises(ValueError) as info:
        DataConfig(**kwargs)
    assert needle in str(info.value)


# --- Sampler ---

def test_sampler_epochs_are_seeded_permutations():
    sampler = ProblemSampler(10, global_batch_size=5, seed=3)
    epoch0 = sampler.next_global_batch() + sampler.next_global_batch()
    epoch1 = sampler.next_global_batch() + sampler.next_global_batch()
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    again = ProblemSampler(10, global_batch_size=5, seed=3)
    assert again.next_global_batch() + again.next_global_batch() == epoch0
    other = ProblemSampler(10, global_batch_size=5, seed=4)
    assert other.next_global_batch() + other.next_global_batch() != epoch0


def test_sampler_resumes_from_its_state():
    reference = ProblemSampler(7, global_batch_size=4, seed=0)
    stream = [reference.next_global_batch() for _ in range(6)]  # batches straddle epoch ends
    first = ProblemSampler(7, global_batch_size=4, seed=0)
    for _ in range(3):
        first.next_global_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = ProblemSampler(7, global_batch_size=4, seed=0, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert [resumed.next_global_batch() for _ in range(3)] == stream[3:]
    with pytest.raises(ValueError, match="num_problems=7 but this run has num_problems=8"):
        ProblemSampler(8, global_batch_size=4, seed=0).load_state_dict(state)


def test_sampler_shards_a_global_batch_over_ranks():
    ranks = [ProblemSampler(12, global_batch_size=6, seed=1, rank=r, world_size=3) for r in range(3)]
    single = ProblemSampler(12, global_batch_size=6, seed=1)
    for _ in range(4):
        shares = [s.next_batch() for s in ranks]
        assert all(len(share) == 2 for share in shares)
        assert sum(shares, []) == single.next_global_batch()
    with pytest.raises(ValueError, match="global_batch_size=5: must be a positive multiple"):
        ProblemSampler(12, global_batch_size=5, seed=1, world_size=2)


# --- Wrong-solution ablation ---

def test_wrong_solution_is_never_the_problems_own():
    problems = [Problem(f"Q{i}", f"S{i % 4}", None, f"t:{i}") for i in range(9)]  # duplicated solutions
    for seed in range(5):
        for i in range(len(problems)):
            j = wrong_solution_index(i, problems, seed)
            assert j != i and problems[j].solution != problems[i].solution
            assert wrong_solution_index(i, problems, seed) == j
    picks = {seed: [wrong_solution_index(i, problems, seed) for i in range(9)] for seed in range(5)}
    assert len({tuple(p) for p in picks.values()}) > 1  # the seed matters
    same = [Problem("Q0", "S", None, "t:0"), Problem("Q1", "S", None, "t:1")]
    with pytest.raises(ValueError, match="none differs"):
        wrong_solution_index(0, same, 0)


@pytest.mark.parametrize("suffix, data, line", [
    (".jsonl", b'{"problem": "a", "solution": "b"}\n{"problem": "\xff", "solution": "b"}\n', 2),
    (".json", b'[\n{"problem": "a", "solution": "b"},\n{"problem": "\xff", "solution": "b"}]', 3),
])
def test_non_utf8_file_names_file_and_line(tmp_path, suffix, data, line):
    path = tmp_path / f"p{suffix}"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=rf"p{suffix}:{line}: not UTF-8 text"):
        load_problems(path)


def test_non_utf8_jsonl_line_can_be_skipped(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"problem": "a", "solution": "b"}\n{"problem": "\xff", "solution": "b"}\n')
    result = load_problems(path, on_bad_row="skip")
    assert len(result.problems) == 1 and result.num_skipped == 1


@pytest.mark.parametrize("text, fallback, expected", [
    ("so the answer is \\boxed{12}, not 13", "none", "12"),
    ("so the answer is \\boxed{12}, not 13", "last_number", "12"),  # a box always wins
    ("The answer is 1,234.", "none", None),
    ("The answer is 1,234.", "last_number", "1,234"),
    ("first 3/4 then -2.5", "last_number", "-2.5"),
    ("no digits here", "last_number", None),
])
def test_answer_extraction_fallback_is_off_by_default(text, fallback, expected):
    from megatron_opsd.data import answers_match, extract_answer

    assert extract_answer(text, fallback) == expected
    if expected == "1,234":
        assert answers_match(extract_answer(text, fallback), "1234")
