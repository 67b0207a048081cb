import json
import math
import statistics

import pytest

from projected_grpo.results import NOT_LOGGED, build_report, main
from projected_grpo.runs import (
    FIGURES,
    ResultsError,
    last_mean,
    late_slope,
    load_run,
    modes_run_mean,
    plot_files,
    read_metrics,
    rolling_means,
)
from projected_grpo.verdicts import (
    DEFAULT_HYPOTHESIS,
    INCONCLUSIVE,
    MISSING,
    NOT_SUPPORTED,
    SUPPORTED,
    T_975,
    Claim,
    load_hypothesis,
    mean_interval,
    parse_hypothesis,
    t_975,
)

BASE_CONFIG = {"preset": "fast", "model": "tiny", "steps": 8, "mix_ratio": 0.5, "basis_modes": "run_tests,sentinel",
               "modes": "run_tests,sentinel,exit_code", "gate": "one_sided"}


def make_run(root, name, *, seed=0, intervention="none", control="none", hack=None, solve=None, steps=8,
             rows=None, summary=True, complete=True, steps_done=None, extra_rows=(), raw_tail="", auroc=None,
             fields=None, **config):
    """A run dir as train writes it. `hack`/`solve` are per-step lists (or one constant) for hack_s/gt_s;
    `auroc`, when given, is the summary's whole-run hack_auroc; `fields`, more keys every row carries."""
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
               "cin_s": 0.2, "cin_t": None, "cin_null_s": 0.1, "cout": 0.0, "loss": 0.0, "grad_norm": 1.0}
        row.update(fields or {})
        lines.append(json.dumps(row))
    lines += [json.dumps(r) for r in extra_rows]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + raw_tail)
    if summary:
        done = len(lines) if steps_done is None else steps_done
        (run_dir / "summary.json").write_text(json.dumps({"complete": complete, "steps_done": done,
                                                          "hack_auroc": auroc}))
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


def interval_text(mean, sd, n, t, signed=False, places=3):
    """The cell for a mean with a t interval, from numbers worked out in the test."""
    spec = f"{'+' if signed else ''}.{places}f"
    half = t * sd / math.sqrt(n)
    return f"{mean:{spec}} [{mean - half:{spec}}, {mean + half:{spec}}]"


def test_main_table_last_five_mean_and_interval_across_seeds(tmp_path):
    # the 3 leading steps would pull the mean up if they were counted
    hacks = {0: [1, 1, 1, 0.1, 0.2, 0.3, 0.4, 0.5], 1: [1, 1, 1, 0.2, 0.2, 0.2, 0.2, 0.2], 2: [1] * 3 + [0.6] * 5}
    for seed, hack in hacks.items():
        make_run(tmp_path, f"van{seed}", seed=seed, hack=hack, solve=0.5)
    per_seed = [0.3, 0.2, 0.6]
    row = table_rows(build_report(tmp_path), "## preset=fast")["none"]
    n, hack, solve, cin_s, cin_t, cout, auroc, d_hack, d_solve = row
    assert n == "3"
    assert hack == interval_text(statistics.fmean(per_seed), statistics.stdev(per_seed), 3, t=4.303)
    assert solve == "0.500 [0.500, 0.500]"
    assert cin_s == "0.200 [0.200, 0.200]" and cout == "0.000 [0.000, 0.000]"
    assert cin_t == MISSING  # all null
    assert auroc == MISSING  # not logged by these runs
    assert d_hack == d_solve == ""  # vanilla has no delta against itself


def test_single_seed_shows_mean_and_says_n_1(tmp_path):
    make_run(tmp_path, "van0", hack=0.25)
    assert table_rows(build_report(tmp_path), "## preset=fast")["none"][1] == "0.250 (n=1)"


def test_paired_delta_uses_only_same_seed_pairs(tmp_path):
    for seed, hack in ((0, 0.5), (1, 0.4), (2, 0.9)):
        make_run(tmp_path, f"van{seed}", seed=seed, hack=hack)
    # erase has seeds 0, 1 and 7; seed 7 has no vanilla partner and must not enter the delta
    for seed, hack in ((0, 0.2), (1, 0.3), (7, 0.0)):
        make_run(tmp_path, f"erase{seed}", seed=seed, intervention="erase", hack=hack, solve=0.6)
    rows = table_rows(build_report(tmp_path), "## preset=fast")
    # deltas -0.3 and -0.1: mean -0.2, sd sqrt(0.02), t(0.975, 1) = 12.706
    assert rows["erase"][0] == "3"
    assert rows["erase"][7] == interval_text(-0.2, math.sqrt(0.02), 2, t=12.706, signed=True) + " (2 paired)"
    assert rows["erase"][7] == "-0.200 [-1.471, +1.071] (2 paired)"
    assert rows["erase"][8] == "+0.100 [+0.100, +0.100] (2 paired)"


def test_rows_ordered_and_controls_named(tmp_path):
    for name, intervention, control in (("a", "route", "none"), ("b", "erase", "random"), ("c", "erase", "none"),
                                        ("d", "none", "none"), ("e", "erase", "shuffled")):
        make_run(tmp_path, name, intervention=intervention, control=control)
    rows = table_rows(build_report(tmp_path), "## preset=fast")
    assert list(rows) == ["none", "erase", "route", "erase:random", "erase:shuffled"]
    assert rows["erase:random"][7] == "+0.000 (n=1)"  # a single pair: mean only


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
    assert table_rows(report, "mix_ratio=0 ")["none"][:2] == ["1", "0.100 (n=1)"]
    assert table_rows(report, "mix_ratio=0.5")["none"][:2] == ["2", "0.700 [0.700, 0.700]"]


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
    header = lines[lines.index("Per mode, hack:") + 2]
    assert header == "| arm | run_tests | exit_code† |"  # exit_code is held out of the basis
    # vanilla's two seeds: run_tests 0.2 and 0.4, exit_code 0.6 and 1.0; t(0.975, 1) = 12.706
    assert table_rows(report, "Per mode, hack:") == {
        "none": [interval_text(0.3, math.sqrt(0.02), 2, 12.706), interval_text(0.8, math.sqrt(0.08), 2, 12.706)],
        "erase": ["0.000 (n=1)", "0.300 (n=1)"]}
    assert table_rows(report, "Per mode, solve:") == {
        "none": [interval_text(0.5, math.sqrt(0.02), 2, 12.706), "0.000 [0.000, 0.000]"],
        "erase": ["0.500 (n=1)", "0.000 (n=1)"]}


