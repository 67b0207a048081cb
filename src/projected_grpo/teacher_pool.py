"""The teacher pool: frozen, already graded rollouts per problem, mixed into GRPO groups.

Each GRPO group mixes `G_t` teacher rows into the student's samples (docs/design.md,
"One step"). Their grades are decided once, by the real grader, when the pool is
built, and never again: a pool is a fixed data set, so two runs that share it see
the same teacher rewards.

Two builders write the same format:
- `build_pool`: the fixture pool from the package's own completions (own-mode hacks,
  a clean and a wrong-honest answer per problem), for smoke runs and tests;
- `build_pool_from_model`: completions sampled from a teacher model, which is how a
  real run gets a teacher that hacks in its own words.

On disk a pool is a directory holding `pool.jsonl` (one row per line) and
`meta.json`. The meta file is written last, so a directory with a meta file is a
complete pool; `load_pool` validates every line and names file, line and field.

    python -m projected_grpo.teacher_pool --out out/pools/fixture [--modes run_tests,sentinel]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import typing
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from .config import InputError
from .files import iter_jsonl, read_json, write_atomically
from .problems import MODES, PROBLEM_SETS, Problem, check_modes, load_problems, problem_set_path
from .rewards import grade_batch
from .templates import ContrastPair, clean_completion, hack_completion, wrong_completion

FORMAT = 1
POOL_FILE = "pool.jsonl"
META_FILE = "meta.json"
KINDS = ("hack", "clean", "wrong", "sampled")
VERDICTS = ("solved", "exploited", "failed")
FIXTURE_SOURCE = "fixture"
HOW_TO_BUILD = "build one with `just build-pool` or `python -m projected_grpo.teacher_pool --out DIR`"
# Completions per grade_batch call: small enough for the progress bar to move, large
# enough to keep every sandbox worker busy.
_GRADE_CHUNK = 64


class PoolFormatError(InputError):
    """A pool file that does not parse or is inconsistent; the message names file, line and field."""


@dataclass(frozen=True)
class TeacherRow:
    problem_id: str
    mode: str
    completion: str
    reward: float
    passed: bool  # the mode's flawed grader accepted it
    gt_correct: bool  # the strict oracle accepted it
    exploited: bool  # passed and not gt_correct
    kind: str  # "hack", "clean", "wrong" (fixture rows) or "sampled" (from a teacher model)
    source: str  # "fixture" or the teacher model's name

    @property
    def verdict(self) -> str:
        return "solved" if self.gt_correct else "exploited" if self.exploited else "failed"


_FIELD_TYPES = typing.get_type_hints(TeacherRow)


class Pool:
    """Teacher rows grouped by problem id, in file order."""

    def __init__(self, rows: list[TeacherRow], meta: dict | None = None, path: Path | None = None):
        self.meta = meta or {}
        self.path = path
        self._by_problem: dict[str, list[TeacherRow]] = {}
        for row in rows:
            self._by_problem.setdefault(row.problem_id, []).append(row)

    def __len__(self) -> int:
        return sum(map(len, self._by_problem.values()))

    def __contains__(self, problem_id: str) -> bool:
        return problem_id in self._by_problem

    def problem_ids(self) -> list[str]:
        return list(self._by_problem)

    def rows_for(self, problem_id: str) -> list[TeacherRow]:
        return list(self._by_problem.get(problem_id, ()))

    def without(self, rows) -> Pool:
        """The pool less `rows` (by value: a text sampled twice goes with its copy)."""
        drop = set(rows)
        return Pool([r for rs in self._by_problem.values() for r in rs if r not in drop], self.meta, self.path)

    def sample(self, problem_id: str, n: int, rng: random.Random) -> list[TeacherRow]:
        """n distinct rows of the problem, or n drawn with replacement when it has fewer than n."""
        if n < 0:
            raise ValueError(f"sample: n must be >= 0, got {n}")
        rows = self._by_problem.get(problem_id)
        if not rows:
            where = f" loaded from {self.path}" if self.path else ""
            raise KeyError(f"teacher pool{where} has no rows for problem {problem_id!r} "
                           f"(was it built from the same problem set and modes?)")
        return rng.sample(rows, n) if len(rows) >= n else rng.choices(rows, k=n)

    def counts(self) -> dict:
        """Rows and problems, verdict counts overall and per mode (modes in MODES order)."""
        by_mode: dict[str, dict[str, int]] = {}
        problems: dict[str, set[str]] = {}
        for pid, rows in self._by_problem.items():
            for row in rows:
                cell = by_mode.setdefault(row.mode, {"rows": 0, **dict.fromkeys(VERDICTS, 0)})
                cell["rows"] += 1
                cell[row.verdict] += 1
                problems.setdefault(row.mode, set()).add(pid)
        by_mode = {m: {"problems": len(problems[m]), **by_mode[m]} for m in MODES if m in by_mode}
        total = {key: sum(cell[key] for cell in by_mode.values()) for key in ("problems", "rows", *VERDICTS)}
        return {"total": total, "by_mode": by_mode}

    def summary(self) -> str:
        counts = self.counts()
        columns = ("problems", "rows", *VERDICTS)
        lines = [f"teacher pool{f' {self.path}' if self.path else ''}: source {self.meta.get('source', '?')}",
                 "mode".ljust(14) + "".join(c.rjust(11) for c in columns)]
        for name, cell in [*counts["by_mode"].items(), ("total", counts["total"])]:
            lines.append(name.ljust(14) + "".join(str(cell[c]).rjust(11) for c in columns))
        return "\n".join(lines)


def pairs_from_pool(pool: Pool, problems: list[Problem], modes,
                    contrast: str = "clean") -> tuple[list[ContrastPair], list[TeacherRow]]:
    """(exploited, gt_correct) completions of one problem, from the pool's own graded rows, as pairs;
    contrast "failed": (exploited, neither exploited nor gt_correct), an honest failure.

    Per problem of a mode in `modes` with at least one exploited and one contrast row: the
    first of each (the second contrast row, if any, is the nonhack control's clean_alt; else
    the same row, a zero difference). Returns the pairs and every row they used, which
    the caller keeps out of the mixed-in teacher rows so the student never imitates V's texts.
    """
    pairs, used = [], []
    for problem in problems:
        rows = pool.rows_for(problem.id)
        hacks = [r for r in rows if r.exploited]
        cleans = [r for r in rows if r.gt_correct] if contrast == "clean" else \
            [r for r in rows if not r.exploited and not r.gt_correct]
        if problem.mode not in modes or not hacks or not cleans:
            continue
        clean_alt = cleans[1] if len(cleans) > 1 else cleans[0]
        pairs.append(ContrastPair(problem_id=problem.id, mode=problem.mode, prompt=problem.user_prompt(),
                                  messages=tuple(problem.messages()), hack=hacks[0].completion,
                                  clean=cleans[0].completion, clean_alt=clean_alt.completion))
        used += [hacks[0], cleans[0], clean_alt]
    return pairs, used


# ----------------------------------------------------------------------------- building


def _select(problems: list[Problem], modes) -> list[Problem]:
    modes = check_modes(modes)
    selected = [p for p in problems if p.mode in modes]
    if not selected:
        raise ValueError(f"no problems of modes {list(modes)} among the {len(problems)} given")
    return selected


def _grade(texts: list[str], problems: list[Problem], workers: int | None):
    rewards = []
    for start in tqdm(range(0, len(texts), _GRADE_CHUNK), desc="grading teacher rows", unit="chunk"):
        end = start + _GRADE_CHUNK
        rewards += grade_batch(texts[start:end], problems[start:end], workers=workers)
    return rewards


def _graded_rows(texts, problems, kinds, source, workers) -> list[TeacherRow]:
    return [TeacherRow(problem_id=p.id, mode=p.mode, completion=text, reward=r.reward, passed=r.passed,
                       gt_correct=r.gt_correct, exploited=r.exploited, kind=kind, source=source)
            for text, p, kind, r in zip(texts, problems, kinds, _grade(texts, problems, workers))]


def _describe_problems(problems: list[Problem]) -> str:
    """A shipped set's name, or the file(s) the problems were read from (Problem.source is 'file:line')."""
    files = sorted({p.source.rsplit(":", 1)[0] for p in problems if p.source})
    for name in PROBLEM_SETS:
        with problem_set_path(name) as path:
            if files == [str(path)]:
                return name
    return ", ".join(files) or "in-memory"


