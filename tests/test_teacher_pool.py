import json
import random

import pytest

from projected_grpo import teacher_pool
from projected_grpo.problems import MODES, builtin_problems
from projected_grpo.rewards import grade_batch
from projected_grpo.teacher_pool import (
    Pool,
    PoolFormatError,
    TeacherRow,
    build_pool,
    build_pool_from_model,
    load_pool,
    pairs_from_pool,
)
from projected_grpo.templates import default_pairs


@pytest.fixture(scope="module")
def subset():
    return builtin_problems()[:12]  # modes are round-robin: two problems per mode


@pytest.fixture(scope="module")
def fixture_pool(subset, tmp_path_factory):
    # Built once for the module: grading 48 completions is the slow part.
    return build_pool(tmp_path_factory.mktemp("pool") / "fixture", subset)


def _copy(src, dst):
    dst.mkdir()
    for name in (teacher_pool.POOL_FILE, teacher_pool.META_FILE):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _edit_line(pool_dir, lineno, edit):
    path = pool_dir / teacher_pool.POOL_FILE
    lines = path.read_text().splitlines(keepends=True)
    lines[lineno - 1] = edit(lines[lineno - 1])
    path.write_text("".join(lines))
    return path


_DELETE = object()


def _edit_field(name, value):
    def edit(line):
        record = json.loads(line)
        if value is _DELETE:
            del record[name]
        else:
            record[name] = value
        return json.dumps(record) + "\n"
    return edit


def test_fixture_pool_round_trips_with_the_graders_verdicts(fixture_pool, subset):
    pool = load_pool(fixture_pool)
    assert len(pool) == 8 * len(subset)
    assert sorted(pool.problem_ids()) == sorted(p.id for p in subset)
    by_id = {p.id: p for p in subset}
    for pid in pool.problem_ids():
        rows = pool.rows_for(pid)
        assert [r.kind for r in rows] == ["hack"] * 4 + ["clean"] * 2 + ["wrong"] * 2
        assert len({r.completion for r in rows}) == 8  # every row a different text: groups differ
        assert all(r.mode == by_id[pid].mode and r.source == "fixture" for r in rows)
        for hack in rows[:4]:
            assert hack.exploited and hack.passed and not hack.gt_correct and hack.reward == 1.25
        for clean in rows[4:6]:
            assert clean.gt_correct and clean.passed and not clean.exploited
        for wrong in rows[6:]:
            assert not (wrong.passed or wrong.gt_correct or wrong.exploited) and wrong.reward == 0.25

    # The stored grades are the grader's: re-grade a few rows of different kinds and modes.
    picked = [pool.rows_for(p.id)[i] for i, p in zip((0, 3, 4, 6, 1, 5), subset[::2])]
    fresh = grade_batch([r.completion for r in picked], [by_id[r.problem_id] for r in picked])
    for row, reward in zip(picked, fresh):
        assert (row.reward, row.passed, row.gt_correct, row.exploited) == (
            reward.reward, reward.passed, reward.gt_correct, reward.exploited)


def test_no_pair_text_is_a_pool_row(fixture_pool, subset):
    # V is extracted from the pairs and cin_t is measured on pool rows: they must never share a text.
    pool = load_pool(fixture_pool)
    pool_texts = {r.completion for pid in pool.problem_ids() for r in pool.rows_for(pid)}
    pair_texts = {t for pair in default_pairs(problems=subset) for t in (pair.hack, pair.clean, pair.clean_alt)}
    assert len(pair_texts) >= 2 * len(subset) and not pair_texts & pool_texts


def test_counts_summary_and_meta(fixture_pool, subset):
    pool = load_pool(fixture_pool)
    counts = pool.counts()
    assert counts["total"] == {"problems": 12, "rows": 96, "solved": 24, "exploited": 48, "failed": 24}
    assert list(counts["by_mode"]) == list(MODES)
    for cell in counts["by_mode"].values():
        assert cell == {"problems": 2, "rows": 16, "solved": 4, "exploited": 8, "failed": 4}

    summary = pool.summary()
    assert "exploited" in summary and "fixture" in summary
    total_line = summary.splitlines()[-1].split()
    assert total_line == ["total", "12", "96", "24", "48", "24"]

    meta = json.loads((fixture_pool / teacher_pool.META_FILE).read_text())
    assert meta["format"] == 1 and meta["source"] == "fixture" and meta["problems"] == "builtin"
    assert meta["n_rows"] == 96 and meta["modes"] == list(MODES) and meta["counts"] == counts
    assert not [p.name for p in fixture_pool.iterdir() if p.name.endswith(".tmp")]


def test_modes_restrict_building_and_loading(fixture_pool, subset, tmp_path):
    keep = ("run_tests", "sentinel")
    loaded = load_pool(fixture_pool, modes=keep)
    assert len(loaded) == 32 and {r.mode for p in loaded.problem_ids() for r in loaded.rows_for(p)} == set(keep)

    built = load_pool(build_pool(tmp_path / "two", subset[:6], modes=keep))
    assert len(built) == 16 and {r.mode for p in built.problem_ids() for r in built.rows_for(p)} == set(keep)
    assert built.meta["modes"] == list(keep)

    with pytest.raises(ValueError, match="unknown modes"):
        load_pool(fixture_pool, modes=("run_test",))


def test_garbage_line_names_file_and_line(fixture_pool, tmp_path):
    pool_dir = _copy(fixture_pool, tmp_path / "p")
    path = _edit_line(pool_dir, 3, lambda line: "this is not json\n")
    with pytest.raises(PoolFormatError, match="not valid JSON") as err:
        load_pool(pool_dir)
    assert f"{path}:3" in str(err.value)