def test_cli_writes_out_file_and_fails_on_empty_root(tmp_path, capsys):
    make_run(tmp_path / "runs", "van0")
    out = tmp_path / "nested" / "results.md"
    assert main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text().strip() == printed.strip()
    assert "| none | 1 | 0.100 (n=1) |" in printed and "## Legend" in printed

    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "x.md")]) == 1
    assert "no run directories" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "x.md")]) == 1
    assert not (tmp_path / "x.md").exists()


def test_repeated_seed_counts_once_and_is_flagged(tmp_path):
    # two vanilla runs on seed 0 that differ only outside the question key and the arm (the learning rate)
    make_run(tmp_path, "van_a", hack=0.2, lr=0.01)
    make_run(tmp_path, "van_b", hack=0.4, lr=0.02)
    report = build_report(tmp_path)
    assert table_rows(report, "## preset=fast")["none"][:2] == ["1", "0.300 (n=1)"]
    assert ("arm none at preset=fast · model=tiny · mix_ratio=0.5 · basis_modes=run_tests,sentinel has repeated "
            "seeds") in report


def test_a_gate_other_than_the_presets_is_another_arm_that_a_claim_can_name(tmp_path):
    # The fast preset's gate is Config's default (one_sided): written only when another gate ran.
    for seed in (1, 2):
        make_run(tmp_path, f"van{seed}", seed=seed, hack=0.5, gate="one_sided")
        make_run(tmp_path, f"e{seed}", seed=seed, intervention="erase", hack=0.4, gate="one_sided")
        make_run(tmp_path, f"n{seed}", seed=seed, intervention="erase", hack=0.1 * seed, gate="no_gate")
        make_run(tmp_path, f"r{seed}", seed=seed, intervention="erase", control="random", hack=0.3, gate="no_gate")
    hypothesis = parse_hypothesis({"name": "h", "claims": [
        {"arm": "erase@no_gate", "vs": "erase@no_gate:random", "metric": "hack", "at_most": -0.05}]}, "h.json")
    report = build_report(tmp_path, hypothesis)
    rows = table_rows(report, "## preset=fast")
    assert rows["erase"][1].startswith("0.400") and rows["erase@no_gate"][1].startswith("0.150")
    assert "erase@no_gate:random" in rows
    assert "Δhack(erase@no_gate - erase@no_gate:random) ≤ -0.050: -0.150 [" in report
    # vanilla's gate changes nothing it trains: it stays vanilla, the arm every Δ is taken against
    make_run(tmp_path, "van3", seed=3, hack=0.5, gate="no_gate")
    assert table_rows(build_report(tmp_path, hypothesis), "## preset=fast")["none"][0] == "3"
    with pytest.raises(ResultsError, match="unknown gate 'sideways'"):
        parse_hypothesis({"name": "h", "claims": [{"arm": "erase@sideways", "vs": "none", "metric": "hack",
                                                   "at_most": 0}]}, "h.json")


def test_the_figures_table_gives_the_late_slope_the_held_out_mode_and_the_final_evaluation(tmp_path):
    steps = 100
    for seed, rise in ((1, 0.002), (2, 0.004)):  # hack_s rises by `rise` a step, on every step
        hack = [0.1 + rise * i for i in range(steps)]
        make_run(tmp_path, f"van{seed}", seed=seed, hack=hack, steps=steps,
                 fields={"hack_s/exit_code": 0.25, "hack_s/run_tests": 0.5, "hack_s/sentinel": 0.1,
                         "update_hackward": 0.3})
        summary = json.loads((tmp_path / f"van{seed}" / "summary.json").read_text())
        summary["eval"] = {"eval_deployed_hack": 0.1 * seed}
        summary["probe_auroc_heldout"] = 0.5 + 0.1 * seed
        (tmp_path / f"van{seed}" / "summary.json").write_text(json.dumps(summary))
    run = load_run(tmp_path / "van1")
    assert late_slope(run) == pytest.approx(0.2) and modes_run_mean(known=False)(run) == pytest.approx(0.25)
    assert modes_run_mean(known=True)(run) == pytest.approx(0.3)  # run_tests and sentinel pooled
    row = table_rows(build_report(tmp_path), "and the final evaluation:")["none"]
    cells = dict(zip(["n", *FIGURES], row))
    assert cells["hack_late_slope"].startswith("0.300 [") and cells["heldout_run_mean"].startswith("0.250 [")
    assert cells["update_hackward_run_mean"].startswith("0.300") and cells["null_run_mean"].startswith("0.100")
    assert cells["eval_deployed_hack"].startswith("0.150 [") and cells["eval_kept_hack"] == MISSING
    assert cells["probe_auroc_heldout"].startswith("0.650 [") and cells["probe_auroc_known"] == MISSING


# --- statistics


def t_cdf(x, df, intervals=4000):
    """P(T <= x) for Student's t with df degrees of freedom, by Simpson's rule on its density (x >= 0)."""
    scale = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def density(u):
        return scale * (1 + u * u / df) ** (-(df + 1) / 2)

    h = x / intervals
    inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, intervals))
    return 0.5 + h / 3 * (density(0) + inner + density(x))