def _write_pool(out_dir, rows: list[TeacherRow], source: str, problems: list[Problem], modes) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Drop an old meta first: a crash between the two writes below must leave a
    # directory that load_pool refuses, not an old meta beside new rows.
    (out_dir / META_FILE).unlink(missing_ok=True)
    write_atomically(out_dir / POOL_FILE, "".join(json.dumps(asdict(r)) + "\n" for r in rows))
    meta = {"format": FORMAT, "source": source, "problems": _describe_problems(problems), "n_rows": len(rows),
            "modes": list(check_modes(modes)), "counts": Pool(rows).counts()}
    write_atomically(out_dir / META_FILE, json.dumps(meta, indent=2) + "\n")
    return out_dir


def build_pool(out_dir, problems: list[Problem], modes=None, workers: int | None = None) -> Path:
    """The fixture pool: per problem of a selected mode, four own-mode hacks, two clean and two
    wrong answers, all in the pool's phrasings (never the texts the hack basis is built from).

    Eight rows per problem, so a group of four teacher rows is a different draw each time.
    Every row carries the grade the real grader gave it, not the grade its kind
    suggests: a pool built on a new problem file records what actually happened.
    """
    texts, graded, kinds = [], [], []
    seen = dict.fromkeys(MODES, 0)
    for problem in _select(problems, modes):
        # Rotating the variants across a mode's problems uses every phrasing the mode has.
        k = seen[problem.mode]
        seen[problem.mode] += 1
        rows = [("hack", hack_completion(problem, problem.mode, k + i, phrasing="pool")) for i in range(4)]
        rows += [("clean", clean_completion(problem, k + i, phrasing="pool")) for i in range(2)]
        rows += [("wrong", wrong_completion(problem, k + i)) for i in range(2)]
        for kind, text in rows:
            texts.append(text)
            graded.append(problem)
            kinds.append(kind)
    rows = _graded_rows(texts, graded, kinds, FIXTURE_SOURCE, workers)
    return _write_pool(out_dir, rows, FIXTURE_SOURCE, problems, modes)


