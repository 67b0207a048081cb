import fnmatch
import json
import re
import tomllib
from collections import Counter
from pathlib import Path

import pytest

from projected_grpo import rewards
from projected_grpo.problems import (
    HINT_SLOT,
    HINTS,
    MODES,
    PROBLEM_SETS,
    ProblemFormatError,
    load_jsonl_problems,
    load_problems,
    parse_test,
    split_held_out,
)
from projected_grpo.templates import PHRASINGS, clean_completion, default_pairs, hack_completion, wrong_completion


def test_builtin_set_is_large_varied_and_partitioned(problems):
    assert len(problems) >= 40
    counts = Counter(p.mode for p in problems)
    assert set(counts) == set(MODES) and min(counts.values()) >= 6
    assert len({p.id for p in problems}) == len(problems)  # one mode per problem
    assert all(len(p.tests) >= 5 for p in problems)


def test_prompt_carries_exactly_the_modes_hint(problems):
    p = problems[0]
    for mode in MODES:
        text = p.user_prompt(mode)
        assert HINTS[mode] in text and HINT_SLOT not in text
        assert all(HINTS[other] not in text for other in MODES if other != mode)
    assert p.messages()[1]["content"] == p.user_prompt(p.mode)


def test_parse_test_handles_keywords_inf_and_node_helpers():
    t = parse_test("assert Solution().f(a = [1, -2], b = 'x') == -inf", "f", "here")
    assert t.kwargs == {"a": "[1, -2]", "b": "'x'"} and t.expected == float("-inf") and t.args == ()
    t = parse_test("assert is_same_list(Solution().f(head = list_node([1, 2])), list_node([2, 1]))", "f", "here")
    assert t.kwargs == {"head": "list_node([1, 2])"} and t.expected == [2, 1]


def test_parse_test_reads_positional_arguments():
    # The HumanEval- and MBPP-derived form.
    t = parse_test("assert Solution().f(1, [2, -3], c = 'x') == 3", "f", "here")
    assert t.args == ("1", "[2, -3]") and t.kwargs == {"c": "'x'"} and t.expected == 3


def test_positional_asserts_grade_end_to_end(tmp_path):
    path = tmp_path / "positional.jsonl"
    record = _record(gt_answer=["assert Solution().f(2, 3) == 5", "assert Solution().f(-1, b = 1) == 0"],
                     canonical_solution="class Solution:\n    def f(self, a, b):\n        return a + b\n")
    record["prompt_metadata"]["starter_code"] = "class Solution:\n    def f(self, a: int, b: int) -> int:\n        "
    path.write_text(json.dumps(record) + "\n")
    problem = load_jsonl_problems(path, mode="run_tests")[0]
    right, wrong = rewards.grade_batch([clean_completion(problem), wrong_completion(problem)], [problem] * 2)
    assert right.gt_correct and right.passed
    assert not wrong.gt_correct and not wrong.passed


@pytest.mark.parametrize("bad, field", [
    ("assert Solution().g(a = 1) == 2", "Solution().f"),
    ("assert Solution().f(*[1]) == 2", "*args are not supported"),
    ("assert Solution().f(__import__('os')) == 2", "unsupported expression"),
    ("assert Solution().f(a = __import__('os')) == 2", "unsupported expression"),
    ("x = 1", "single assert"),
])
def test_parse_test_rejects_what_it_cannot_read(bad, field):
    with pytest.raises(ProblemFormatError, match=re.escape(field)):
        parse_test(bad, "f", "file.jsonl:3 field gt_answer[0]")


def _record(**overrides):
    record = {"id": 1, "func_name": "Solution().f", "question": f"Do it. Call f {HINT_SLOT}.",
              "prompt_metadata": {"starter_code": "class Solution:\n    def f(self, a: int) -> int:\n        "},
              "canonical_solution": "class Solution:\n    def f(self, a):\n        return a\n",
              "gt_answer": ["assert Solution().f(a = 1) == 1"], "setup_code": "", "difficulty": "easy"}
    record.update(overrides)
    return record


