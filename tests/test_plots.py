import sys

import pytest
from test_results import make_run

from projected_grpo import plots
from projected_grpo.plots import _over_steps, early_span, main, make_plots, recall_lines, step_series
from projected_grpo.results import build_report
from projected_grpo.runs import ResultsError, group_questions, load_runs, plot_files


@pytest.fixture
def matplotlib():
    return pytest.importorskip("matplotlib")


def two_arms(root):
    for seed, (van, erase) in enumerate(((0.6, 0.2), (0.4, 0.1))):
        make_run(root, f"van{seed}", seed=seed, hack=van)
        make_run(root, f"erase{seed}", seed=seed, intervention="erase", hack=erase, solve=[0.1 * i for i in range(8)])


def test_step_series_mean_and_band_across_runs(tmp_path):
    make_run(tmp_path, "a", rows=3, hack=[0.2, 0.4, None])  # a null step counts for nobody
    make_run(tmp_path, "b", rows=3, seed=1, hack=[0.6, 0.0, 0.3])
    runs = load_runs(tmp_path)
    steps, mean, low, high = step_series(runs, "hack_s")
    assert steps == [1, 2, 3]
    assert mean == pytest.approx([0.4, 0.2, 0.3]) and low == [0.2, 0.0, 0.3] and high == [0.6, 0.4, 0.3]
    assert step_series(runs, "not_logged") == ([], [], [], [])


def test_plots_written_per_question_and_linked(tmp_path, matplotlib):
    two_arms(tmp_path / "runs")
    make_run(tmp_path / "runs", "other", mix_ratio=0.0)  # a second question
    written = make_plots(tmp_path / "runs", tmp_path / "plots")
    assert len(written) == 6
    question = ("fast", "tiny", 0.5, "run_tests,sentinel")
    for plot, path in plot_files(tmp_path / "plots", question).items():
        if plot == "recall":  # no arm ran at two recalls
            assert path not in written and not path.exists()
            continue
        assert path in written
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    report = build_report(tmp_path / "runs", plots_dir=tmp_path / "plots", report_dir=tmp_path)
    assert report.count("Plots: [hack and solve over steps](plots/") == 2


def test_cli_writes_pngs_and_fails_on_a_missing_root(tmp_path, capsys, matplotlib):
    two_arms(tmp_path / "runs")
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "plots")]) == 0
    assert len(list((tmp_path / "plots").rglob("*.png"))) == 3
    assert "rates.png" in capsys.readouterr().out
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "p2")]) == 1
    assert "no runs directory" in capsys.readouterr().err


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    make_run(tmp_path, "van0")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ResultsError, match=r"pip install -e '\.\[plot\]'"):
        make_plots(tmp_path, tmp_path / "plots")
    assert main([str(tmp_path), "--out", str(tmp_path / "plots")]) == 1
    assert "pip install -e '.[plot]'" in capsys.readouterr().err
    assert "Legend" in build_report(tmp_path)  # the tables never need it


def test_each_arm_is_a_trailing_mean_over_its_faint_curve_with_the_early_window_shaded(tmp_path, matplotlib):
    make_run(tmp_path, "van0", steps=12, hack=[0] * 5 + [1] * 7)
    make_run(tmp_path, "van1", seed=1, steps=12, hack=[0] * 12)
    make_run(tmp_path, "ceiling0", steps=12, intervention="erase", pairs="live", live_labels="oracle", hack=0.1)
    (arms,) = group_questions(load_runs(tmp_path)).values()
    vanilla = {("none", "none"): arms[("none", "none")]}
    plt = plots._pyplot()
    assert early_span(vanilla[("none", "none")], None) == (1, 3)  # a quarter of 12 steps
    fig = _over_steps(plt, vanilla, {arm: "C0" for arm in vanilla}, {"hack_s": "hack"}, "title", "caption",
                      shaded=(1, 3))
    (ax,) = fig.axes
    faint, bold = ax.get_lines()
    # per step the two vanilla runs average to 0 for 5 steps, then 0.5; the trailing 10-step mean of that
    # starts at step 10 (five halves: 0.25) and adds a half each step
    assert list(faint.get_xdata()) == list(range(1, 13)) and list(faint.get_ydata()) == [0] * 5 + [0.5] * 7
    assert list(bold.get_xdata()) == [10, 11, 12] and list(bold.get_ydata()) == pytest.approx([0.25, 0.3, 0.35])
    assert bold.get_label() == "none" and bold.get_linewidth() > faint.get_linewidth() and faint.get_alpha() < 1
    (span,) = ax.patches
    assert (span.get_x(), span.get_x() + span.get_width()) == (1, 3)
    plt.close(fig)

    fig = _over_steps(plt, arms, {arm: "C0" for arm in arms}, {"hack_s": "hack"}, "title", "caption")
    assert sorted(fig.axes[0].get_legend_handles_labels()[1]) == ["erase:ceiling", "none"]
    assert not fig.axes[0].patches  # nothing shaded unless asked
    plt.close(fig)


def test_early_span_follows_early_steps_and_the_longest_run(tmp_path, monkeypatch, capsys, matplotlib):
    make_run(tmp_path / "runs", "van0", steps=12)
    make_run(tmp_path / "runs", "van1", seed=1, steps=20)
    runs = load_runs(tmp_path / "runs")
    assert early_span(runs, None) == (1, 5)  # the 20-step run's quarter is the longer window
    assert early_span(runs, 7) == (1, 7)

    shaded = []

    def spy(*args, **kwargs):
        shaded.append(kwargs.get("shaded"))
        return over_steps(*args, **kwargs)
    over_steps = plots._over_steps
    monkeypatch.setattr(plots, "_over_steps", spy)
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "plots"), "--early_steps", "7"]) == 0
    assert shaded == [(1, 7), None]  # the rates figure is shaded, the cin one not
    with pytest.raises(SystemExit):
        main([str(tmp_path / "runs"), "--out", str(tmp_path / "plots"), "--early_steps", "0"])
    assert "--early_steps: must be a whole number of steps >= 1" in capsys.readouterr().err


def test_an_arm_at_several_recalls_is_one_line_against_recall(tmp_path, matplotlib):
    missing = {"detector_fpr": 0.02, "pairs": "live"}
    make_run(tmp_path, "van", hack=0.6, detector_recall=0.4, **missing)  # reads no monitor: no line
    for name, intervention, control, extra in [("screen", "screen", "none", {}), ("erase", "erase", "none", {}),
                                               ("probe", "screen", "none", {"monitor": "probe"}),
                                               ("random", "erase", "random", {})]:
        make_run(tmp_path, name, intervention=intervention, control=control, pairs="live", **extra)
        for recall in (0.4, 0.7):
            modes = {"hack_s/run_tests": 1 - recall, "hack_s/exit_code": 0.5 - recall / 2}
            make_run(tmp_path, f"{name}-{recall}", intervention=intervention, control=control, detector_recall=recall,
                     fields=modes, **missing, **extra)
    make_run(tmp_path, "penalty", intervention="penalty")  # one recall only: no line
    ((_, arms),) = group_questions(load_runs(tmp_path)).items()
    lines = recall_lines(arms)
    assert sorted(lines) == [("erase", "none"), ("erase", "random"), ("screen", "none"), ("screen~probe", "none")]
    assert list(lines[("screen~probe", "none")]) == [(0.4, 0.02), (0.7, 0.02), (1.0, 0.0)]
    assert [run.name for run in lines[("erase", "random")][(0.7, 0.02)]] == ["random-0.7"]
    written = make_plots(tmp_path, tmp_path / "plots")
    assert sum(path.name == "recall.png" for path in written) == 1
