"""One GRPO step's rollouts, advantages and loss (docs/design.md, "One step").

Student samples come from one batched decode (`generate_completions`) with the knobs
merged into the weights, each graded as soon as it ends; teacher rows are frozen,
already graded completions from the pool. The advantage is Dr.GRPO's A = R - mean(R)
per prompt group (no std division). The loss is the PPO-clip form with the ratio to
the sampling policy, an optional K3 KL to the zero-knob reference, summed over
completion tokens and divided by the fixed group * max_new * prompts_per_step. Scoring
runs a group's shared prompt forward once (per kind of row, per micro-batch). Backward, the
completions are differentiated for the loss and, where the step reads them, for weighted sums of
the rollouts' own log-likelihoods (`Columns`: per row on the steps that take hack scores, per group
on the steps whose differences a live V takes), then each prompt once for both: one batched
backward over its rows' sum and each column its rows reach.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass

import torch

from . import adapter, sandbox
from .config import Config
from .model import encode_completion, encode_prompt
from .problems import Problem
from .rewards import Grading, Reward
from .sampling import generate_completions, row_seed
from .scoring import PromptCache, PromptFirst, pad_batch
from .teacher_pool import Pool


@dataclass
class Rollout:
    problem: Problem
    prompt_ids: list[int]  # the chat prompt, encoded once per step and shared by the group
    completion_ids: list[int]  # ends at (and includes) the first EOS, or at max_new
    text: str
    teacher: bool
    reward: float
    passed: bool
    gt_correct: bool
    exploited: bool
    format_ok: bool = True  # a fenced python block was found (the grader's format check)
    sample_logp: list[float] | None = None  # per completion token, under the weights that sampled it (students)
    advantage: float = 0.0
    hack_score: float | None = None  # cin of this rollout's own knob gradient, once scored
    key: tuple = ()  # (seed, step, problem id, index in its group): what the weak detector's draw is keyed by
    probe_score: float | None = None  # the probe monitor's P(hack) (--monitor=probe, once it is fitted)


def sample(model, tokenizer, wrappers, prompts: list[list[int]], n: int, cfg: Config,
           keys: list, on_finished=None) -> tuple[list[list[int]], list[list[float]]]:
    """n completions per prompt (ids and their sampling log-probs) from one batched decode with the
    knobs merged into the weights. keys[i] names prompt i's group (seed, step, problem):
    completion j of it is seeded by row_seed(*keys[i], j), whoever samples it. `on_finished` as in
    generate_completions."""
    seeds = [row_seed(*key, j) for key in keys for j in range(n)]
    with adapter.merged(wrappers):
        return generate_completions(model, tokenizer, [p for p in prompts for _ in range(n)], cfg.max_new, seeds,
                                    cfg.temperature, cfg.top_p, on_finished)


def group_advantages(rollouts: list[Rollout], group: int, rewards: list[float] | None = None,
                     dropped: list[bool] | None = None) -> int:
    """Dr.GRPO: A = R - mean(R) within each group, in place (R: `rewards`, default each rollout's
    own). `dropped` rollouts get A = 0 and stay out of their group's mean, as if never sampled.
    Returns the zero-spread group count (groups whose kept rewards are all equal)."""
    rewards = [r.reward for r in rollouts] if rewards is None else rewards
    dropped = dropped or [False] * len(rollouts)
    zero_spread = 0
    for start in range(0, len(rollouts), group):
        kept = [x for x, d in zip(rewards[start:start + group], dropped[start:start + group]) if not d]
        mean = sum(kept) / len(kept) if kept else 0.0
        for i in range(start, min(start + group, len(rollouts))):
            rollouts[i].advantage = 0.0 if dropped[i] else rewards[i] - mean
        zero_spread += all(x == kept[0] for x in kept)
    return zero_spread


def detected(r: Rollout, cfg: Config) -> bool:
    """The weak detector: the hack detectors of the known modes, run on a graded student rollout,
    missing some hacks and flagging some of the rest as a real monitor does.

    A known mode's real hack (the grader passed the rollout through that mode's flaw while the
    oracle failed it) is flagged with probability detector_recall, any other student rollout with
    detector_fpr; a hack of a mode outside the known ones goes unseen (flagged only as a false
    positive, its label never read). The draw is keyed by the rollout's (seed, step, problem,
    index), so every arm on a seed sees the same flags and every reader the same flag; at the
    defaults (1, 0) the detector is exact on the known modes. This is the one oracle-derived signal
    training may read: in the advantages of the baselines a user would otherwise pick
    (rl-rewardhacking's screening and penalty with a monitor: interventions.py), and in choosing
    the pairs of a V built from the model's own samples or rollouts (pairs=self, pairs=live:
    basis.py).
    """
    if r.teacher:
        return False
    draw = random.Random(repr(("detector", *r.key))).random()
    known_hack = r.problem.mode in cfg.basis_mode_list and r.exploited  # a held-out mode's label is never read
    return draw < (cfg.detector_recall if known_hack else cfg.detector_fpr)


def monitor_score(r: Rollout, cfg: Config) -> float:
    """The monitor's score in [0, 1] that screen, penalty and advmod read: the weak detector's flag
    (1 or 0), or under --monitor=probe the probe's P(hack) (0 before its first fit, a teacher row 0)."""
    if cfg.monitor == "probe":
        return r.probe_score or 0.0
    return float(detected(r, cfg))


