import json
import re
from collections import Counter

import pytest

from projected_grpo.problems import (
    HINT_SLOT,
    HINTS,
    MODES,
    ProblemFormatError,
    default_pairs,
    hack_completion,
    load_jsonl_problems,
    parse_test,
)


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
    assert t.kwargs == {"a": "[1, -2]", "b": "'x'"} and t.expected == float("-inf")
    t = parse_test("assert is_same_list(Solution().f(head = list_node([1, 2])), list_node([2, 1]))", "f", "here")
    assert t.kwargs == {"head": "list_node([1, 2])"} and t.expected == [2, 1]


@pytest.mark.parametrize("bad, field", [
    ("assert Solution().g(a = 1) == 2", "Solution().f"),
    ("assert Solution().f(1) == 2", "keyword-argument call"),
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


def test_real_file_loads_all_119_problems(real_data_path):
    problems = load_jsonl_problems(real_data_path)
    assert len(problems) == 119
    assert sum(len(p.tests) for p in problems) == 12592
    assert all(p.setup_code and "ListNode" in p.setup_code for p in problems)


def test_pairs_keep_each_problems_own_mode(problems):
    pairs = default_pairs(modes=("run_tests", "exit_code"))
    assert {p.mode for p in pairs} == {"run_tests", "exit_code"}
    by_id = {p.id: p for p in problems}
    assert all(by_id[pair.problem_id].mode == pair.mode for pair in pairs)
    assert all(HINTS[pair.mode] in pair.prompt for pair in pairs)
    assert all("def run_tests" in pair.clean and "assert" in pair.clean for pair in pairs)
    with pytest.raises(ValueError, match="unknown modes"):
        default_pairs(modes=("nope",))


def test_hacks_have_several_phrasings(problems):
    p = problems[0]
    for mode in ("run_tests", "exit_code", "stdout_marker"):
        assert len({hack_completion(p, mode, v) for v in range(3)}) >= 2
