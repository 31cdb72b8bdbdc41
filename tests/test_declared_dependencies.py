"""Every third-party package the code imports is declared in pyproject.toml.

A package that happens to be installed on the developer's machine (by hand, or only as some other
package's dependency) makes the tests pass there and fail on a fresh install (issue 10: `hypothesis`
was imported by tests/test_steps.py but not in the `dev` extra). The rules checked here:

* a test module may import only what the core dependencies or the `dev` extra declare (the default
  test run installs exactly `pip install -e ".[dev]"`); tests of an optional extra such as vLLM use
  `pytest.importorskip` instead of an import statement;
* the library (`langenv/`, `algos/`, `experiments/`) may import what the core dependencies declare,
  plus, inside functions, what an optional extra declares.

Import names are mapped to distributions with `importlib.metadata.packages_distributions()`
(``yaml`` -> ``PyYAML``), so the check is exact for installed packages.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL = {"langenv", "algos", "experiments", "tests", "conftest"}


def _normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _requirement_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    assert m, f"pyproject.toml: cannot read a package name from requirement {req!r}"
    return _normalise(m.group(1))


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    extras = {name: {_requirement_name(r) for r in reqs}
              for name, reqs in project.get("optional-dependencies", {}).items()}
    return core, extras


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level module name, line, at module level?) of every absolute import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(n) for n in tree.body}
    # imports nested in `if`/`try` at module level still run at import time
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            top_level.update(id(n) for n in ast.walk(node))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out.extend((n.split(".")[0], node.lineno, id(node) in top_level) for n in names)
    return out


def _third_party(name: str, siblings: set[str]) -> bool:
    return not (name in sys.stdlib_module_names or name in LOCAL or name in siblings
                or name == "__future__")


@functools.cache
def _installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distributions(name: str) -> set[str]:
    found = _installed().get(name)
    return {_normalise(d) for d in found} if found else {_normalise(name)}


def _files(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if ".venv" not in p.parts)


def test_test_modules_import_only_core_and_dev_packages():
    core, extras = _declared()
    allowed = core | extras.get("dev", set())
    siblings = {p.stem for p in _files("tests")}
    problems = []
    for path in _files("tests"):
        for name, line, _ in _imports(path):
            if _third_party(name, siblings) and not (_distributions(name) & allowed):
                problems.append(f"{path.relative_to(ROOT)}:{line}: imports {name!r} "
                                f"(distribution {sorted(_distributions(name))}), which neither the core "
                                f"dependencies nor the 'dev' extra of pyproject.toml declare")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("folder", ["langenv", "algos", "experiments"])
def test_library_imports_are_declared(folder):
    core, extras = _declared()
    optional = set().union(*extras.values()) if extras else set()
    siblings = {p.stem for p in _files(folder)}
    problems = []
    for path in _files(folder):
        for name, line, at_module_level in _imports(path):
            if not _third_party(name, siblings):
                continue
            dists = _distributions(name)
            if dists & core:
                continue
            if dists & optional and not at_module_level:
                continue  # an optional extra, imported lazily where it is used
            where = "an optional extra imported at module level" if dists & optional else "undeclared"
            problems.append(f"{path.relative_to(ROOT)}:{line}: imports {name!r} "
                            f"(distribution {sorted(dists)}): {where} in pyproject.toml")
    assert not problems, "\n".join(problems)


def test_the_check_sees_an_undeclared_import(tmp_path):
    """The checker itself: an import of a package nobody declares is reported."""
    mod = tmp_path / "test_fake.py"
    mod.write_text("import os\nimport hypothesis\nimport surely_not_a_declared_package\n")
    names = [n for n, _, _ in _imports(mod) if _third_party(n, set())]
    assert names == ["hypothesis", "surely_not_a_declared_package"]
    core, extras = _declared()
    assert "hypothesis" in extras["dev"]
    assert not (_distributions("surely_not_a_declared_package") & (core | extras["dev"]))
