"""Every intervention a run can take, each declared once with the hooks the run calls.

An intervention (an arm) is what a run does about hacking. A step calls its hooks at the
five points where an arm can act (docs/design.md, "One step"):

    messages(problem, cfg, training, hint)  the prompt a student sees, in training and at evaluation
    advantages(rollouts, cfg)               rewards and advantages, after grading
    gradient(run)                           the knob gradient, after backward (before clip and step)
    update(run, before)                     the knobs, after the optimizer step
    quarantine                              deployment ablates delta_s_hack; evaluation also samples it kept

Every default leaves the step plain GRPO with the projection measured only (cin, cout). The
loop looks an arm up in REGISTRY and calls it; it never compares names. Adding an arm is one
subclass here passed to `register`, its tests and a line in docs/experiments.md.

Controls (random, shuffled, nonhack, capacity) are a property of the basis, not an arm: they
replace V for an arm that uses it and are written `arm:control` (config.arm_name).

Arms compose: `screen+erase` is one run with screen's advantages and erase's gradient and update.
Each hook is the one part's that replaces it (the default where none does), so two parts that both
replace the same hook (erase+trusted: both rewrite the gradient) cannot compose.
"""

from __future__ import annotations

from . import projection
from .config import Config, ConfigError, parse_arm, split_gate, split_monitor
from .grpo import Rollout, flagged, group_advantages, monitor_score
from .problems import Problem

HOOKS = ("messages", "advantages", "gradient", "update")  # in the order a step calls them


class Intervention:
    name = ""
    uses_basis = False  # V shapes the update: a control basis in its place is another experiment (arm:control)
    reads_monitor = False  # its advantages read the monitor (grpo.flagged, monitor_score): another monitor, another arm
    quarantine = False  # trains delta_s_hack, which deployment ablates: evaluation samples it kept as well
    trusted_subspace = False  # keeps the gradient inside the clean completions' subspace (assembly builds it)

    def messages(self, problem: Problem, cfg: Config, training: bool, hint: bool = True) -> list[dict]:
        """The chat a student is prompted with: in training (hint always on) or at evaluation."""
        return problem.messages(hint=hint)

    def advantages(self, rollouts: list[Rollout], cfg: Config) -> int:
        """Set every rollout's advantage (Dr.GRPO by default); returns the zero-spread group count."""
        return group_advantages(rollouts, cfg.group)

    def gradient(self, run) -> dict:
        """Act on the knob gradients (delta_s.grad) of `run` (an assembly.Run) and return the
        projection's aggregates (cin, cout, fired, cin_null, layers). By default only measured."""
        return _project_all(run)

    def update(self, run, before: dict) -> None:
        """Act on the knobs after the optimizer step; `before` holds each delta_s before it."""


def replaced_hooks(arm: Intervention) -> list[str]:
    """The hooks an arm's class replaces (the rest are Intervention's defaults)."""
    return [hook for hook in HOOKS if getattr(type(arm), hook) is not getattr(Intervention, hook)]


class Composite(Intervention):
    """Registered arms in one run (`screen+erase`): each hook is its part's that replaces it, the
    default where none does; a flag is set when any part sets it."""

    def __init__(self, parts: list[Intervention]):
        self.name = "+".join(part.name for part in parts)
        self.uses_basis = any(part.uses_basis for part in parts)
        self.reads_monitor = any(part.reads_monitor for part in parts)
        self.quarantine = any(part.quarantine for part in parts)
        self.trusted_subspace = any(part.trusted_subspace for part in parts)
        owners: dict[str, Intervention] = {}
        for part in parts:
            for hook in replaced_hooks(part):
                if hook in owners:
                    raise ConfigError(f"--intervention: {self.name} cannot compose: {owners[hook].name} and "
                                      f"{part.name} both replace the {hook} hook")
                owners[hook] = part
                setattr(self, hook, getattr(part, hook))


