"""Where a run's rows also go as it runs (--report_to): TensorBoard, Weights & Biases, or both.

    python -m projected_grpo.train smoke --report_to=tensorboard        # then: tensorboard --logdir out/runs
    WANDB_MODE=offline python -m projected_grpo.train smoke --report_to=wandb  # then: wandb sync <run dir>/wandb/*

Each backend is an optional extra (pip install -e '.[tensorboard]' / '.[wandb]'), imported here
and only here, when a run asks for it. A tracker gets every metrics row on the step axis, the
config once, the held-out evaluations (the rows' eval_* keys, and the final one), the summary at
the end, and the logged completions with their grades and hack score. Everything is written
under the run directory; with WANDB_MODE=offline, nothing touches the network.

Names follow what a TRL GRPOTrainer run shows beside this one (HF Trainer's loggers): an
eval_<x> key is sent as eval/<x>, every other key as train/<key>, where <key> is TRL's name
for a figure that means what TRL's means (TRL_NAMES) and the package's own name otherwise.
docs/experiments.md, "Watching runs as they go", has the table.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

from .config import Config, ConfigError, arm_name
from .files import write_atomically

BACKENDS = ("tensorboard", "wandb")  # each is the name of its extra and of the module it needs
# The package's figures that mean what TRL's GRPOTrainer logs, and TRL's names for them.
TRL_NAMES = {
    "reward": "reward",  # the mean reward of the student completions (TRL has no teacher rows)
    "kl": "kl",  # K3 KL to the reference, per completion token
    "completion_tokens": "completions/mean_length",
    "loss": "loss",
    "grad_norm": "grad_norm",  # before clipping, as TRL's
    "lr": "learning_rate",
    "frac_zero_spread": "frac_reward_zero_std",  # groups whose rewards were all equal
}
# The columns of TensorBoard's HParams table, beside each run's arm, control and seed.
HPARAMS_METRICS = ("train/hack_s", "train/gt_s", "eval/deployed_hack", "eval/deployed_solve")
# wandb makes each table an artifact too, which costs a smoke step a few per cent if sent every step
# (docs/performance.md), so a table holds the completions of every step since the last one, sent at most this often
# and at the end.
TABLE_SECONDS = 30


def backends(cfg: Config) -> tuple[str, ...]:
    """The trackers --report_to names (none: no tracker)."""
    return () if cfg.report_to == "none" else tuple(cfg.report_to.split(","))


def check(cfg: Config) -> None:
    """--report_to names known trackers whose extras are installed; checked before anything heavy."""
    names = backends(cfg)
    if any(name not in BACKENDS for name in names) or len(set(names)) != len(names):
        raise ConfigError(f"--report_to: {cfg.report_to!r} is not none or a comma list of {', '.join(BACKENDS)}")
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"--report_to={name}: {name} is not installed; pip install -e '.[{name}]'")


def tracker_name(key: str) -> str:
    """A metrics row's key as the trackers show it (HF Trainer's rule, with TRL's names)."""
    if key.startswith("eval_"):
        return "eval/" + key.removeprefix("eval_")
    return "train/" + TRL_NAMES.get(key, key)


def scalars(row: dict) -> dict[str, float]:
    """The row's figures under their tracker names; a figure that is null this step (an AUROC without
    hacks) is left out, not sent as a gap."""
    return {tracker_name(k): v for k, v in row.items() if k != "step" and isinstance(v, int | float)}


def labels(cfg: Config) -> dict[str, str | int]:
    """What the web UIs group and filter runs by."""
    return {"arm": arm_name(cfg.intervention, cfg.control), "control": cfg.control, "seed": cfg.seed}


def sweep_name(run_dir: Path) -> str | None:
    """The sweep a run belongs to: the directory holding it and the sweep's sweep.json (None outside
    a sweep, where wandb takes WANDB_RUN_GROUP, if set)."""
    return run_dir.parent.name if (run_dir.parent / "sweep.json").exists() else None


def _code_block(text: str) -> str:
    """Markdown that shows `text` as it is: indented, so a completion's own ``` fences stay literal."""
    return "\n".join("    " + line for line in text.splitlines())


def completions_markdown(completions: list[dict]) -> str:
    """The step's logged completions, each under a line of its grades and hack score."""
    blocks = []
    for c in completions:
        grades = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items()
                           if k not in ("step", "completion"))
        blocks.append(f"{grades}\n\n{_code_block(c['completion'])}")
    return "\n\n---\n\n".join(blocks)