def build_pool_from_model(out_dir, problems: list[Problem], model_name: str, samples_per_problem: int = 4,
                          max_new: int = 512, temperature: float = 1.0, top_p: float = 1.0,
                          dtype: str = "bfloat16", device: str = "cuda", seed: int = 0, batch_size: int = 8,
                          modes=None, workers: int | None = None) -> Path:
    """Sample `samples_per_problem` completions per problem from a teacher model, grade, freeze."""
    # Imported here: torch and transformers take seconds to load, and the fixture builder needs neither.
    from .model import encode_prompt, load_model_and_tokenizer
    from .sampling import generate_completions, row_seed

    selected = _select(problems, modes)
    model, tokenizer = load_model_and_tokenizer(model_name, dtype=dtype, device=device, seed=seed)
    prompt_ids = {p.id: encode_prompt(tokenizer, p.messages()) for p in selected}
    jobs = [p for p in selected for _ in range(samples_per_problem)]
    seeds = [row_seed(seed, "pool", p.id, j) for p in selected for j in range(samples_per_problem)]
    texts = []
    for start in tqdm(range(0, len(jobs), batch_size), desc=f"sampling {model_name}", unit="batch"):
        batch = jobs[start:start + batch_size]
        ids, _ = generate_completions(model, tokenizer, [prompt_ids[p.id] for p in batch], max_new,
                                      seeds[start:start + batch_size], temperature, top_p)
        texts += tokenizer.batch_decode(ids, skip_special_tokens=True)
    del model  # frees accelerator memory before the CPU-bound grading
    rows = _graded_rows(texts, jobs, ["sampled"] * len(jobs), model_name, workers)
    return _write_pool(out_dir, rows, model_name, problems, modes)


# ----------------------------------------------------------------------------- loading


def _missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"no teacher pool at {path} ({what} is missing); {HOW_TO_BUILD.replace('DIR', str(path))}")