REGISTRY: dict[str, Intervention] = {}


def register(intervention: Intervention) -> Intervention:
    if not intervention.name or any(c in intervention.name for c in ":+@"):
        raise ValueError(f"an intervention needs a name without ':', '+' or '@' (they separate a control, the parts "
                         f"of a composite and a gate), got {intervention.name!r}")
    REGISTRY[intervention.name] = intervention
    return intervention


def get(name: str) -> Intervention:
    """A registered arm, or a composite of registered arms (`screen+erase`)."""
    names = name.split("+")
    for part in names:
        if part not in REGISTRY:
            joined = f"; {name!r} joins them with '+'" if len(names) > 1 else ""
            raise ConfigError(f"--intervention: {part!r} is not one of {', '.join(REGISTRY)} (the registered "
                              f"interventions{joined})")
    if len(names) == 1:
        return REGISTRY[name]
    if len(set(names)) < len(names):
        raise ConfigError(f"--intervention: {name!r} names an arm twice")
    return Composite([REGISTRY[n] for n in names])


def parse(text: str) -> tuple[str, str]:
    """An arm's text (`intervention[@gate][~monitor][:control]`) checked against the registry and config's
    controls, gates and monitors; a composite's parts must compose. A monitor names an arm that reads it: one
    whose advantages read the monitor, or (recall and false positives only) one whose V may be built from
    the detector's flags."""
    intervention, control = parse_arm(text)
    gated, monitor = split_monitor(intervention)
    name, gate = split_gate(gated)
    for part in name.split("+"):
        if part not in REGISTRY:
            raise ConfigError(f"unknown intervention {part!r} in arm {text!r}; registered: {', '.join(REGISTRY)}")
    arm = get(name)
    if not arm.uses_basis and gate:
        raise ConfigError(f"arm {text!r}: {name} does not train with V, so a gate would change only its logging")
    if monitor and not arm.reads_monitor and ("monitor" in monitor or not arm.uses_basis):
        raise ConfigError(f"arm {text!r}: {name} reads no monitor"
                          + (" (its V reads the detector's flags, not the probe)" if arm.uses_basis else ""))
    return intervention, control


def check(cfg: Config) -> Intervention:
    """The rules that tie a config to its intervention, checked before anything heavy; returns it."""
    arm = get(cfg.intervention)
    if cfg.control == "capacity" and not arm.quarantine:
        raise ConfigError(f"--control: capacity controls the quarantine, which {cfg.intervention} does not have "
                          f"(those with one: {', '.join(n for n, a in REGISTRY.items() if a.quarantine)})")
    if cfg.control != "none" and not arm.uses_basis:
        raise ConfigError(f"--control: {cfg.intervention} does not use the hack basis to train, so a control basis "
                          f"would change only its logging")
    if arm.trusted_subspace and not cfg.trusted_from and (cfg.pairs == "live" or cfg.pair_contrast != "clean"):
        raise ConfigError(f"--pairs: {cfg.intervention} keeps the subspace of the pairs' clean completions; "
                          f"--pairs={cfg.pairs} --pair_contrast={cfg.pair_contrast} has none (give --trusted_from)")
    return arm


def _project_all(run, erase: bool = False, route: bool = False) -> dict:
    cfg = run.cfg
    return projection.project_all(run.wrappers, run.basis.V, erase=erase, route=route, gate=cfg.gate,
                                  overshoot=cfg.overshoot, preserve_magnitude=cfg.preserve_magnitude,
                                  quarantine=run.basis.quarantine, grad_mean=run.basis.grad_mean,
                                  gate_beta=cfg.gate_beta)


# ----------------------------------------------------------------------------- the arms


class Vanilla(Intervention):
    """Plain GRPO; the projection is measured, the gradient untouched."""
    name = "none"