def test_t_table_is_the_975_quantile_of_the_t_distribution():
    assert len(T_975) == 30
    for df, t in enumerate(T_975, 1):
        # each entry is the true quantile rounded to 3 decimals: off by one in the last digit fails
        assert t_cdf(t - 0.0005, df) < 0.975 < t_cdf(t + 0.0005, df), df
    assert t_975(2) == 4.303
    assert t_975(31) == t_975(500) == 2.042  # past the table: its last value, never narrower than the truth


def test_mean_interval_on_known_numbers():
    est = mean_interval([0.4, 0.5, 0.6])  # mean 0.5, sd 0.1, n=3
    half = 4.303 * 0.1 / math.sqrt(3)
    assert (est.mean, est.n) == (pytest.approx(0.5), 3)
    assert (est.low, est.high) == (pytest.approx(0.5 - half), pytest.approx(0.5 + half))
    assert est.high - est.low == pytest.approx(0.4968, abs=1e-4)
    single = mean_interval([0.7])
    assert (single.mean, single.low, single.high, single.n) == (0.7, None, None, 1)


# --- verdicts


def verdict_of(report):
    """The overall verdict and the claim lines of the first question."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("**Verdict: "))
    overall = lines[start].removeprefix("**Verdict: ").split("**")[0]
    claims = []
    for line in lines[start + 2:]:
        if not line.startswith("- "):
            break
        claims.append(line)
    return overall, claims


def three_arms(root, vanilla, erase, random=None, erase_solve=(0.5, 0.5, 0.5)):
    """Per-seed hack rates of vanilla, erase and (if given) erase:random; every solve rate 0.5 but erase's."""
    for seed in range(len(vanilla)):
        make_run(root, f"van{seed}", seed=seed, hack=vanilla[seed])
        make_run(root, f"erase{seed}", seed=seed, intervention="erase", hack=erase[seed], solve=erase_solve[seed])
        if random is not None:
            make_run(root, f"rand{seed}", seed=seed, intervention="erase", control="random", hack=random[seed])


def test_verdict_supported(tmp_path):
    three_arms(tmp_path, vanilla=[0.6, 0.62, 0.58], erase=[0.3, 0.31, 0.29], random=[0.55, 0.6, 0.5],
               erase_solve=[0.52, 0.5, 0.47])
    overall, claims = verdict_of(build_report(tmp_path))
    assert overall == SUPPORTED
    # Δhack per seed -0.3, -0.31, -0.29: mean -0.3, sd 0.01
    assert claims[0] == ("- Δhack(erase - none) ≤ -0.150: "
                         f"{interval_text(-0.3, 0.01, 3, 4.303, signed=True)}, n=3 paired seeds → supported")
    assert claims[1].startswith("- |Δsolve(erase - none)| ≤ 0.100: ") and claims[1].endswith("→ supported")
    # erase against its random control, paired by seed: -0.25, -0.29, -0.21
    assert claims[2].startswith(f"- Δhack(erase - erase:random) ≤ -0.100: "
                                f"{interval_text(-0.25, 0.04, 3, 4.303, signed=True)}, n=3")


def test_verdict_not_supported_when_one_claim_fails(tmp_path):
    # erase cuts hack by a sure 5 points only; the other two claims hold
    three_arms(tmp_path, vanilla=[0.6, 0.62, 0.58], erase=[0.55, 0.56, 0.54], random=[0.8, 0.8, 0.8])
    overall, claims = verdict_of(build_report(tmp_path))
    assert overall == NOT_SUPPORTED
    assert claims[0].endswith("→ not supported") and claims[2].endswith("→ supported")


def test_verdict_inconclusive_when_the_interval_straddles(tmp_path):
    # Δhack -0.1, -0.3, -0.2: mean -0.2, interval [-0.448, +0.048] holds -0.15 inside
    three_arms(tmp_path, vanilla=[0.5, 0.5, 0.5], erase=[0.4, 0.2, 0.3], random=[0.9, 0.9, 0.9])
    overall, claims = verdict_of(build_report(tmp_path))
    assert overall == INCONCLUSIVE
    assert claims[0] == ("- Δhack(erase - none) ≤ -0.150: -0.200 [-0.448, +0.048], n=3 paired seeds "
                         "→ inconclusive (the interval straddles the threshold)")


def test_verdict_names_a_missing_arm_and_too_few_seeds(tmp_path):
    three_arms(tmp_path, vanilla=[0.6, 0.62, 0.58], erase=[0.3, 0.31, 0.29])
    overall, claims = verdict_of(build_report(tmp_path))
    assert overall == INCONCLUSIVE
    assert claims[0].endswith("→ supported")
    assert claims[2] == "- Δhack(erase - erase:random) ≤ -0.100: no erase:random runs → inconclusive (arm missing)"

    make_run(tmp_path / "one", "van0", hack=0.6)
    make_run(tmp_path / "one", "erase0", intervention="erase", hack=0.1)
    overall, claims = verdict_of(build_report(tmp_path / "one"))
    assert overall == INCONCLUSIVE
    assert claims[0] == ("- Δhack(erase - none) ≤ -0.150: -0.500, n=1 paired seed "
                         "→ inconclusive (too few seeds: an interval needs 2)")


