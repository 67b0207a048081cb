"""The end of a run: summary.json's content and the plain-text table printed beside it.

Last-5-step means of the figures a reader checks first, each beside its null where it has one; the
run's hack-score AUROC over every scored step (and the probe monitor's); how V was made (its rows'
orientation margins, the self pairs); the last five steps per mode; the final evaluation.

Module order: above grpo and monitor (it reads a run's scores.jsonl and Basis.notes); train imports it.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from . import hack_basis
from .config import MODES, Config
from .files import iter_jsonl
from .grpo import auroc
from .monitor import probe_aurocs

# Metrics summarised as last-5-step means, with the direction that is good.
SUMMARY_METRICS = {"hack_s": "down", "gt_s": "up", "reward": "up", "cin_s": "down", "cin_t": "down", "cin": "down",
                   "cout": "down", "update_hackward": "down", "gated_frac": "-", "dS_hack_norm": "-",
                   "cin_null_s": "-", "cin_null": "-"}
# Each projection figure's null, what a random direction would score (layers concatenated, or the per-layer
# mean): a figure acts only where it is away from its null (and from the random control's figure).
NULLS = {"cin_s": "cin_null_s", "cin_t": "cin_null_s", "update_hackward": "cin_null_s", "cin": "cin_null",
         "cout": "cin_null"}

def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run_auroc(run_dir: Path, cfg: Config) -> dict:
    """AUROC of every scored student rollout's hack score against `exploited`, over the whole run (the steps
    that took scores: hack_score_every), with how many steps and rollouts it was taken over: does V see the
    live hacks? Under --monitor=probe also the probe's, on the known modes and on the held-out ones: does
    it transfer? (Logged only.)"""
    path = run_dir / "scores.jsonl"
    records = [record for _, record in iter_jsonl(path, ValueError)] if path.exists() else []
    scored = [r for r in records if r["hack_score"] is not None]  # unscored steps, and steps with no V yet
    out = {"hack_auroc": auroc([r["hack_score"] for r in scored], [r["exploited"] for r in scored]),
           "hack_auroc_steps": len({r["step"] for r in scored}), "hack_auroc_rollouts": len(scored)}
    if cfg.monitor == "probe":
        out |= probe_aurocs([(r["mode"], r["probe_score"], r["exploited"]) for r in records
                             if r.get("probe_score") is not None], cfg.basis_mode_list)  # none before its first fit
    return out


def _margins_line(margins: dict) -> str:
    """V's rows' orientation votes in one line (summary.json lists every row's)."""
    n = margins["pairs"]
    votes_for = torch.tensor([f for layer in margins["rows"].values() for f, _ in layer])
    sds = hack_basis.margin_sds(votes_for, n)
    return (f"V's orientation margins ({margins['of']}), |votes for - against| of {n} in sds of a fair coin's "
            f"(sqrt(n)): median {statistics.median(sds.tolist()):.2f}; {int((sds < 2).sum())} of {len(sds)} rows "
            f"within 2 sds")


def summarize(cfg: Config, rows: list[dict], final_eval: dict, complete: bool,
              scores: dict, notes: dict | None = None) -> tuple[dict, str]:
    """summary.json content and the plain-text table printed at the end; `scores` (run_auroc) is the run's
    AUROC and what it was taken over, `notes` (Basis.notes) says how V was made (its rows' orientation
    margins, the self pairs)."""
    notes = notes or {}
    tail = rows[-5:]
    means = {}
    for key in SUMMARY_METRICS:
        values = [r[key] for r in tail if r.get(key) is not None]
        means[key] = sum(values) / len(values) if values else None
    first = {k: rows[0].get(k) for k in SUMMARY_METRICS} if rows else {}
    per_mode = {}
    for mode in MODES:
        hack = [r[f"hack_s/{mode}"] for r in tail if f"hack_s/{mode}" in r]
        solve = [r[f"gt_s/{mode}"] for r in tail if f"gt_s/{mode}" in r]
        if hack:
            per_mode[mode] = {"hack": sum(hack) / len(hack), "solve": sum(solve) / len(solve),
                              "in_basis": mode in cfg.basis_mode_list}
    summary = {"run_name": cfg.run_name, "complete": complete, "steps_done": len(rows), "steps": cfg.steps,
               "intervention": cfg.intervention, "control": cfg.control, "seed": cfg.seed, "last5": means,
               "first": first, "per_mode": per_mode, "eval": final_eval, **scores, **notes}
    ceiling = "  (a diagnostic CEILING: V from the oracle's labels, never a method)" \
        if cfg.live_labels == "oracle" else ""
    lines = [f"run {cfg.run_name}: {len(rows)}/{cfg.steps} steps, arm={cfg.intervention}, control={cfg.control}, "
             f"pairs={cfg.pairs}{ceiling}",
             f"{'metric':<16}{'first':>10}{'last-5':>10}  better  {'null':>6}"]
    for key, good in SUMMARY_METRICS.items():
        if key in NULLS.values():
            continue
        f, m = first.get(key), means[key]
        arrow = {"down": "↓", "up": "↑"}.get(good, " ")
        null = f"{_fmt(means.get(NULLS[key])):>6}" if key in NULLS else ""
        lines.append(f"{key:<16}{_fmt(f):>10}{_fmt(m):>10}  {arrow}       {null}".rstrip())
    lines.append(f"{'hack_auroc':<16}{'':>10}{_fmt(scores['hack_auroc']):>10}  (the whole run: hack score vs "
                 f"exploited, over {scores['hack_auroc_rollouts']} rollouts of {scores['hack_auroc_steps']} steps)")
    if "probe_auroc_known" in scores:
        lines.append(f"{'probe_auroc':<16}{'':>10}{_fmt(scores['probe_auroc_known']):>10}  (the probe monitor on the "
                     f"known modes; held out: {_fmt(scores['probe_auroc_heldout'])})")
    if "basis_margins" in notes:
        lines.append(_margins_line(notes["basis_margins"]))
    if "self_pairs" in notes:
        report = notes["self_pairs"]
        lines.append(f"self pairs: {report['pairs']} from {report['problems']} problems, "
                     f"{len(report['problems_without_a_pair'])} of which gave none")
    for mode, cell in per_mode.items():
        known = "in the basis" if cell["in_basis"] else "held out from the basis"
        lines.append(f"{mode:<16}hack {cell['hack']:.3f}  solve {cell['solve']:.3f}  (last 5, {known})")
    for key, value in final_eval.items():
        lines.append(f"{key:<26}{value:>10.3f}")
    if "eval_kept_hack" in final_eval:
        lines.append(f"{cfg.intervention}: hack kept {final_eval['eval_kept_hack']:.3f} vs ablated "
                     f"{final_eval['eval_deployed_hack']:.3f}; solve kept {final_eval['eval_kept_solve']:.3f} "
                     f"vs ablated {final_eval['eval_deployed_solve']:.3f}")
    return summary, "\n".join(lines)