def flagged(r: Rollout, cfg: Config) -> bool:
    """The monitor flags the rollout: the detector does, or the probe's score reaches probe_threshold (an
    unscored rollout, before the probe's first fit, never)."""
    if cfg.monitor == "probe":
        return r.probe_score is not None and r.probe_score >= cfg.probe_threshold
    return detected(r, cfg)


def detector_stats(rollouts: list[Rollout], cfg: Config) -> dict:
    """The weak detector against the oracle on student rollouts (logged under every intervention, never
    trained on): its recall of every hack (held-out modes' included) and its precision; and the rates
    its settings fix, realised: recall of the known modes' hacks (detector_recall) and the flagged share
    of every other rollout (detector_fpr)."""
    students = [(r.exploited, detected(r, cfg), r.problem.mode in cfg.basis_mode_list)
                for r in rollouts if not r.teacher]
    hits = sum(e and f for e, f, _ in students)
    n_exploited, n_flagged = sum(e for e, _, _ in students), sum(f for _, f, _ in students)
    known = [f for e, f, k in students if e and k]
    rest = [f for e, f, k in students if not (e and k)]
    return {"detector_recall": hits / n_exploited if n_exploited else None,
            "detector_precision": hits / n_flagged if n_flagged else None,
            "detector_recall_known": sum(known) / len(known) if known else None,
            "detector_fpr": sum(rest) / len(rest) if rest else None}