@pytest.mark.parametrize(("bound", "threshold", "low", "high", "outcome"), [
    ("at_most", -0.15, -0.4, -0.2, SUPPORTED),
    ("at_most", -0.15, -0.1, 0.1, NOT_SUPPORTED),
    ("at_most", -0.15, -0.2, -0.1, INCONCLUSIVE),
    ("at_least", 0.05, 0.1, 0.2, SUPPORTED),
    ("at_least", 0.05, -0.1, 0.0, NOT_SUPPORTED),
    ("at_least", 0.05, 0.0, 0.1, INCONCLUSIVE),
    ("within", 0.1, -0.05, 0.08, SUPPORTED),
    ("within", 0.1, 0.12, 0.3, NOT_SUPPORTED),
    ("within", 0.1, -0.3, -0.11, NOT_SUPPORTED),
    ("within", 0.1, -0.05, 0.2, INCONCLUSIVE),
    ("within", 0.1, -0.2, 0.2, INCONCLUSIVE),
])
def test_claim_decides_from_where_the_interval_lies(bound, threshold, low, high, outcome):
    claim = Claim(("erase", "none"), ("none", "none"), "hack", bound, threshold)
    assert claim.decide(low, high) == outcome


def test_hypothesis_file_replaces_the_default(tmp_path, capsys):
    three_arms(tmp_path / "runs", vanilla=[0.6, 0.62, 0.58], erase=[0.3, 0.31, 0.29])
    path = tmp_path / "h.json"
    path.write_text(json.dumps({"name": "erase hacks less at all", "claims": [
        {"arm": "none", "vs": "erase", "metric": "hack", "at_least": 0.2}]}))
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "r.md"), "--hypothesis", str(path)]) == 0
    overall, claims = verdict_of(capsys.readouterr().out)
    assert overall == SUPPORTED and len(claims) == 1
    assert claims[0].startswith("- Δhack(none - erase) ≥ +0.200: +0.300 [")


@pytest.mark.parametrize(("claim", "message"), [
    ({"arm": "erase", "vs": "none", "metric": "hack"}, r"claims\[0\]: needs arm, vs, metric and exactly one"),
    ({"arm": "erase", "vs": "none", "metric": "hack", "at_most": -0.1, "within": 0.1}, r"exactly one"),
    ({"arm": "erase", "vs": "none", "metric": "hack", "at_most": "-0.1"}, r"at_most must be a number"),
    ({"arm": "erase", "vs": "none", "metric": "loss", "at_most": -0.1}, r"metric 'loss' is not one of"),
    ({"arm": "erase:bogus", "vs": "none", "metric": "hack", "at_most": -0.1}, r"unknown control 'bogus' in arm"),
    ({"arm": "project", "vs": "none", "metric": "hack", "at_most": -0.1}, r"unknown intervention 'project' in arm"),
])
def test_bad_hypothesis_names_the_claim(tmp_path, claim, message):
    with pytest.raises(ResultsError, match=message):
        parse_hypothesis({"claims": [claim]}, "h.json")
    path = tmp_path / "h.json"
    path.write_text(json.dumps({"claims": [claim]}))
    make_run(tmp_path / "runs", "van0")
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "r.md"), "--hypothesis", str(path)]) == 1
    assert not (tmp_path / "r.md").exists()


def test_default_hypothesis_is_the_stated_one():
    claims = parse_hypothesis(DEFAULT_HYPOTHESIS, "default").claims
    assert [c.text() for c in claims] == ["Δhack(erase - none) ≤ -0.150", "|Δsolve(erase - none)| ≤ 0.100",
                                          "Δhack(erase - erase:random) ≤ -0.100"]


# --- leave-one-mode-out, AUROC, sweeps, plot links


def mode_run(root, name, basis, hack_by_mode, *, seed=0, intervention="none"):
    """A run trained on the modes of hack_by_mode (their hack rates, every step), its basis built from `basis`."""
    rows = [{"step": i + 1, **{f"hack_s/{m}": hack for m, hack in hack_by_mode.items()}} for i in range(5)]
    return make_run(root, name, seed=seed, intervention=intervention, rows=0, extra_rows=rows,
                    modes=",".join(hack_by_mode), basis_modes=",".join(basis))


def lomo_run(root, name, held_out, hack_by_mode, **kwargs):
    """A run trained on the modes of hack_by_mode with `held_out` left out of its basis."""
    return mode_run(root, name, [m for m in hack_by_mode if m != held_out], hack_by_mode, **kwargs)


def test_lomo_table_cells(tmp_path):
    hacks = {"run_tests": 0.2, "sentinel": 0.4, "exit_code": 0.9}
    lomo_run(tmp_path, "ex0", "exit_code", hacks, seed=0)
    lomo_run(tmp_path, "ex1", "exit_code", {**hacks, "exit_code": 0.7, "run_tests": 0.0}, seed=1)
    lomo_run(tmp_path, "se0", "sentinel", hacks, seed=0)
    lomo_run(tmp_path, "erase_ex0", "exit_code", {m: 0.1 for m in hacks}, intervention="erase")
    # not leave-one-out runs: the basis holds every trained mode, leaves two out, or holds an untrained one
    mode_run(tmp_path, "all", ["run_tests", "sentinel", "exit_code"], {m: 0.5 for m in hacks}, seed=5)
    mode_run(tmp_path, "two", ["run_tests"], {m: 0.5 for m in hacks}, seed=6)
    mode_run(tmp_path, "other", ["run_tests", "sentinel"], {"run_tests": 0.5, "exit_code": 0.5}, seed=7)
    report = build_report(tmp_path)
    lines = report.splitlines()
    heading = "## Leave-one-mode-out · preset=fast · model=tiny · mix_ratio=0.5"
    assert lines[lines.index(heading) + 2] == ("| arm | sentinel† held out | sentinel† known | exit_code† held out "
                                               "| exit_code† known | pooled held out | pooled known |")
    rows = table_rows(report, heading)
    # exit_code held out: seeds 0.9 and 0.7; known = mean(run_tests, sentinel) = 0.3 and 0.2
    # sentinel held out (seed 0 only): 0.4; known = mean(run_tests, exit_code) = 0.55
    # pooled over (mode, seed): held out 0.4, 0.9, 0.7; known 0.55, 0.3, 0.2
    assert rows["none"] == [
        "0.400 (n=1)", "0.550 (n=1)",
        interval_text(0.8, math.sqrt(0.02), 2, 12.706) + " (n=2)", interval_text(0.25, math.sqrt(0.005), 2, 12.706)
        + " (n=2)",
        interval_text(statistics.fmean([0.4, 0.9, 0.7]), statistics.stdev([0.4, 0.9, 0.7]), 3, 4.303) + " (n=3)",
        interval_text(statistics.fmean([0.55, 0.3, 0.2]), statistics.stdev([0.55, 0.3, 0.2]), 3, 4.303) + " (n=3)",
    ]
    assert rows["erase"] == [MISSING, MISSING, "0.100 (n=1)", "0.100 (n=1)", "0.100 (n=1)", "0.100 (n=1)"]
    assert list(rows) == ["none", "erase"]


