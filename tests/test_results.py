import json
import statistics

import pytest

from projected_grpo.results import MISSING, ResultsError, build_report, last_mean, main, read_metrics

BASE_CONFIG = {"preset": "fast", "model": "tiny", "steps": 8, "mix_ratio": 0.5, "basis_modes": "run_tests,sentinel",
               "modes": "run_tests,sentinel,exit_code", "gate": "one_sided"}


def make_run(root, name, *, seed=0, intervention="none", control="none", hack=None, solve=None, steps=8,
             rows=None, summary=True, complete=True, steps_done=None, extra_rows=(), raw_tail="", **config):
    """A run dir as train writes it. `hack`/`solve` are per-step lists (or one constant) for hack_s/gt_s."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    cfg = {**BASE_CONFIG, "intervention": intervention, "control": control, "seed": seed, "steps": steps,
           "run_name": name, **config}
    (run_dir / "config.json").write_text(json.dumps(cfg))
    n_rows = steps if rows is None else rows
    hack = hack if isinstance(hack, list) else [0.1 if hack is None else hack] * n_rows
    solve = solve if isinstance(solve, list) else [0.5 if solve is None else solve] * n_rows
    lines = []
    for i in range(n_rows):
        row = {"step": i + 1, "reward": 1.0, "hack_s": hack[i], "gt_s": solve[i], "hack_t": None, "gt_t": None,
               "cin_s": 0.2, "cin_t": None, "cout": 0.0, "loss": 0.0, "grad_norm": 1.0}
        lines.append(json.dumps(row))
    lines += [json.dumps(r) for r in extra_rows]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + raw_tail)
    if summary:
        done = len(lines) if steps_done is None else steps_done
        (run_dir / "summary.json").write_text(json.dumps({"complete": complete, "steps_done": done}))
    return run_dir


def table_rows(report, marker):
    """First column -> other cells, for the first table after the first line containing `marker`."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line)
    table = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip("|").split("|")])
        elif table:
            break
    return {cells[0]: cells[1:] for cells in table[2:]}  # past the header and the --- line


def test_last_mean_uses_the_last_five_steps_and_skips_nulls():
    rows = [{"hack_s": v} for v in (9, 9, 9, 0.1, 0.2, 0.3, 0.4, 0.5)]
    assert last_mean(rows, "hack_s") == pytest.approx(0.3)
    assert last_mean(rows[:2], "hack_s") == pytest.approx(9)  # a short run uses what it has
    assert last_mean([{"hack_t": None}, {"hack_t": 0.4}, {}], "hack_t") == pytest.approx(0.4)
    assert last_mean([{"hack_t": None}], "hack_t") is None


def test_main_table_last_five_mean_and_std_across_seeds(tmp_path):
    # the 3 leading steps would pull the mean up if they were counted
    hacks = {0: [1, 1, 1, 0.1, 0.2, 0.3, 0.4, 0.5], 1: [1, 1, 1, 0.2, 0.2, 0.2, 0.2, 0.2], 2: [1] * 3 + [0.6] * 5}
    for seed, hack in hacks.items():
        make_run(tmp_path, f"van{seed}", seed=seed, hack=hack, solve=0.5)
    per_seed = [0.3, 0.2, 0.6]
    row = table_rows(build_report(tmp_path), "## preset=fast")["none"]
    n, hack, solve, cin_s, cin_t, cout, d_hack, d_solve = row
    assert n == "3"
    assert hack == f"{statistics.fmean(per_seed):.3f} ± {statistics.stdev(per_seed):.3f}"
    assert solve == "0.500 ± 0.000"
    assert cin_s == "0.200 ± 0.000" and cout == "0.000 ± 0.000"
    assert cin_t == MISSING  # all null
    assert d_hack == d_solve == ""  # vanilla has no delta against itself


def test_single_seed_shows_mean_only(tmp_path):
    make_run(tmp_path, "van0", hack=0.25)
    assert table_rows(build_report(tmp_path), "## preset=fast")["none"][1] == "0.250"


def test_paired_delta_uses_only_same_seed_pairs(tmp_path):
    for seed, hack in ((0, 0.5), (1, 0.4), (2, 0.9)):
        make_run(tmp_path, f"van{seed}", seed=seed, hack=hack)
    # erase has seeds 0, 1 and 7; seed 7 has no vanilla partner and must not enter the delta
    for seed, hack in ((0, 0.2), (1, 0.3), (7, 0.0)):
        make_run(tmp_path, f"erase{seed}", seed=seed, intervention="erase", hack=hack, solve=0.6)
    rows = table_rows(build_report(tmp_path), "## preset=fast")
    deltas = [0.2 - 0.5, 0.3 - 0.4]
    assert rows["erase"][0] == "3"
    assert rows["erase"][6] == f"{statistics.fmean(deltas):+.3f} ± {statistics.stdev(deltas):.3f} (2 paired)"
    assert rows["erase"][7] == "+0.100 ± 0.000 (2 paired)"


def test_rows_ordered_and_controls_named(tmp_path):
    for name, intervention, control in (("a", "route", "none"), ("b", "erase", "random"), ("c", "erase", "none"),
                                        ("d", "none", "none"), ("e", "erase", "shuffled")):
        make_run(tmp_path, name, intervention=intervention, control=control)
    rows = table_rows(build_report(tmp_path), "## preset=fast")
    assert list(rows) == ["none", "erase", "route", "erase+random", "erase+shuffled"]
    assert rows["erase+random"][6] == "+0.000"  # a single pair: mean only


