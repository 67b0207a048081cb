"""--report_to: what TensorBoard and wandb are sent, read back offline from what each wrote in the run directory."""

import importlib.util
import json
import os
import shutil
import struct

import pytest
from conftest import module_workdir

from projected_grpo import distributed, reporting, sweep, train
from projected_grpo.config import ConfigError, make_config

# The tests that train need both extras (skipped without them); the checks and the names need neither.
needs_extras = pytest.mark.skipif(not all(importlib.util.find_spec(name) for name in reporting.BACKENDS),
                                  reason="pip install -e '.[tensorboard,wandb]'")
SMALL = {"steps": "3", "max_new": "16", "basis_k": "4", "checkpoint_every": "2", "threads": "1",
         "report_to": "tensorboard,wandb"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    # wandb stays offline, and its own debug logs go here rather than to the home directory
    with module_workdir(tmp_path_factory, "reporting", WANDB_MODE="offline", WANDB_CACHE_DIR="{path}/wandb-cache",
                        WANDB_CONFIG_DIR="{path}/wandb-config") as path:
        yield path


def _cfg(**overrides):
    return make_config("smoke", {**SMALL, **{k: str(v) for k, v in overrides.items()}})


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _events(run_dir):
    """TensorBoard's own reader over the run directory's event files."""
    from tensorboard.backend.event_processing import event_accumulator as accumulator

    events = accumulator.EventAccumulator(str(run_dir), size_guidance={accumulator.SCALARS: 0,
                                                                      accumulator.TENSORS: 0})
    events.Reload()
    return events


def _texts(events, tag):
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(f"{tag}/text_summary")]


def _unindent(block):
    return "\n".join(line.removeprefix("    ") for line in block.splitlines())