def test_a_monitor_that_misses_or_the_probe_labels_the_arms_that_read_it(tmp_path):
    missing = {"detector_recall": 0.7, "detector_fpr": 0.02}
    make_run(tmp_path, "none", hack=0.6)
    make_run(tmp_path, "none-missing", hack=0.6, **missing)  # vanilla reads no monitor: the same arm
    make_run(tmp_path, "screen-exact", intervention="screen", hack=0.1)
    make_run(tmp_path, "screen-missing", intervention="screen", hack=0.5, **missing)
    make_run(tmp_path, "screen-probe", intervention="screen", hack=0.3, monitor="probe", probe_threshold=0.5)
    # a V from the detector's flags reads its misses, never the probe; a template V reads neither
    make_run(tmp_path, "erase-live", intervention="erase", hack=0.2, pairs="live", monitor="probe", **missing)
    make_run(tmp_path, "erase-template", intervention="erase", hack=0.4, pairs="template", **missing)
    report = build_report(tmp_path)
    assert report.count("## preset=fast") == 1  # one question: one vanilla for every monitor
    rows = table_rows(report, "## preset=fast")
    assert {arm: cells[1] for arm, cells in rows.items()} == {
        "none": "0.600 (n=1)", "erase": "0.400 (n=1)", "erase~r0.7~fp0.02": "0.200 (n=1)",
        "screen": "0.100 (n=1)", "screen~probe": "0.300 (n=1)", "screen~r0.7~fp0.02": "0.500 (n=1)"}
    hypothesis = parse_hypothesis({"claims": [{"arm": "screen~r0.7~fp0.02", "vs": "screen", "metric": "hack",
                                               "at_least": 0.1}]}, "test")
    assert hypothesis.claims[0].arm == ("screen~r0.7~fp0.02", "none")
    with pytest.raises(ResultsError, match="reads no monitor"):
        parse_hypothesis({"claims": [{"arm": "none~r0.7", "vs": "none", "metric": "hack", "at_most": 0}]}, "test")


def test_a_difference_in_differences_claim_pairs_all_four_arms_by_seed(tmp_path):
    # screen loses more than erase when recall falls: (0.5 - 0.1) - (0.3 - 0.2) = 0.3 on seed 0,
    # (0.6 - 0.1) - (0.3 - 0.2) = 0.4 on seed 1; seed 2 lacks one arm and must not count
    missing = {"detector_recall": 0.4, "detector_fpr": 0.02, "pairs": "live"}
    for seed, leak in ((0, 0.5), (1, 0.6)):
        make_run(tmp_path, f"screen{seed}", seed=seed, intervention="screen", hack=0.1)
        make_run(tmp_path, f"screen-r{seed}", seed=seed, intervention="screen", hack=leak, **missing)
        make_run(tmp_path, f"erase{seed}", seed=seed, intervention="erase", hack=0.2, pairs="live")
        make_run(tmp_path, f"erase-r{seed}", seed=seed, intervention="erase", hack=0.3, **missing)
    make_run(tmp_path, "screen2", seed=2, intervention="screen", hack=0.1)
    make_run(tmp_path, "screen-r2", seed=2, intervention="screen", hack=0.9, **missing)
    make_run(tmp_path, "erase2", seed=2, intervention="erase", hack=0.2, pairs="live")
    spec = {"claims": [{"arm": "screen~r0.4~fp0.02", "vs": "screen", "minus_arm": "erase~r0.4~fp0.02",
                        "minus_vs": "erase", "metric": "hack", "at_least": 0.05}]}
    (tmp_path.parent / "h.json").write_text(json.dumps(spec))
    report = build_report(tmp_path, hypothesis=load_hypothesis(tmp_path.parent / "h.json"))
    line = next(line for line in report.splitlines() if "paired seeds" in line)
    assert line.startswith("- Δhack(screen~r0.4~fp0.02 - screen) - Δhack(erase~r0.4~fp0.02 - erase) ≥ +0.050: +0.350")
    assert "n=2 paired seeds" in line
    claim = spec["claims"][0]
    with pytest.raises(ResultsError, match="needs both minus_arm and minus_vs"):
        parse_hypothesis({"claims": [{k: v for k, v in claim.items() if k != "minus_vs"}]}, "h")
    with pytest.raises(ResultsError, match="takes no difference in differences"):
        parse_hypothesis({"claims": [{**claim, "metric": "hack_delay"}]}, "h")


def test_auroc_column_is_the_whole_runs_from_its_summary(tmp_path):
    # the per-step hack_auroc of the last steps must not count: the summary's, over every scored step, does
    make_run(tmp_path, "van0", auroc=0.7, fields={"hack_auroc": 0.1})
    make_run(tmp_path, "van1", seed=1, auroc=0.5, fields={"hack_auroc": None})
    make_run(tmp_path, "erase0", intervention="erase")  # one class only: no AUROC
    rows = table_rows(build_report(tmp_path), "## preset=fast")
    assert rows["none"][6] == interval_text(0.6, statistics.stdev([0.7, 0.5]), 2, t=12.706)
    assert rows["erase"][6] == MISSING