class Erase(Intervention):
    """delta_s.grad = g - gate(V g) V: the hack-ward part of each gradient is dropped."""
    name = "erase"
    uses_basis = True
    route = False

    def gradient(self, run) -> dict:
        stats = _project_all(run, erase=True, route=self.route)
        if run.cfg.adam_leak == "moments":  # clip scales the gradient, not the moments: either order
            projection.project_adam_moments(run.optimizer, run.wrappers, run.basis.V)
        return stats

    def update(self, run, before: dict) -> None:
        if run.cfg.adam_leak == "update":
            projection.project_update(before, run.wrappers, run.basis.V, run.cfg.gate, run.cfg.overshoot,
                                      run.basis.grad_mean)


class Route(Erase):
    """Erase, and feed what was removed to the quarantine knob delta_s_hack, zeroed at deployment."""
    name = "route"
    quarantine = True
    route = True


class Screen(Intervention):
    """The monitor (the weak detector of the known modes, or the probe) drops each flagged rollout:
    advantage 0, and out of its group's mean (it neither teaches nor shifts the others)."""
    name = "screen"
    reads_monitor = True

    def advantages(self, rollouts: list[Rollout], cfg: Config) -> int:
        dropped = [flagged(r, cfg) for r in rollouts]
        return group_advantages(rollouts, cfg.group, dropped=dropped)


class Penalty(Intervention):
    """A flagged rollout's reward becomes cfg.penalty_reward before the group mean (the logged reward
    stays the grader's)."""
    name = "penalty"
    reads_monitor = True

    def advantages(self, rollouts: list[Rollout], cfg: Config) -> int:
        rewards = [cfg.penalty_reward if flagged(r, cfg) else r.reward for r in rollouts]
        return group_advantages(rollouts, cfg.group, rewards)


class AdvMod(Intervention):
    """Advantage modification (Wu & Tang 2026): after Dr.GRPO's advantages, a rollout the monitor scores
    s in [0, 1] keeps max(0, 1 - advmod_alpha * s) of a positive advantage; negative ones are left as
    they are. It stays in its group's mean (unlike screen), and never raises an advantage. The monitor
    (grpo.monitor_score) is the weak detector (s = 1 flagged, 0 not: at alpha >= 1 a flagged rollout's
    reward teaches nothing, while it still lowers its group's other advantages by its share of the
    mean) or the probe (s its P(hack))."""
    name = "advmod"
    reads_monitor = True

    def advantages(self, rollouts: list[Rollout], cfg: Config) -> int:
        zero_spread = group_advantages(rollouts, cfg.group)
        for r in rollouts:
            if r.advantage > 0:
                r.advantage *= max(0.0, 1.0 - cfg.advmod_alpha * monitor_score(r, cfg))
        return zero_spread


class Trusted(Intervention):
    """Keep only the gradient inside a subspace of clean completions' gradients (T, w), the opposite
    of erase; cout is V's cin of what the optimizer will see."""
    name = "trusted"
    trusted_subspace = True

    def gradient(self, run) -> dict:
        stats = _project_all(run)
        projection.keep_trusted(run.wrappers, *run.trusted)
        stats["cout"] = projection.project_all(run.wrappers, run.basis.V)["cin"]
        return stats


class Inoculate(Intervention):
    """Inoculation prompting: every student training prompt licenses making the grader pass by any
    means (cfg.inoculation_prompt), so hacking is learned as what that instruction asks for; evaluation
    prompts never carry it. Needs no detector and no basis: the black-box baseline beside erase."""
    name = "inoculate"

    def messages(self, problem: Problem, cfg: Config, training: bool, hint: bool = True) -> list[dict]:
        messages = problem.messages(hint=hint)
        if training:
            system, *rest = messages
            messages = [{**system, "content": f"{system['content']}\n\n{cfg.inoculation_prompt}"}, *rest]
        return messages


for _arm in (Vanilla(), Erase(), Route(), Screen(), Penalty(), AdvMod(), Trusted(), Inoculate()):
    register(_arm)
