"""The install files agree with each other, so `make` and conda give the same environment."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = list(project["dependencies"]) + [p for extra in project["optional-dependencies"].values() for p in extra]
    out = {}
    for pin in pins:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([0-9][A-Za-z0-9.\-+]*)", pin)
        assert m, f"pyproject.toml: {pin!r} is not an exact pin (name==version)"
        out[m.group(1).lower()] = m.group(2)
    return out


def test_environment_yml_repeats_the_pyproject_pins_exactly():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    env_pins = dict(p.lower().split("==") for p in pip_section)
    assert env_pins == _pyproject_pins()


def test_installed_versions_are_the_pinned_ones():
    from importlib.metadata import version

    for name, pinned in _pyproject_pins().items():
        assert version(name) == pinned, f"{name}: installed {version(name)}, pinned {pinned}"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()
    assert "make study" in (ROOT / "README.md").read_text()