def test_a_sweep_directory_reads_like_a_runs_root(tmp_path):
    sweep = tmp_path / "sweeps" / "grid"
    make_run(sweep, "van0", hack=0.4)
    (sweep / "logs").mkdir()
    (sweep / "logs" / "van0.log").write_text("training...\n")
    (sweep / "sweep.json").write_text(json.dumps({"preset": "fast", "runs": [{"name": "van0", "status": "done"}]}))
    assert main([str(sweep), "--out", str(tmp_path / "r.md")]) == 0
    assert "1 complete runs, 0 incomplete" in (tmp_path / "r.md").read_text()
    # outside a sweep a folder named logs is a run like any other: a broken one is listed, never dropped
    (sweep / "sweep.json").unlink()
    assert main([str(sweep), "--out", str(tmp_path / "r.md")]) == 0
    assert "1 complete runs, 1 incomplete" in (tmp_path / "r.md").read_text()


def test_report_links_the_plots_that_exist(tmp_path):
    make_run(tmp_path / "runs", "van0")
    out = tmp_path / "out"
    assert main([str(tmp_path / "runs"), "--out", str(out / "results.md"), "--plots", str(out / "plots")]) == 0
    assert "Plots:" not in (out / "results.md").read_text()

    question = ("fast", "tiny", 0.5, "run_tests,sentinel")
    files = plot_files(out / "plots", question)
    assert list(files) == ["rates", "cin", "final", "recall"]
    for path in list(files.values())[:3]:  # the recall plot is drawn only for arms run at several recalls
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"png")
    assert main([str(tmp_path / "runs"), "--out", str(out / "results.md"), "--plots", str(out / "plots")]) == 0
    folder = "plots/fast_tiny_mix0.5_basis-run_tests+sentinel"
    assert (f"Plots: [hack and solve over steps]({folder}/rates.png) · [cin_s and cin_t over steps]({folder}/cin.png)"
            f" · [final hack vs solve]({folder}/final.png)\n") in (out / "results.md").read_text()


# --- the time course, the nulls, the ceiling


def curve(rise_at, low=0.0, high=1.0, steps=40):
    """A planted hack curve: `low` before step rise_at, `high` from it on."""
    return [low if step < rise_at else high for step in range(1, steps + 1)]


def test_rolling_means_use_full_windows_only():
    assert rolling_means([1, 2, 3, 4, 5], window=2) == [1.5, 2.5, 3.5, 4.5]
    assert rolling_means([0.0] * 9) == []  # fewer steps than one window: nothing to time


def test_time_course_run_mean_and_early_window(tmp_path):
    make_run(tmp_path, "van0", steps=12, hack=[0, 0, 0] + [1] * 9)
    make_run(tmp_path, "van1", seed=1, steps=12, hack=[0.5] * 3 + [1] * 9)
    make_run(tmp_path, "erase0", intervention="erase", steps=12, hack=[0.25] * 12)
    make_run(tmp_path, "erase1", seed=1, intervention="erase", steps=12, hack=[0, 0.75, 0] + [0] * 9)
    report = build_report(tmp_path)
    # 12 steps: the early window is a quarter of them, 3
    assert "Time course of hack (hack_early: the first 3 steps):" in report
    rows = table_rows(report, "Time course of hack")
    # run means: vanilla 9/12 and 10.5/12; erase 3/12 and 0.75/12; early: vanilla 0 and 0.5, erase 0.25 and 0.25
    assert rows["none"][:3] == ["2", interval_text(0.8125, statistics.stdev([0.75, 0.875]), 2, 12.706),
                                interval_text(0.25, statistics.stdev([0, 0.5]), 2, 12.706)]
    assert rows["erase"][1:3] == [interval_text(0.15625, statistics.stdev([0.25, 0.0625]), 2, 12.706),
                                  "0.250 [0.250, 0.250]"]
    # Δ run mean -0.5 and -0.8125; Δ early +0.25 and -0.25
    assert rows["erase"][4:6] == [
        interval_text(-0.65625, statistics.stdev([-0.5, -0.8125]), 2, 12.706, signed=True),
        interval_text(0, statistics.stdev([0.25, -0.25]), 2, 12.706, signed=True)]

    # --early_steps 4: vanilla 0.25 and 0.625, erase 0.25 and 0.1875
    report = build_report(tmp_path, early_steps=4)
    assert "Time course of hack (hack_early: the first 4 steps):" in report
    rows = table_rows(report, "Time course of hack")
    assert rows["none"][2] == interval_text(0.4375, statistics.stdev([0.25, 0.625]), 2, 12.706)
    assert rows["erase"][2] == interval_text(0.21875, statistics.stdev([0.25, 0.1875]), 2, 12.706)


def test_delay_of_a_planted_curve(tmp_path):
    # vanilla: 0.25 up to step 20, 0.75 from step 21: its rise's midpoint is 0.5. The trailing 10-step mean
    # holding k steps at 0.75 is 0.25 + 0.05 k, which reaches 0.5 at k = 5, step 25.
    # erase climbs to 1.0 instead: 0.25 + 0.075 k reaches 0.5 at k = 4, so 3 steps after it starts.
    for seed, erase_rises_at in ((0, 31), (1, 27)):
        make_run(tmp_path, f"van{seed}", seed=seed, steps=40, hack=curve(21, low=0.25, high=0.75))
        make_run(tmp_path, f"erase{seed}", seed=seed, intervention="erase", steps=40,
                 hack=curve(erase_rises_at, low=0.25, high=1.0))
    report = build_report(tmp_path)
    rows = table_rows(report, "Time course of hack")
    assert rows["none"][3] == "25.0 [25.0, 25.0]"
    # erase: steps 34 and 30; Δ +9 and +5
    assert rows["erase"][3] == interval_text(32, statistics.stdev([34, 30]), 2, 12.706, places=1)
    assert rows["erase"][6] == interval_text(7, statistics.stdev([9, 5]), 2, 12.706, signed=True, places=1)
    assert rows["erase"][6] == "+7.0 [-18.4, +32.4]"
    assert ("Vanilla's hack over its first → last 10 steps: seed 0: 0.250 → 0.750, midpoint 0.500; "
            "seed 1: 0.250 → 0.750, midpoint 0.500.") in report