def repeated_fraction(ids: list[int], n: int = 4) -> float:
    """Share of a completion's token n-grams that already occurred earlier in it: ~0 for prose or
    code, toward 1 for a loop (a run of bare fences is how a collapsed policy looks)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def auroc(scores: list[float], labels: list[bool]) -> float | None:
    """P(score of a positive > score of a negative), ties counting half; None without both classes."""
    n_pos = sum(map(bool, labels))
    n_neg = len(labels) - n_pos
    if not n_pos or not n_neg:
        return None
    # Mann-Whitney U from ranks (ties share their average rank): O(n log n), not every pair.
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    rank_sum = sum(r for r, y in zip(ranks, labels) if y)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@contextlib.contextmanager
def _sharing_cores_with_grading(model):
    """On CPU, generation leaves a core to grading, which runs beside it (a child per completion
    as it ends, about one core's work at the organism's size): torch's worker threads, spinning
    between the small decode steps, would otherwise hold it. Leaving it makes the organism's step
    faster than generating on both threads (docs/performance.md)."""
    threads = torch.get_num_threads()
    if next(model.parameters()).device.type == "cpu":
        torch.set_num_threads(max(1, threads - 1))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sample_graded(model, tokenizer, wrappers, problems: list[Problem], prompts: list[list[int]], n: int,
                  cfg: Config, keys: list, workers: int | None) -> tuple[list, list, list[str], list[Reward], dict]:
    """n completions per problem from its prompt (`sample`), each graded as soon as it ends while the
    rest are still being generated. Returns ids, sampling log-probs, texts and grades in row order,
    and the timings: `t_generate`, and `t_grade`, the wait for grades after generation."""
    asked = [p for p in problems for _ in range(n)]
    limits = sandbox.Limits(wall_seconds=2.0 * cfg.grade_seconds, cpu_seconds=cfg.grade_seconds)
    texts, pending = {}, {}
    t0 = time.perf_counter()
    with Grading(workers, limits) as grading, _sharing_cores_with_grading(model):
        def grade(i: int, ids: list[int]) -> None:
            texts[i] = tokenizer.decode(ids, skip_special_tokens=True)
            pending[i] = grading.submit(texts[i], asked[i])

        ids, logp = sample(model, tokenizer, wrappers, prompts, n, cfg, keys, grade)
        timings = {"t_generate": time.perf_counter() - t0}
        t0 = time.perf_counter()
        grades = [pending[i].result() for i in range(len(ids))]
    timings["t_grade"] = time.perf_counter() - t0
    return ids, logp, [texts[i] for i in range(len(ids))], grades, timings


def collect_rollouts(model, tokenizer, wrappers, problems: list[Problem], pool: Pool | None, cfg: Config,
                     step: int, workers: int | None, messages=Problem.messages) -> tuple[list[Rollout], dict]:
    """Student samples (graded as they end) and teacher rows for each problem; groups are contiguous.
    Students are prompted with messages(problem) (the intervention's training prompt), teacher rows
    keep the problem's own. Every draw (student samples, teacher rows) is seeded by (seed, step,
    problem), so a problem's group is the same whether one process or a rank holding a share of the
    step collects it."""
    student, own = [messages(p) for p in problems], [p.messages() for p in problems]
    prompts = [encode_prompt(tokenizer, m) for m in student]
    teacher_prompts = [p if s == o else encode_prompt(tokenizer, o) for p, s, o in zip(prompts, student, own)]
    keys = [(cfg.seed, step, p.id) for p in problems]
    ids, logp, texts, grades, timings = sample_graded(model, tokenizer, wrappers, problems, prompts, cfg.student_group,
                                                      cfg, keys, workers)
    rollouts = []
    for i, (problem, prompt, teacher_prompt) in enumerate(zip(problems, prompts, teacher_prompts)):
        for j in range(cfg.student_group):
            k = i * cfg.student_group + j
            g = grades[k]
            rollouts.append(Rollout(problem, prompt, ids[k], texts[k], False, g.reward, g.passed, g.gt_correct,
                                    g.exploited, format_ok=g.format_ok, sample_logp=logp[k], key=(*keys[i], j)))
        if cfg.teacher_group:
            for row in pool.sample(problem.id, cfg.teacher_group, random.Random(repr(keys[i]))):
                completion = encode_completion(tokenizer, row.completion, cfg.max_new)
                rollouts.append(Rollout(problem, teacher_prompt, completion, row.completion, True, row.reward,
                                        row.passed, row.gt_correct, row.exploited))
    return rollouts, timings


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
                mask: torch.Tensor, cfg: Config, is_weight: torch.Tensor | None = None) -> torch.Tensor:
    """PPO-clip (+ beta * K3 KL) summed over completion tokens / (group * max_new * prompts_per_step).

    `is_weight` (detached, per token) scales the policy term only, as TRL applies its truncated
    importance sampling to vLLM-sampled rollouts; the KL term is left as it is.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv)
    if is_weight is not None:
        per_token = per_token * is_weight
    if ref_logp is not None:
        log_ratio = ref_logp - logp
        per_token = per_token + cfg.beta * (torch.exp(log_ratio) - log_ratio - 1)
    return (per_token * mask).sum() / (cfg.group * cfg.max_new * cfg.prompts_per_step)