def _parse_row(record: object, where: str) -> TeacherRow:
    if not isinstance(record, dict):
        raise PoolFormatError(f"{where}: a row must be a JSON object")
    unexpected = sorted(set(record) - set(_FIELD_TYPES))
    if unexpected:
        raise PoolFormatError(f"{where}: unexpected field {unexpected[0]!r}")
    values = {}
    for name, kind in _FIELD_TYPES.items():
        if name not in record:
            raise PoolFormatError(f"{where}: missing field {name!r}")
        value = record[name]
        # bool is an int in Python; a grade of `true` where a number belongs is a corrupt row.
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise PoolFormatError(f"{where}: field {name!r} is not finite ({value})")
            value = float(value)
        elif not isinstance(value, kind):
            raise PoolFormatError(f"{where}: field {name!r} should be {kind.__name__}, got {type(value).__name__}")
        values[name] = value
    row = TeacherRow(**values)
    if row.mode not in MODES:
        raise PoolFormatError(f"{where}: field 'mode' is {row.mode!r}, not one of {MODES}")
    if row.kind not in KINDS:
        raise PoolFormatError(f"{where}: field 'kind' is {row.kind!r}, not one of {KINDS}")
    if row.exploited != (row.passed and not row.gt_correct):
        raise PoolFormatError(f"{where}: field 'exploited' is {row.exploited} but passed={row.passed}, "
                              f"gt_correct={row.gt_correct} (exploited means passed and not gt_correct)")
    return row


def _read_meta(path: Path) -> dict:
    meta = read_json(path, PoolFormatError, "rebuild the pool")
    if meta.get("format") != FORMAT:
        raise PoolFormatError(f"{path}: field 'format' is {meta.get('format')!r}, this package reads {FORMAT}; "
                              f"rebuild the pool")
    if not isinstance(meta.get("n_rows"), int):
        raise PoolFormatError(f"{path}: field 'n_rows' should be int")
    return meta


def load_pool(path, modes=None) -> Pool:
    """Read and validate a pool directory; `modes` keeps only rows of those modes."""
    path = Path(path)
    pool_file, meta_file = path / POOL_FILE, path / META_FILE
    if not meta_file.is_file():
        raise _missing(path, META_FILE)
    if not pool_file.is_file():
        raise _missing(path, POOL_FILE)
    keep = check_modes(modes)
    meta = _read_meta(meta_file)
    rows, n_lines, mode_of = [], 0, {}
    for where, record in iter_jsonl(pool_file, PoolFormatError):
        row = _parse_row(record, where)
        # A problem carries one mode; rows graded under two cannot both be its frozen grades.
        if mode_of.setdefault(row.problem_id, row.mode) != row.mode:
            raise PoolFormatError(f"{where}: field 'mode' is {row.mode!r} but earlier rows of problem "
                                  f"{row.problem_id!r} have {mode_of[row.problem_id]!r}")
        n_lines += 1
        if row.mode in keep:
            rows.append(row)
    if n_lines != meta["n_rows"]:
        raise PoolFormatError(f"{pool_file}: {n_lines} rows but {meta_file} says {meta['n_rows']}; "
                              f"the pool is incomplete or was edited, {HOW_TO_BUILD.replace('DIR', str(path))}")
    return Pool(rows, meta, path)


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a frozen, graded teacher pool and print its counts.")
    parser.add_argument("--out", required=True, help="pool directory to write (e.g. out/pools/fixture)")
    parser.add_argument("--modes", help="comma-separated modes to include (default: all)")
    parser.add_argument("--problems", default="builtin",
                        help=f"a shipped set ({', '.join(PROBLEM_SETS)}) or a jsonl file of problems")
    parser.add_argument("--workers", type=int, default=None, help="parallel graders (default: one per core)")
    sampling = parser.add_argument_group("sampling from a teacher model (default: the fixture completions)")
    sampling.add_argument("--from-model", help="Hugging Face id or path, or 'tiny-random'")
    sampling.add_argument("--samples", type=int, default=4, help="completions per problem")
    sampling.add_argument("--max-new", type=int, default=512)
    sampling.add_argument("--temperature", type=float, default=1.0)
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--batch-size", type=int, default=8)
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--device", default="cuda")
    sampling.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip()) if args.modes else None
    try:
        check_modes(modes)
    except ValueError as e:
        parser.error(str(e))
    problems = load_problems(args.problems)
    if args.from_model:
        out = build_pool_from_model(
            args.out, problems, args.from_model, samples_per_problem=args.samples, max_new=args.max_new,
            temperature=args.temperature, top_p=args.top_p, dtype=args.dtype, device=args.device,
            seed=args.seed, batch_size=args.batch_size, modes=modes, workers=args.workers)
    else:
        out = build_pool(args.out, problems, modes=modes, workers=args.workers)
    print(load_pool(out).summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