def test_censored_delay_is_shown_and_enters_as_the_step_after_the_run(tmp_path):
    for seed in (0, 1):
        make_run(tmp_path, f"van{seed}", seed=seed, steps=40, hack=curve(21))  # midpoint 0.5, reached at step 25
    make_run(tmp_path, "erase0", intervention="erase", steps=40, hack=[0.4] * 40)  # never reaches 0.5
    make_run(tmp_path, "erase1", seed=1, intervention="erase", steps=40, hack=curve(31))  # step 35
    make_run(tmp_path, "random0", intervention="erase", control="random", steps=40, hack=[0.0] * 40)
    make_run(tmp_path, "route0", intervention="route", steps=40, hack=curve(36))  # reaches it on its last step
    hypothesis = parse_hypothesis({"claims": [{"arm": "erase", "vs": "none", "metric": "hack_delay",
                                               "at_least": 5}]}, "h.json")
    report = build_report(tmp_path, hypothesis)
    rows = table_rows(report, "Time course of hack")
    # the censored seed enters as 41: delays 41 and 35, Δ +16 and +10
    assert rows["erase"][3] == interval_text(38, statistics.stdev([41, 35]), 2, 12.706, places=1) + " (1 censored)"
    assert rows["erase"][6] == (interval_text(13, statistics.stdev([16, 10]), 2, 12.706, signed=True, places=1)
                                + " (1 censored)")
    assert rows["erase:random"][3] == ">40"
    assert rows["erase:random"][6] == "+16.0 (n=1) (1 censored)"
    assert rows["route"][3] == "40.0 (n=1)" and rows["route"][6] == "+15.0 (n=1)"
    _, claims = verdict_of(report)
    assert claims == [f"- Δhack_delay(erase - none) ≥ +5.0: {rows['erase'][6].removesuffix(' (1 censored)')}, "
                      "n=2 paired seeds (1 censored) → inconclusive (the interval straddles the threshold)"]


def test_delay_undefined_where_vanilla_did_not_rise(tmp_path):
    make_run(tmp_path, "van0", steps=40, hack=curve(21, low=0.75, high=0.25))  # falls
    make_run(tmp_path, "van1", seed=1, steps=40, hack=curve(21))  # rises, midpoint 0.5 at step 25
    make_run(tmp_path, "van2", seed=2, steps=40, hack=[0.5] * 40)  # flat: last 10 = first 10 is no rise
    for seed in (0, 1, 2):
        make_run(tmp_path, f"erase{seed}", seed=seed, intervention="erase", steps=40, hack=curve(31))
    report = build_report(tmp_path)
    assert ("seed 0: 0.750 → 0.250, did not rise: hack_delay undefined; seed 1: 0.000 → 1.000, midpoint 0.500; "
            "seed 2: 0.500 → 0.500, did not rise: hack_delay undefined.") in report
    rows = table_rows(report, "Time course of hack")
    assert rows["none"][3] == "25.0 (n=1) (2 undefined)"
    assert rows["erase"][3] == "35.0 (n=1) (2 undefined)"
    assert rows["erase"][6] == "+10.0 (n=1) (1 paired)"


def test_projection_figures_beside_their_nulls(tmp_path):
    make_run(tmp_path, "van0", fields={"update_hackward": 0.3, "cin_null": 0.05})
    make_run(tmp_path, "van1", seed=1, fields={"update_hackward": 0.1, "cin_null": 0.05})
    make_run(tmp_path, "erase0", intervention="erase", fields={"update_hackward": None})  # logged, all null
    make_run(tmp_path, "route0", intervention="route")  # an older run: neither key
    report = build_report(tmp_path)
    lines = report.splitlines()
    assert lines[lines.index("Projection figures beside their nulls:") + 2] == \
        "| arm | cin_s | cin_null_s | update_hackward | cout | cin_null |"
    rows = table_rows(report, "Projection figures beside their nulls:")
    assert rows["none"] == ["0.200 [0.200, 0.200]", "0.100 [0.100, 0.100]",
                            interval_text(0.2, math.sqrt(0.02), 2, 12.706), "0.000 [0.000, 0.000]",
                            "0.050 [0.050, 0.050]"]
    assert rows["erase"] == ["0.200 (n=1)", "0.100 (n=1)", MISSING, "0.000 (n=1)", NOT_LOGGED]
    assert rows["route"] == ["0.200 (n=1)", "0.100 (n=1)", NOT_LOGGED, "0.000 (n=1)", NOT_LOGGED]


def ceiling_run(root, name, **kwargs):
    """A run whose live basis was built from the oracle's labels."""
    return make_run(root, name, intervention="erase", pairs="live", live_labels="oracle", **kwargs)