class TensorBoard:
    """Event files in the run directory itself, so `tensorboard --logdir` names the run as its directory
    (and a sweep's directory groups its runs)."""

    def __init__(self, cfg: Config, run_dir: Path, config: dict, first_step: int):
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # A resumed run's steps replace whatever a crash left from first_step on: TensorBoard hides those.
        self.writer = SummaryWriter(str(run_dir), purge_step=first_step)
        if first_step == 1:
            self.writer.add_text("config", _code_block(json.dumps(config, indent=2)), 0)
            for proto in hparams(labels(cfg), dict.fromkeys(HPARAMS_METRICS, 0.0)):
                self.writer.file_writer.add_summary(proto)
        self.summary_proto = Summary

    def log(self, step: int, figures: dict[str, float], completions: list[dict]) -> None:
        # One event holding every figure: an add_scalar call per figure takes four times as long.
        values = [self.summary_proto.Value(tag=tag, simple_value=value) for tag, value in figures.items()]
        self.writer.file_writer.add_summary(self.summary_proto(value=values), step)
        if completions:
            self.writer.add_text("completions", completions_markdown(completions), step)
        self.writer.flush()  # tensorboard shows each step as it ends, not two minutes later

    def close(self, summary: dict | None, step: int) -> None:
        if summary is not None:
            self.writer.add_text("summary", _code_block(json.dumps(summary, indent=2)), step)
        self.writer.close()


class WandB:
    """A wandb run in <run_dir>/wandb/, its id kept in <run_dir>/wandb_id so a resumed run continues it."""

    def __init__(self, cfg: Config, run_dir: Path, config: dict, first_step: int):
        import wandb

        id_path = run_dir / "wandb_id"
        run_id = id_path.read_text().strip() if id_path.exists() else None  # None: wandb makes one
        # wandb stages a table's files under WANDB_DATA_DIR (the home directory by default) and `wandb sync`
        # uploads them from there: in the run directory, that directory alone is what a sync needs.
        self.own_data_dir = "WANDB_DATA_DIR" not in os.environ
        if self.own_data_dir:
            os.environ["WANDB_DATA_DIR"] = str(run_dir / "wandb")
        # The run's output already goes to its terminal or its sweep log: console="off" leaves it unwrapped.
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "projected_grpo"), dir=run_dir, id=run_id,
                              resume="allow", name=cfg.run_name, group=sweep_name(run_dir),
                              tags=[f"{k}={v}" for k, v in labels(cfg).items()],
                              config=config if first_step == 1 else None, settings=wandb.Settings(console="off"))
        write_atomically(id_path, self.run.id + "\n")
        # TRL's runs plot against train/global_step; so do these, so both share a chart's x axis.
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step")
        self.wandb = wandb
        self.unsent, self.table_sent = [], time.monotonic()

    def log(self, step: int, figures: dict[str, float], completions: list[dict]) -> None:
        self.unsent += completions
        record = {**figures, "train/global_step": step}
        if self.unsent and time.monotonic() - self.table_sent >= TABLE_SECONDS:
            record["completions"] = self._table()
        self.run.log(record, step=step)

    def _table(self):
        table = self.wandb.Table(columns=list(self.unsent[0]), data=[list(c.values()) for c in self.unsent])
        self.unsent, self.table_sent = [], time.monotonic()
        return table

    def close(self, summary: dict | None, step: int) -> None:
        if self.unsent:
            self.run.log({"completions": self._table(), "train/global_step": step}, step=step)
        if summary is not None:
            self.run.summary.update(summary)
        self.run.finish(exit_code=0 if summary is not None else 1)
        if self.own_data_dir:
            os.environ.pop("WANDB_DATA_DIR")


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB}


class Report:
    """The run's trackers, for the steps from `first_step` on (a resumed run sends nothing before it).
    A context: leaving it without `end` (an error, a Ctrl-C) closes them, the wandb run marked failed."""

    def __init__(self, cfg: Config, run_dir: Path, first_step: int):
        config = json.loads((run_dir / "config.json").read_text()) if backends(cfg) else {}
        self.trackers = [TRACKERS[name](cfg, run_dir, config, first_step) for name in backends(cfg)]
        self.summary, self.last_step = None, first_step - 1

    def step(self, row: dict, completions: list[dict]) -> None:
        """One metrics row (with its eval_* keys when it evaluated) and the step's logged completions."""
        self.last_step, figures = row["step"], scalars(row)
        for tracker in self.trackers:
            tracker.log(row["step"], figures, completions)

    def end(self, step: int, evaluation: dict, summary: dict) -> None:
        """The final evaluation (evaluate.metrics_row) at the last step, and summary.json's content."""
        self.last_step, self.summary = step, summary
        for tracker in self.trackers:
            tracker.log(step, scalars(evaluation), [])

    def __enter__(self) -> Report:
        return self

    def __exit__(self, *exc) -> None:
        for tracker in self.trackers:
            tracker.close(self.summary, self.last_step)
