import sys

import pytest
from test_results import make_run

from projected_grpo.plots import main, make_plots, step_series
from projected_grpo.results import ResultsError, build_report, load_runs, plot_files


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
    for path in plot_files(tmp_path / "plots", question).values():
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
