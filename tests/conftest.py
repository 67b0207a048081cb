import contextlib
import functools
import os
from pathlib import Path

import pytest

from projected_grpo.problems import builtin_problems

# The real rl-rewardhacking file lives beside the checkout, never inside it.
REAL_DATA = Path(os.environ.get("PROJECTED_GRPO_REAL_DATA", Path(__file__).resolve().parents[2]
                                / "shared" / "data" / "leetcode_test_medhard.jsonl"))


def process_alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextlib.contextmanager
def module_workdir(tmp_path_factory, name: str, **env: str):
    """One working directory for a whole test module, so the fixture pool, bases and tokenizer are built
    once: its own SVD cache, and `env` set while it is in use."""
    path = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(path)
        patch.setenv("PROJECTED_GRPO_CACHE", str(path / "cache"))
        for key, value in env.items():
            patch.setenv(key, value.format(path=path))
        yield path


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory (runs land in its out/) with its own SVD cache; test_train, test_export and
    test_reporting keep one per module instead (module_workdir)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROJECTED_GRPO_CACHE", str(tmp_path / "cache"))
    return tmp_path


def held_out_rollouts(count: int, mode: str = "exit_code") -> list:
    """Student rollouts of a held-out mode whose `exploited` label raises when anything reads it, each
    with its own detector key."""
    import types

    from projected_grpo.grpo import Rollout

    class Unread:
        def __get__(self, obj, kind=None):
            raise AssertionError("a held-out mode's label was read")

    class HeldOut(Rollout):
        exploited = Unread()

    held = []
    for i in range(count):
        r = HeldOut.__new__(HeldOut)
        for field, value in (("problem", types.SimpleNamespace(mode=mode, id="held")), ("teacher", False),
                             ("reward", 0.25), ("key", (0, 1, "held", i))):
            object.__setattr__(r, field, value)
        held.append(r)
    return held


@functools.cache
def _builtins():
    return tuple(builtin_problems())


@pytest.fixture
def problems():
    return list(_builtins())


@pytest.fixture
def real_data_path():
    if not REAL_DATA.exists():
        pytest.skip(f"real rl-rewardhacking file not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(params=["fork", "spawn"])
def each_grader(request):
    """Runs a test on both ways a job's supervisor starts: forked by a fork server, spawned fresh."""
    from projected_grpo import sandbox

    before = sandbox._grader
    sandbox.use_grader(request.param)
    yield request.param
    sandbox.use_grader(before)