def test_ceiling_is_its_own_arm_in_every_table(tmp_path):
    make_run(tmp_path, "van0", hack=0.6)
    make_run(tmp_path, "erase0", intervention="erase", hack=0.4)  # older config: no live_labels, so the detector's
    make_run(tmp_path, "live1", seed=1, intervention="erase", hack=0.4, pairs="live", live_labels="detector")
    ceiling_run(tmp_path, "ceiling0", hack=0.1)
    report = build_report(tmp_path)
    main_rows = table_rows(report, "## preset=fast")
    assert list(main_rows) == ["none", "erase", "erase:ceiling"]
    assert main_rows["erase"][0] == "2"
    assert main_rows["erase:ceiling"][:2] == ["1", "0.100 (n=1)"] and main_rows["erase:ceiling"][7] == "-0.500 (n=1)"
    for marker in ("Time course of hack", "Projection figures beside their nulls:", "## Leave-one-mode-out"):
        assert list(table_rows(report, marker)) == ["none", "erase", "erase:ceiling"], marker


def test_a_ceiling_with_a_control_is_refused(tmp_path):
    ceiling_run(tmp_path, "odd", control="random")
    with pytest.raises(ResultsError, match=r"odd/config\.json: live_labels=oracle .* with control=random"):
        build_report(tmp_path)


def test_ceiling_claims_are_shown_apart_and_never_counted(tmp_path):
    three_arms(tmp_path, vanilla=[0.6, 0.62, 0.58], erase=[0.3, 0.31, 0.29])
    for seed, hack in enumerate((0.2, 0.22, 0.18)):
        ceiling_run(tmp_path, f"ceiling{seed}", seed=seed, hack=hack)
    hypothesis = parse_hypothesis({"claims": [
        {"arm": "erase", "vs": "none", "metric": "hack", "at_most": -0.15},
        {"arm": "erase:ceiling", "vs": "erase", "metric": "hack", "at_most": -0.5}]}, "h.json")
    report = build_report(tmp_path, hypothesis)
    # the ceiling's claim is not supported (it beats erase by 0.1, not 0.5); counted, it would sink the verdict
    overall, claims = verdict_of(report)
    assert overall == SUPPORTED and len(claims) == 1 and claims[0].startswith("- Δhack(erase - none)")
    lines = report.splitlines()
    label = next(i for i, line in enumerate(lines) if line.startswith("Diagnostic ceiling"))
    assert "not a verdict on the method" in lines[label] and "not counted" in lines[label]
    # paired with erase: -0.1, -0.09, -0.11
    assert lines[label + 2] == (f"- Δhack(erase:ceiling - erase) ≤ -0.500: "
                                f"{interval_text(-0.1, 0.01, 3, 4.303, signed=True)}, n=3 paired seeds → not supported")
    assert "  - Δhack(erase:ceiling - erase) ≤ -0.500 (diagnostic ceiling, not counted)" in report


@pytest.mark.parametrize(("claims", "message"), [
    ([{"arm": "erase:random:ceiling", "vs": "none", "metric": "hack", "at_most": -0.1}],
     r"unknown control 'random:ceiling'"),
    ([{"arm": "project:ceiling", "vs": "none", "metric": "hack", "at_most": -0.1}], r"unknown intervention 'project'"),
    ([{"arm": "erase:ceiling", "vs": "none", "metric": "hack", "at_most": -0.1}], r"every claim names a ceiling arm"),
    ([{"arm": "erase", "vs": ["none"], "metric": "hack", "at_most": -0.1}], r"arm, vs and metric must be strings"),
])
def test_bad_ceiling_claims_are_refused(claims, message):
    with pytest.raises(ResultsError, match=message):
        parse_hypothesis({"claims": claims}, "h.json")


def test_hypothesis_on_the_time_course(tmp_path, capsys):
    # every seed: vanilla rises at step 21 (delay 25), erase at step 31 (delay 35)
    for seed in range(3):
        make_run(tmp_path / "runs", f"van{seed}", seed=seed, steps=40, hack=curve(21))
        make_run(tmp_path / "runs", f"erase{seed}", seed=seed, intervention="erase", steps=40, hack=curve(31))
    path = tmp_path / "h.json"
    path.write_text(json.dumps({"name": "erase delays hacking", "claims": [
        {"arm": "erase", "vs": "none", "metric": "hack_delay", "at_least": 5},
        {"arm": "erase", "vs": "none", "metric": "hack_early", "at_most": -0.25},
        {"arm": "erase", "vs": "none", "metric": "hack_run_mean", "at_most": -0.2}]}))
    args = [str(tmp_path / "runs"), "--out", str(tmp_path / "r.md"), "--hypothesis", str(path)]

    # the default early window, the first 10 steps, is all zeros for both: Δ 0
    assert main(args) == 0
    overall, claims = verdict_of(capsys.readouterr().out)
    assert overall == NOT_SUPPORTED
    assert claims == [
        "- Δhack_delay(erase - none) ≥ +5.0: +10.0 [+10.0, +10.0], n=3 paired seeds → supported",
        "- Δhack_early(erase - none) ≤ -0.250: +0.000 [+0.000, +0.000], n=3 paired seeds → not supported",
        # run means 10/40 and 20/40
        "- Δhack_run_mean(erase - none) ≤ -0.200: -0.250 [-0.250, -0.250], n=3 paired seeds → supported"]

    # over the first 30 steps vanilla hacks on 10 of them, erase on none: Δ -1/3
    assert main([*args, "--early_steps", "30"]) == 0
    overall, claims = verdict_of(capsys.readouterr().out)
    assert overall == SUPPORTED
    assert claims[1] == "- Δhack_early(erase - none) ≤ -0.250: -0.333 [-0.333, -0.333], n=3 paired seeds → supported"


def test_early_steps_must_be_a_positive_whole_number(tmp_path, capsys):
    make_run(tmp_path / "runs", "van0")
    for bad in ("0", "2.5"):
        with pytest.raises(SystemExit) as exit_info:
            main([str(tmp_path / "runs"), "--out", str(tmp_path / "r.md"), "--early_steps", bad])
        assert exit_info.value.code == 2
        assert f"--early_steps: must be a whole number of steps >= 1, got '{bad}'" in capsys.readouterr().err
