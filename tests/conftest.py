import functools
from pathlib import Path

import pytest

from projected_grpo.problems import builtin_problems

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "leetcode_test_medhard.jsonl"


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