def test_incomplete_runs_are_listed_and_kept_out_of_tables(tmp_path):
    make_run(tmp_path, "van0", hack=0.2)
    make_run(tmp_path, "van1", seed=1, hack=0.4)
    clean_report = build_report(tmp_path)
    # each would drag the vanilla numbers if it were counted
    make_run(tmp_path, "nosummary", seed=2, hack=0.9, rows=3, summary=False)
    make_run(tmp_path, "crashed", seed=3, hack=0.9, complete=False)
    make_run(tmp_path, "short", seed=4, hack=0.9, rows=6, steps_done=8)
    (tmp_path / "stray").mkdir()
    report = build_report(tmp_path)

    assert table_rows(report, "## preset=fast") == table_rows(clean_report, "## preset=fast")
    incomplete = table_rows(report, "## Incomplete runs")
    assert incomplete == {
        "crashed": ["8 / 8", "summary.json says complete=false"],
        "nosummary": ["3 / 8", "no summary.json"],
        "short": ["6 / 8", "metrics.jsonl has 6 rows, summary.json says steps_done=8"],
        "stray": ["0 / ?", "no config.json"],
    }


def test_truncated_final_line_is_tolerated(tmp_path):
    run = make_run(tmp_path, "crashed", summary=False, rows=3, raw_tail='{"step": 4, "hack')
    rows, partial = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and partial == 4
    report = build_report(tmp_path)
    assert table_rows(report, "## Incomplete runs")["crashed"] == ["3 / 8", "no summary.json"]
    assert "skipped a partial final line" in report and "metrics.jsonl:4" in report


def test_malformed_middle_line_raises_with_file_and_line(tmp_path):
    make_run(tmp_path, "bad", rows=2, raw_tail='{"step": 3, oops\n{"step": 4}\n')
    with pytest.raises(ResultsError, match=r"bad/metrics\.jsonl:3: malformed"):
        build_report(tmp_path)
    assert main([str(tmp_path), "--out", str(tmp_path / "r.md")]) == 1


def test_each_setting_is_its_own_question(tmp_path):
    make_run(tmp_path, "mix0", mix_ratio=0.0, hack=0.1)
    make_run(tmp_path, "mix5", mix_ratio=0.5, hack=0.7)
    # the same basis spelled in another order is the same question
    make_run(tmp_path, "mix5b", mix_ratio=0.5, seed=1, hack=0.7, basis_modes="sentinel,run_tests")
    report = build_report(tmp_path)
    headings = [line for line in report.splitlines() if line.startswith("## preset=")]
    assert headings == [
        "## preset=fast · model=tiny · mix_ratio=0 · basis_modes=run_tests,sentinel",
        "## preset=fast · model=tiny · mix_ratio=0.5 · basis_modes=run_tests,sentinel",
    ]
    assert table_rows(report, "mix_ratio=0 ")["none"][:2] == ["1", "0.100"]
    assert table_rows(report, "mix_ratio=0.5")["none"][:2] == ["2", "0.700 ± 0.000"]


def test_per_mode_table_cells(tmp_path):
    def mode_rows(hack_rt, solve_rt, hack_ex):
        # exit_code shows up only on odd steps, as a mode absent from a step's batch would
        return [{"step": 100 + i, "hack_s/run_tests": hack_rt, "gt_s/run_tests": solve_rt,
                 **({"hack_s/exit_code": hack_ex, "gt_s/exit_code": 0.0} if i % 2 else {})} for i in range(5)]

    make_run(tmp_path, "van0", seed=0, rows=0, extra_rows=mode_rows(0.2, 0.4, 0.6))
    make_run(tmp_path, "van1", seed=1, rows=0, extra_rows=mode_rows(0.4, 0.6, 1.0))
    make_run(tmp_path, "erase0", intervention="erase", rows=0, extra_rows=mode_rows(0.0, 0.5, 0.3))
    report = build_report(tmp_path)
    lines = report.splitlines()
    header = lines[lines.index("Per mode (hack/solve):") + 2]
    assert header == "| arm | run_tests | exit_code† |"  # exit_code is held out of the basis
    rows = table_rows(report, "Per mode (hack/solve):")
    assert rows == {"none": ["0.300/0.500", "0.800/0.000"], "erase": ["0.000/0.500", "0.300/0.000"]}


def test_cli_writes_out_file_and_fails_on_empty_root(tmp_path, capsys):
    make_run(tmp_path / "runs", "van0")
    out = tmp_path / "nested" / "results.md"
    assert main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text().strip() == printed.strip()
    assert "| none | 1 | 0.100 |" in printed and "## Legend" in printed

    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "x.md")]) == 1
    assert "no run directories" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "x.md")]) == 1
    assert not (tmp_path / "x.md").exists()


def test_repeated_seed_counts_once_and_is_flagged(tmp_path):
    # two vanilla runs on seed 0 that differ only outside the question key (the gate)
    make_run(tmp_path, "van_a", hack=0.2, gate="one_sided")
    make_run(tmp_path, "van_b", hack=0.4, gate="no_gate")
    report = build_report(tmp_path)
    assert table_rows(report, "## preset=fast")["none"][:2] == ["1", "0.300"]
    assert "arm none at fast/tiny/mix_ratio=0.5/run_tests,sentinel has repeated seeds" in report