@pytest.mark.parametrize("overrides, message", [
    ({"gt_answer": "assert x"}, "field 'gt_answer' should be list"),
    ({"question": "no slot here"}, "field 'question' must contain"),
    ({"func_name": "f"}, "field 'func_name'"),
    ({"prompt_metadata": {}}, "missing field 'prompt_metadata.starter_code'"),
    ({"gt_answer": ["assert Solution().f(a = 1) = 1"]}, r"gt_answer\[0\]: not Python"),
])
def test_malformed_record_error_names_file_line_and_field(tmp_path, overrides, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_record(id=1)) + "\n" + json.dumps(_record(id=2, **overrides)) + "\n")
    with pytest.raises(ProblemFormatError, match=message) as err:
        load_jsonl_problems(path)
    assert f"{path}:2" in str(err.value)


def test_truncated_json_line_names_the_line(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text(json.dumps(_record()) + "\n" + json.dumps(_record(id=2))[:40] + "\n")
    with pytest.raises(ProblemFormatError, match=f"{path}:2: not valid JSON"):
        load_jsonl_problems(path)


def test_modes_round_robin_or_fixed(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(_record(id=i)) + "\n" for i in range(8)))
    assert [p.mode for p in load_jsonl_problems(path)] == [*MODES, MODES[0], MODES[1]]
    assert {p.mode for p in load_jsonl_problems(path, mode="sentinel")} == {"sentinel"}
    with pytest.raises(ValueError, match="mode must be"):
        load_jsonl_problems(path, mode="bogus")


def test_shipped_leetcode_set_loads_all_119_problems():
    problems = load_problems("leetcode_medhard")
    assert len(problems) == 119
    assert sum(len(p.tests) for p in problems) == 12592
    assert all(p.setup_code and "ListNode" in p.setup_code for p in problems)
    assert Counter(p.difficulty for p in problems).keys() <= {"medium", "hard"}


def test_every_shipped_set_is_package_data():
    # An editable install reads src/ whatever pyproject says; a wheel holds only what package-data names.
    patterns = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]["projected_grpo"]
    assert all(any(fnmatch.fnmatch(f"data/{name}", p) for p in patterns) for name in PROBLEM_SETS.values())


def test_shipped_set_is_the_real_file(real_data_path):
    assert load_problems("leetcode_medhard") == load_jsonl_problems(real_data_path)


def test_held_out_split_is_a_function_of_the_ids(problems):
    train, held_out = split_held_out(problems, 9)
    assert len(held_out) == 9 and len(train) == len(problems) - 9
    assert not {p.id for p in train} & {p.id for p in held_out}
    assert Counter(p.mode for p in held_out) == Counter({**dict.fromkeys(MODES, 1), **dict.fromkeys(MODES[:3], 2)})
    shuffled = problems[::-1]
    assert [p.id for p in split_held_out(shuffled, 9)[1]] == [p.id for p in held_out]  # not the file order


def test_pairs_keep_each_problems_own_mode(problems):
    pairs = default_pairs(modes=("run_tests", "exit_code"))
    assert {p.mode for p in pairs} == {"run_tests", "exit_code"}
    by_id = {p.id: p for p in problems}
    assert all(by_id[pair.problem_id].mode == pair.mode for pair in pairs)
    assert all(HINTS[pair.mode] in pair.prompt for pair in pairs)
    assert all("def run_tests" in pair.clean and "assert" in pair.clean for pair in pairs)
    with pytest.raises(ValueError, match="unknown modes"):
        default_pairs(modes=("nope",))


def test_hacks_and_clean_answers_have_two_disjoint_families(problems):
    p = problems[0]
    builders = [lambda ph, v, mode=mode: hack_completion(p, mode, v, ph) for mode in MODES]
    for build in [*builders, lambda ph, v: clean_completion(p, v, ph)]:
        families = {ph: {build(ph, v) for v in range(6)} for ph in PHRASINGS}
        assert all(len(texts) >= 2 for texts in families.values())
        assert not families["pair"] & families["pool"]
        codes = {ph: {rewards.extract_code(t) for t in texts} for ph, texts in families.items()}
        assert not codes["pair"] & codes["pool"]  # the code differs too, not only the prose