def _wandb_records(offline_run_dir):
    """The records of a wandb offline run's transaction log (what `wandb sync` uploads): a 7-byte file
    header, then LevelDB-style 32 KiB blocks of chunks (crc, length, type: full 1, first 2, middle 3, last 4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    [path] = offline_run_dir.glob("*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield pb.Record.FromString(chunks)
            chunks = b""


def _wandb_run(offline_run_dir):
    """(run record, config sent, summary as wandb holds it at the end, history rows) of one offline run."""
    run, config, summary, history = None, {}, {}, []
    for record in _wandb_records(offline_run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
    config.pop("_wandb", None)
    return run, config, summary, history


# ----------------------------------------------------------------------------- the names and their checks


def test_report_to_is_checked_before_anything_heavy(workdir, monkeypatch, capsys):
    for value in ("mlflow", "wandb,wandb", "none,wandb", ""):
        with pytest.raises(ConfigError, match=r"--report_to: .* is not none or a comma list of tensorboard, wandb"):
            reporting.check(_cfg(report_to=value))
    # tensorboard installed, wandb not
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "tensorboard" else None)
    with pytest.raises(ConfigError, match=r"--report_to=wandb: wandb is not installed; pip install -e '\.\[wandb\]'"):
        reporting.check(_cfg(report_to="tensorboard,wandb"))
    reporting.check(_cfg(report_to="tensorboard"))
    monkeypatch.undo()
    for main, argv in ((train.main, ["smoke", "--report_to=mlflow", "--run_name=refused"]),
                       (sweep.main, ["smoke", "--arms", "none", "--seeds", "1", "--name", "refused",
                                     "--report_to=mlflow"])):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and "--report_to" in err[0], err
    assert not (workdir / "out" / "runs" / "refused").exists() and not (workdir / "out" / "sweeps" / "refused").exists()


def test_names_are_trls_where_the_figure_means_what_trls_does():
    row = {"step": 4, "reward": 0.5, "kl": 0.1, "completion_tokens": 12.0, "lr": 1e-3, "grad_norm": 2.0, "loss": 0.3,
           "frac_zero_spread": 0.25, "hack_s": 0.2, "hack_s/sentinel": 1.0, "hack_auroc": None,
           "eval_deployed_hack": 0.1, "eval_kept_solve_neutral": 0.4}
    assert reporting.scalars(row) == {
        "train/reward": 0.5, "train/kl": 0.1, "train/completions/mean_length": 12.0, "train/learning_rate": 1e-3,
        "train/grad_norm": 2.0, "train/loss": 0.3, "train/frac_reward_zero_std": 0.25, "train/hack_s": 0.2,
        "train/hack_s/sentinel": 1.0, "eval/deployed_hack": 0.1, "eval/kept_solve_neutral": 0.4}


# ----------------------------------------------------------------------------- runs, read back


@needs_extras
def test_a_run_reports_every_row_config_evaluation_completions_and_summary(workdir):
    # A run in a sweep's directory (beside its sweep.json): its wandb group is the sweep's name.
    (workdir / "out" / "sweeps" / "watch").mkdir(parents=True)
    (workdir / "out" / "sweeps" / "watch" / "sweep.json").write_text("{}")
    cfg = _cfg(intervention="erase", control="random", seed=2, eval_every=2, run_name="watched",
               out_dir="out/sweeps/watch", hack_score_every=1)
    train.run(cfg)
    run_dir = workdir / "out" / "sweeps" / "watch" / "watched"
    summary = json.loads((run_dir / "summary.json").read_text())
    rows, completions = _jsonl(run_dir / "metrics.jsonl"), _jsonl(run_dir / "completions.jsonl")
    config = json.loads((run_dir / "config.json").read_text())
    final = summary["eval"]
    assert "eval_deployed_hack" in rows[1] and len(completions) == 3 * cfg.log_completions

    # TensorBoard: one point per row per figure (a null is no point), at the row's step; each evaluation
    # where it happened and the final one at the last step.
    events = _events(run_dir)
    tags = set(events.Tags()["scalars"])
    for key in {k for row in rows for k in row} - {"step"}:
        sent = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
        if key in final:
            sent.append((cfg.steps, final[key]))
        points = events.Scalars(reporting.tracker_name(key)) if sent else []
        assert [p.step for p in points] == [s for s, _ in sent], key
        assert [p.value for p in points] == pytest.approx([v for _, v in sent], rel=1e-6, abs=1e-12), key
    assert tags == {reporting.tracker_name(k) for row in rows for k, v in row.items() if k != "step" and v is not None}
    assert [(s, json.loads(_unindent(text))) for s, text in _texts(events, "config")] == [(0, config)]
    assert [(s, json.loads(_unindent(text))) for s, text in _texts(events, "summary")] == [(cfg.steps, summary)]
    logged = _texts(events, "completions")
    assert [s for s, _ in logged] == [1, 2, 3]
    for s, text in logged:
        shown = [c for c in completions if c["step"] == s]
        assert text.count("hack_score") == len(shown) and f"hack_score {shown[0]['hack_score']:.3g}" in text
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    start = HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert {k: v.string_value or v.number_value for k, v in start.hparams.items()} == \
        {"arm": "erase:random", "control": "random", "seed": 2}

    # wandb: one offline run, named as the directory, tagged, grouped by the sweep; the config once,
    # every row on the step axis with its completions table, the summary equal to summary.json's.
    [offline] = (run_dir / "wandb").glob("offline-run-*")
    run, sent_config, wandb_summary, history = _wandb_run(offline)
    assert run.run_id == (run_dir / "wandb_id").read_text().strip() and offline.name.endswith(run.run_id)
    assert (run.display_name, run.run_group, list(run.tags)) == \
        ("watched", "watch", ["arm=erase:random", "control=random", "seed=2"])
    assert sent_config == config
    assert {k: wandb_summary[k] for k in summary} == summary
    assert [h["train/global_step"] for h in history] == [1, 2, 3] == [h["_step"] for h in history]
    for row, sent in zip(rows, history):
        assert {k: sent[k] for k in reporting.scalars(row)} == pytest.approx(reporting.scalars(row))
    # The completions tables (at most one each TABLE_SECONDS, and the rest at the end) hold every logged one.
    tables = [h for h in history if "completions/_type" in h]
    assert {h["completions/_type"] for h in tables} == {"table-file"}
    assert sum(h["completions/nrows"] for h in tables) == len(completions)
    assert {reporting.tracker_name(k): history[-1][reporting.tracker_name(k)] for k in final} == \
        {reporting.tracker_name(k): v for k, v in final.items()}
    # Everything `wandb sync` needs lies in the run directory, the staged tables too.
    staged = [entry.local_path for record in _wandb_records(offline) if record.WhichOneof("record_type") == "artifact"
              for entry in record.artifact.manifest.contents]
    assert staged and all(path.startswith(str(run_dir)) for path in staged)
    assert "WANDB_DATA_DIR" not in os.environ  # set for the run only


@needs_extras
def test_a_resumed_run_continues_the_same_tracked_runs_without_a_step_twice(workdir):
    interrupted = _cfg(steps=4, run_name="resumed")
    interrupted.steps = 3  # stops after step 3, then loses that step's checkpoint, as a crash just before it would
    train.run(interrupted)
    run_dir = workdir / "out" / "runs" / "resumed"
    shutil.rmtree(run_dir / "checkpoints" / "step_000003")
    first_attempt = _jsonl(run_dir / "metrics.jsonl")
    train.run(_cfg(steps=4, run_name="resumed", resume="true"))
    rows = _jsonl(run_dir / "metrics.jsonl")
    assert rows[2]["step_seconds"] != first_attempt[2]["step_seconds"]  # step 3 was taken again

    events = _events(run_dir)
    for key in ("reward", "step_seconds", "cin_s"):
        points = events.Scalars(reporting.tracker_name(key))
        assert [(p.step, p.value) for p in points] == [(r["step"], pytest.approx(r[key])) for r in rows], key
    assert len(_texts(events, "config")) == 1

    first, second = sorted((run_dir / "wandb").glob("offline-run-*"))
    (run, config, _, history), (again, config_again, _, history_again) = _wandb_run(first), _wandb_run(second)
    assert again.run_id == run.run_id and config and not config_again
    # Nothing before the checkpoint is sent again. Step 3, which the crash left after it, is sent again as
    # it was taken again: TensorBoard's purge hides the first copy; online, wandb keeps the first copy.
    assert [h["_step"] for h in history] == [1, 2, 3] and [h["_step"] for h in history_again] == [3, 4]


@needs_extras
def test_only_rank_0_reports(workdir, monkeypatch):
    # One process as rank 1 of a world of one: it takes every prompt group itself and writes nothing,
    # and a Report it opened would fail at once on the config.json only rank 0 writes.
    monkeypatch.setattr(distributed, "init", lambda cfg: distributed.World(rank=1))
    monkeypatch.setattr(distributed, "share", lambda world, items: items)
    assert train.run(_cfg(steps=2, run_name="rank1")) == {}
    assert not (workdir / "out" / "runs" / "rank1").exists()