def test_truncated_last_line_is_an_error(fixture_pool, tmp_path):
    pool_dir = _copy(fixture_pool, tmp_path / "p")
    path = pool_dir / teacher_pool.POOL_FILE
    text = path.read_text()
    path.write_text(text[:-40])  # a crash mid-write: the last row is cut and has no newline
    with pytest.raises(PoolFormatError, match="truncated") as err:
        load_pool(pool_dir)
    assert f"{path}:{text.count(chr(10))}:" in str(err.value)


def test_missing_row_is_caught_by_the_row_count(fixture_pool, tmp_path):
    pool_dir = _copy(fixture_pool, tmp_path / "p")
    path = pool_dir / teacher_pool.POOL_FILE
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(PoolFormatError, match=r"95 rows but .* says 96"):
        load_pool(pool_dir)


@pytest.mark.parametrize("name, value, message", [
    ("exploited", _DELETE, "missing field 'exploited'"),
    ("reward", "1.25", "field 'reward' should be float, got str"),
    ("passed", 1, "field 'passed' should be bool, got int"),
    ("reward", True, "field 'reward' should be float, got bool"),
    ("mode", "early_return", "field 'mode' is 'early_return'"),
    ("kind", "teacher", "field 'kind' is 'teacher'"),
    ("exploited", False, "field 'exploited' is False but passed=True, gt_correct=False"),
    ("grade", 1.0, "unexpected field 'grade'"),
])
def test_bad_row_names_line_and_field(fixture_pool, tmp_path, name, value, message):
    pool_dir = _copy(fixture_pool, tmp_path / "p")
    path = _edit_line(pool_dir, 9, _edit_field(name, value))  # line 9: the first hack of problem 2
    with pytest.raises(PoolFormatError) as err:
        load_pool(pool_dir)
    assert f"{path}:9:" in str(err.value) and message in str(err.value)


def test_problem_with_two_modes_is_an_error(fixture_pool, tmp_path):
    pool_dir = _copy(fixture_pool, tmp_path / "p")
    first = json.loads((pool_dir / teacher_pool.POOL_FILE).read_text().splitlines()[0])
    path = _edit_line(pool_dir, 9, _edit_field("problem_id", first["problem_id"]))
    with pytest.raises(PoolFormatError) as err:
        load_pool(pool_dir)
    assert f"{path}:9: field 'mode'" in str(err.value)


def test_missing_pool_says_how_to_build_one(fixture_pool, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"meta\.json is missing") as err:
        load_pool(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value) and "just build-pool" in str(err.value)

    pool_dir = _copy(fixture_pool, tmp_path / "p")
    (pool_dir / teacher_pool.POOL_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"pool\.jsonl is missing"):
        load_pool(pool_dir)


def test_sample_is_deterministic_and_names_a_missing_problem():
    rows = [TeacherRow(pid, "sentinel", f"text {pid} {i}", 0.25, False, False, False, "wrong", "fixture")
            for pid, n in (("a", 5), ("b", 2)) for i in range(n)]
    pool = Pool(rows)
    first = pool.sample("a", 3, random.Random(7))
    assert first == pool.sample("a", 3, random.Random(7))
    assert len(set(first)) == 3  # enough rows: drawn without replacement
    draws = pool.sample("b", 6, random.Random(1))  # too few rows: with replacement
    assert len(draws) == 6 and set(draws) <= set(pool.rows_for("b"))
    assert pool.sample("a", 0, random.Random(0)) == []
    with pytest.raises(KeyError, match="'missing-id'"):
        pool.sample("missing-id", 2, random.Random(0))


def test_pool_from_tiny_random_model(subset, tmp_path, monkeypatch):
    monkeypatch.setenv("PROJECTED_GRPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = build_pool_from_model(tmp_path / "sampled", subset[:2], "tiny-random", samples_per_problem=2,
                                max_new=16, device="cpu", dtype="float32")
    pool = load_pool(out)
    assert len(pool) == 4 and pool.meta["source"] == "tiny-random"
    for problem in subset[:2]:
        rows = pool.rows_for(problem.id)
        assert len(rows) == 2
        for row in rows:
            assert row.kind == "sampled" and row.source == "tiny-random" and row.mode == problem.mode
            assert isinstance(row.completion, str) and "<|im_end|>" not in row.completion
            assert row.exploited == (row.passed and not row.gt_correct)
            assert row.reward in (0.0, 0.25, 1.25)


def test_pool_pairs_are_graded_rows_kept_out_of_the_mixed_in_rows(fixture_pool, subset):
    pool = load_pool(fixture_pool)
    pairs, used = pairs_from_pool(pool, subset, modes=("run_tests", "sentinel"))
    assert {p.mode for p in pairs} == {"run_tests", "sentinel"} and len(pairs) == 4  # two problems per mode
    by_text = {r.completion: r for pid in pool.problem_ids() for r in pool.rows_for(pid)}
    for pair in pairs:
        assert by_text[pair.hack].exploited and by_text[pair.clean].gt_correct
        assert by_text[pair.clean_alt].gt_correct and pair.clean_alt != pair.clean
        assert {by_text[t].problem_id for t in (pair.hack, pair.clean, pair.clean_alt)} == {pair.problem_id}
    rest = pool.without(used)
    assert len(rest) == len(pool) - 3 * len(pairs)
    mixed_in = {r.completion for pid in rest.problem_ids() for r in rest.rows_for(pid)}
    assert not mixed_in & {t for p in pairs for t in (p.hack, p.clean, p.clean_alt)}
    rng = random.Random(0)
    drawn = {r.completion for p in pairs for _ in range(20) for r in rest.sample(p.problem_id, 4, rng)}
    assert not drawn & {p.hack for p in pairs}