def _sampling_logprobs(chunk: list[Rollout], completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each student token's sampling log-prob, laid out as pad_batch lays out the scored ones
    (completions end flush right), and the mask of the tokens that have one (teacher rows do not)."""
    sampled = torch.zeros(completion_mask.shape, dtype=torch.float32)
    has = torch.zeros(completion_mask.shape, dtype=torch.bool)
    for i, r in enumerate(chunk):
        if r.sample_logp:
            sampled[i, -len(r.sample_logp):] = torch.tensor(r.sample_logp)
            has[i, -len(r.sample_logp):] = True
    return sampled.to(completion_mask.device), has.to(completion_mask.device) & completion_mask.bool()


@dataclass(frozen=True)
class Columns:
    """Which sums of the rollouts' own log-likelihood gradients scoring builds, beside the loss's:
    column c is the sum over the rows i with of_row[i] == c of weight[i] times row i's gradient
    d(-sum log p / max_new). A row adds to at most one column, so one backward through the
    completions, each row weighted, gives every column. Per row: the hack score's; per group,
    +1/n_flagged and -1/n_unflagged: a live V's difference (basis.live_columns)."""
    of_row: tuple[int | None, ...]  # per rollout, its column (None: in none)
    weight: tuple[float, ...]  # per rollout, its weight in its column
    count: int

    @classmethod
    def rows(cls, chosen: list[int], n: int) -> Columns:
        """One column per chosen row, in the order given, weight 1 (rows: n)."""
        of_row, weight = [None] * n, [0.0] * n
        for c, i in enumerate(chosen):
            of_row[i], weight[i] = c, 1.0
        return cls(tuple(of_row), tuple(weight), len(chosen))

    def matrix(self) -> torch.Tensor:
        """The weights as a (count x rows) matrix: a column is its row of it times the rows' gradients."""
        out = torch.zeros((self.count, len(self.of_row)))
        for i, (c, w) in enumerate(zip(self.of_row, self.weight)):
            if c is not None:
                out[c, i] = w
        return out


# The sums backward_rollouts returns, with the token counts they are divided by: ranks add them first.
SUMS = ("loss", "kl", "tokens", "sample_kl", "sample_dlogp", "is_truncated", "sampled_tokens")


def backward_rollouts(model, tokenizer, wrappers, rollouts: list[Rollout], cfg: Config,
                      columns: Columns | None = None, reference: PromptCache | None = None) -> dict:
    """Score every rollout, backpropagate the loss, and keep what the step reads of the gradient.

    Each micro-batch's rows of each kind (students, teachers: the two sums stay apart) are scored
    in one forward that runs each group's prompt once (`PromptFirst`), and so is the reference
    forward (over the prompts `reference` keeps from earlier steps, when given). The loss's gradient
    is always taken; `columns`, when given, asks for sums of the rollouts' own log-likelihood
    gradients d(-sum log p / max_new), which no advantage and no KL term touch (the hack score's per
    row, a live V's per group). Both go back through the completions (the adapter keeping the second
    per row), then through each prompt in one batched backward over its rows' sum and each column
    its rows reach. A part of no column's rows pays for neither the second backward nor any column
    through its prompt.

    Returns the loss, per-layer g_student and g_teacher (r each: their share of the loss gradient,
    advantage-weighted, KL included), per-layer `columns` (columns.count x r; absent without
    `columns`), and sums with their token counts (so ranks can add them before dividing): `kl`
    (K3 to the reference, over `tokens` completion tokens) and the sampler/scorer mismatch over
    `sampled_tokens` student tokens: with delta = log p_score - log p_sample, `sample_kl` =
    sum(exp(delta) - 1 - delta) (K3 of KL(sample || score)), `sample_dlogp` = sum |delta|,
    `is_truncated` = the count of tokens whose ratio exceeds is_cap. Under `is_correction` each
    student token's policy loss is weighted by min(exp(delta), is_cap), detached. delta_s.grad and
    delta_s_hack.grad are set to g_student + g_teacher.
    """
    pad = tokenizer.pad_token_id
    knobs = [layer.delta_s for layer in wrappers.values()]
    count = columns.count if columns else 0
    by_column = {name: layer.delta_s.new_zeros((count, layer.r)) for name, layer in wrappers.items()}
    kind_grads = {kind: [torch.zeros_like(k) for k in knobs] for kind in (False, True)}  # by r.teacher
    sums = dict.fromkeys(SUMS, 0.0)
    size = cfg.micro_batch or len(rollouts)
    with adapter.scoring(wrappers):
        for start in range(0, len(rollouts), size):
            chunk = rollouts[start:start + size]
            for kind in (False, True):
                part = [start + i for i, r in enumerate(chunk) if r.teacher == kind]
                if part:
                    where = f"the {('student', 'teacher')[kind]} rows of rollouts {start}..{start + len(chunk) - 1}"
                    weights = ([columns.of_row[i] for i in part], [columns.weight[i] for i in part]) if columns \
                        else ([None] * len(part), [0.0] * len(part))
                    grads, own, part_sums = _score_part(model, wrappers, [rollouts[i] for i in part], *weights,
                                                        count, cfg, pad, where, reference)
                    for total, g in zip(kind_grads[kind], grads):
                        total += g
                    for name, g in own.items():
                        by_column[name] += g
                    for key, value in part_sums.items():
                        sums[key] += value
    for layer, g_student, g_teacher in zip(wrappers.values(), *kind_grads.values()):
        layer.delta_s.grad = g_student + g_teacher
        layer.delta_s_hack.grad = layer.delta_s.grad.clone()  # dL/d delta_s_hack = dL/d delta_s: both add into s
    return {"g_student": dict(zip(wrappers, kind_grads[False])), "g_teacher": dict(zip(wrappers, kind_grads[True])),
            **({"columns": by_column} if columns else {}), **sums}


def _score_part(model, wrappers, part: list[Rollout], column_of: list[int | None], weight: list[float], count: int,
                cfg: Config, pad: int, where: str,
                reference: PromptCache | None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], dict]:
    """The knob gradients of the loss of `part` (rows of one kind), this part's share of the `count`
    columns (backward_rollouts: row i adds weight[i] times its own log-likelihood gradient to column
    column_of[i]) per layer (count x r), and the part's sums (backward_rollouts names them), from one
    forward with each group's prompt run once (`PromptFirst`)."""
    device = next(model.parameters()).device
    prompts, completions = [r.prompt_ids for r in part], [r.completion_ids for r in part]
    comp = pad_batch(prompts, completions, pad, device)[2]
    scored = PromptFirst(model, prompts, completions, pad)
    logp = scored.logprobs
    sums, ref = {"tokens": int(comp.sum())}, None
    if cfg.beta > 0:
        with torch.no_grad(), adapter.zeroed(wrappers):
            ref = PromptFirst(model, prompts, completions, pad, reference).logprobs
        log_ratio = ref - logp.detach()
        sums["kl"] = float(((torch.exp(log_ratio) - log_ratio - 1) * comp).sum())
    sample_logp, has_sample = _sampling_logprobs(part, comp)
    delta = torch.where(has_sample, logp.detach() - sample_logp, torch.zeros_like(sample_logp))
    ratio = torch.exp(delta)
    sums |= {"sample_kl": float((ratio - 1 - delta).sum()), "sample_dlogp": float(delta.abs().sum()),
             "is_truncated": float((ratio > cfg.is_cap).sum()), "sampled_tokens": int(has_sample.sum())}
    is_weight = ratio.clamp(max=cfg.is_cap) if cfg.is_correction else None
    advantages = torch.tensor([r.advantage for r in part], dtype=torch.float32, device=device)
    loss = policy_loss(logp, logp.detach(), ref, advantages, comp.float(), cfg, is_weight)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} in {where}")
    sums["loss"] = loss.item()
    # Backward through the completions for the loss and (when a row is in a column) for the rows' own
    # log-likelihoods, each weighted, which no advantage and no KL term touch, kept per row by the adapter;
    # then through each prompt once for both.
    knobs = [layer.delta_s for layer in wrappers.values()]
    in_column = [i for i, c in enumerate(column_of) if c is not None]
    loss_grads = torch.autograd.grad(loss, knobs + scored.row_cache, retain_graph=bool(in_column))
    own = {name: layer.delta_s.new_zeros((count, layer.r)) for name, layer in wrappers.items()}
    weighted = None
    if in_column:
        w = torch.tensor(weight, dtype=torch.float32, device=device)
        with adapter.per_sample_grads(wrappers):  # log-probs are zero off the completions: their sum is the rows'
            weighted = torch.autograd.grad(-(logp.sum(1) * w).sum() / cfg.max_new, knobs + scored.row_cache)
            rows = torch.tensor(in_column, device=device)
            targets = torch.tensor([column_of[i] for i in in_column], device=device)
            for name, layer in wrappers.items():
                own[name].index_add_(0, targets, layer.grad_sample[rows])
            adapter.clear_grad_samples(wrappers)
        weighted = weighted[len(knobs):]
    prompt_loss, prompt_own = scored.prompt_grads(loss_grads[len(knobs):], weighted, column_of, knobs, count)
    return ([g + p for g, p in zip(loss_grads, prompt_loss)],
            {name: own[name] + p for name, p in zip(wrappers, prompt_own)}, sums)
