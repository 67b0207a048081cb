"""docs/design.md's module table and README's module list against the code: the imports each module makes
(found by ast, function scope included) must be the ones the table lists, in an order where no import runs
back up, and every module must be on both pages."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "projected_grpo"


def package_imports(source: str, module: str) -> set[str]:
    """The package modules `source` imports anywhere in it (relative or absolute, at any scope)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("projected_grpo"):
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("projected_grpo.")}
    return found - {"__version__", module}


def design_table(text: str) -> dict[str, set[str]]:
    """module -> the imports its row lists, in the table's order."""
    rows = {}
    for line in text.splitlines():
        if match := re.fullmatch(r"\| `(\w+)` \| .* \| ([\w, ]+) \|", line):
            rows[match[1]] = set() if match[2] == "nothing" else {n.strip() for n in match[2].split(",")}
    return rows


def mismatches(table: dict[str, set[str]], sources: dict[str, str]) -> list[str]:
    """Every way the table and the code disagree, one line each."""
    problems = [f"{m} is not in the table" for m in sorted(set(sources) - set(table))]
    problems += [f"{m} is in the table but not in the package" for m in sorted(set(table) - set(sources))]
    above: set[str] = set()
    for module, listed in table.items():
        if module in sources:
            actual = package_imports(sources[module], module)
            problems += [f"{module} imports {m}, which the table does not list" for m in sorted(actual - listed)]
            problems += [f"{module} lists {m}, which it does not import" for m in sorted(listed - actual)]
            problems += [f"{module} imports {m}, listed below it" for m in sorted(listed - above)]
        above.add(module)
    return problems


def _sources() -> dict[str, str]:
    return {p.stem: p.read_text() for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def test_the_design_table_lists_every_module_and_exactly_its_imports():
    assert mismatches(design_table((ROOT / "docs" / "design.md").read_text()), _sources()) == []


def test_an_import_without_a_table_line_fails_the_check():
    table, sources = design_table((ROOT / "docs" / "design.md").read_text()), _sources()
    sources["config"] += "\n\ndef later():\n    from .rewards import compute_reward\n    return compute_reward\n"
    assert mismatches(table, sources) == ["config imports rewards, which the table does not list"]
    sources["brand_new"] = "from .config import Config\n"
    assert "brand_new is not in the table" in mismatches(table, sources)


def test_the_readme_names_every_module():
    readme = (ROOT / "README.md").read_text()
    assert [m for m in sorted(_sources()) if f"`{m}.py`" not in readme] == []
