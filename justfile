# Recipes a researcher runs. `just --list` shows them all.

# the test suite: fast, CPU, offline
test *args:
    python -m pytest {{args}}

# grader self-check: the hack x mode diagonal over every built-in problem
check *args:
    python -m projected_grpo.rewards {{args}}

# the same, every problem graded in every mode (6x the work)
check-cross:
    python -m projected_grpo.rewards --cross

# style and obvious bugs
lint:
    ruff check src tests
