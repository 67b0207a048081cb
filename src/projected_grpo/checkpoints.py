"""Checkpoints: save, load, find the latest, and the one directory layout they live in.

A run's checkpoints are RUN_DIR/checkpoints/step_NNNNNN/, each holding knobs.safetensors
(delta_s and delta_s_hack per layer) and state.pt (optimizer, scheduler, RNG, the basis,
the smoothed gate's memory ḡ and the metrics rows up to that step). A directory ending in
`.tmp` is a write in progress and one ending in `.old` the copy it replaces: neither is a
checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import shutil
from pathlib import Path

import torch

from . import adapter
from .config import Config, ConfigError
from .files import read_json


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def step_of(checkpoint: Path) -> int:
    """The step a checkpoint directory holds the state after."""
    return int(checkpoint.name.split("_")[1])


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """A run directory's complete checkpoints, oldest first."""
    return sorted(p for p in (Path(run_dir) / "checkpoints").glob("step_*") if p.name[-4:] not in (".tmp", ".old"))


def latest(run_dir: str | Path) -> Path | None:
    done = checkpoint_dirs(run_dir)
    return done[-1] if done else None


def _rng_state() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def training_state(wrappers, optimizer, scheduler, basis_state: dict, probe_state: dict | None = None) -> dict:
    """A copy of everything a checkpoint holds, taken now: knobs, optimizer, scheduler, RNG, and V's
    (basis.Basis.state: V, the smoothed gate's memory ḡ, the live buffer V is rebuilt from, the notes
    the summary gives of V) and the probe monitor's (monitor.Probe.state; None without one). Knobs and
    their Adam moments are small (r per layer), so taking one before every step is cheap."""
    return {"knobs": adapter.knob_state(wrappers), "optimizer": copy.deepcopy(optimizer.state_dict()),
            "scheduler": copy.deepcopy(scheduler.state_dict()), "rng": _rng_state(), **basis_state,
            "probe": probe_state}


def save(run_dir: Path, step: int, state: dict, rows: list[dict]) -> Path:
    """A `training_state` and the metrics rows up to `step`, written to a temp dir and swapped in;
    an older checkpoint of the same step survives until the new one is complete."""
    final = checkpoint_dir(run_dir, step)
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cpu_rng, cuda_rng = state["rng"]
    adapter.save_tensors(state["knobs"], tmp / "knobs.safetensors")
    torch.save({"step": step, "optimizer": state["optimizer"], "scheduler": state["scheduler"],
                "torch_rng": cpu_rng, "cuda_rng": cuda_rng, "basis": state["basis"], "grad_mean": state["grad_mean"],
                "live": state["live"], "notes": state["notes"], "probe": state["probe"],
                "rows": [r for r in rows if r["step"] <= step]}, tmp / "state.pt")
    for path in tmp.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load(checkpoint: Path, wrappers, optimizer, scheduler) -> dict:
    """Knobs, optimizer, scheduler and the RNG from a checkpoint; returns its state (step, rows, basis,
    grad_mean, live, notes)."""
    try:
        adapter.load_knobs(wrappers, checkpoint / "knobs.safetensors")
        state = torch.load(checkpoint / "state.pt", weights_only=False, map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    except (OSError, EOFError, KeyError, TypeError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
        raise ConfigError(f"--resume: checkpoint {checkpoint} cannot be loaded ({e}); delete it to resume from "
                          f"the one before, or start the run again") from None
    if "grad_mean" not in state:
        if state.get("trend"):
            # Its smoothed gate kept its memory in V's coordinates, cleared at each refresh: another method.
            raise ConfigError(f"--resume: checkpoint {checkpoint} was written before the smoothed gate kept its "
                              f"memory in knob space (it has a trend, no grad_mean); finish the run with the version "
                              f"that started it, or start it again")
        state["grad_mean"] = {}  # an older checkpoint whose gate remembered nothing loses nothing
    state.setdefault("probe", None)  # older checkpoints: no probe monitor existed
    return state


# What a resumed run may change: how long it runs and where it writes.
RESUMABLE_CHANGES = {"steps", "resume", "out_dir"}


def check_resume_config(run_dir: Path, config: dict) -> None:
    """A resumed run's config (as config.json would record it) against the one it started with: only
    RESUMABLE_CHANGES may differ, anything else is an error naming each field."""
    stored = read_json(run_dir / "config.json", ConfigError, "start the run again under another --run_name")
    # A field added since the run started is absent from its config.json: it ran with the default.
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    differ = {k: (stored.get(k, defaults.get(k)), v) for k, v in config.items()
              if k not in RESUMABLE_CHANGES and stored.get(k, defaults.get(k)) != v}
    if differ:
        fields = "; ".join(f"--{k}: run has {old!r}, asked {new!r}" for k, (old, new) in differ.items())
        raise ConfigError(f"--resume: {run_dir} was started with a different config ({fields}); resume with the "
                          f"same settings (only {', '.join(sorted(RESUMABLE_CHANGES))} may change)")
