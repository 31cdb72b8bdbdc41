"""The installed packages satisfy the version bounds pyproject.toml declares, and the fast-moving ones
keep a tested upper bound.

pyproject.toml caps transformers, accelerate, datasets, tokenizers, tyro and torch at the newest minor
release the test suite has passed on (its comment says which versions and how to raise a cap). A test
run in an environment outside those bounds (an upgrade by hand, a resolver that ignored them) would
report results for versions nobody declared; this fails it instead, naming the package, the installed
version and the bound. Only the core dependencies and the `dev` extra are checked: the default test
run installs exactly `pip install -e ".[dev]"`.
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

# packages on the default path that release often and have broken or deprecated what we call
CAPPED = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "tyro")


def _requirements() -> list[tuple[str, Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [("dependencies", Requirement(r)) for r in project["dependencies"]]
    reqs += [("optional-dependencies.dev", Requirement(r)) for r in project["optional-dependencies"]["dev"]]
    return [(where, r) for where, r in reqs if r.marker is None or r.marker.evaluate()]


def _names(reqs) -> dict[str, Requirement]:
    return {r.name.lower().replace("_", "-"): r for _, r in reqs}


@pytest.mark.parametrize(("where", "req"), _requirements(), ids=lambda x: x.name if isinstance(x, Requirement) else "")
def test_installed_version_satisfies_pyproject(where, req):
    try:
        installed = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"pyproject.toml [project.{where}] declares {req}, but {req.name} is not installed; "
                    f'run `pip install -e ".[dev]"`')
    assert req.specifier.contains(Version(installed), prereleases=True), (
        f"{req.name} {installed} is installed, but pyproject.toml [project.{where}] declares {req}: install a "
        f"version inside the bound, or test this one and move the bound (see the comment above `dependencies`)")


@pytest.mark.parametrize("name", CAPPED)
def test_fast_moving_dependencies_have_a_tested_upper_bound(name):
    reqs = _names(_requirements())
    assert name in reqs, f"pyproject.toml no longer declares {name}; update CAPPED in {Path(__file__).name}"
    uppers = [s for s in reqs[name].specifier if s.operator in ("<", "<=", "==", "~=")]
    assert uppers, (f"pyproject.toml declares {reqs[name]} without an upper bound; cap it at the newest minor "
                    f"release the test suite passed on (e.g. '<X.Y')")


def test_requirement_names_are_unique():
    names = [r.name.lower().replace("_", "-") for _, r in _requirements()]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
