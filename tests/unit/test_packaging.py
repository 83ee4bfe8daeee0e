"""The wheel's declarations against the checkout: dependencies, extras, packages, commands, examples.

pyproject.toml declares what `pip install .` installs; requirements.txt pins
the same runtime packages for deployments and the tests. These read both
files and the source tree, and build nothing: tests/e2e/test_install.py builds
the wheel and runs its commands.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import ptth_lib
from ptth_lib.commands import example_config
from ptth_lib.errors import ConfigError
from ptth_lib.extras import EXTRAS, require_extra

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def pins(path: Path) -> dict[str, Version]:
    """The `name==version` lines of a requirements file (not those it includes), by canonical name."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("-r"):
            continue
        name, sep, version = line.partition("==")
        assert sep, f"{path.name}: {line!r} is not pinned with =="
        found[canonicalize_name(name)] = Version(version)
    return found


def requirements(declared: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in declared]
    return {canonicalize_name(r.name): r for r in reqs}


RUNTIME_PINS = pins(REPO / "requirements.txt")
BASE = requirements(PROJECT["dependencies"])
OPTIONAL = {extra: requirements(reqs) for extra, reqs in PROJECT["optional-dependencies"].items()}


def test_every_runtime_pin_is_a_dependency_of_the_wheel_and_nothing_else_is() -> None:
    declared = [*BASE, *(name for reqs in OPTIONAL.values() for name in reqs)]
    assert len(declared) == len(set(declared)), "a package declared twice"
    assert sorted(declared) == sorted(RUNTIME_PINS), (
        "pyproject.toml's dependencies and extras must name exactly requirements.txt's packages")


@pytest.mark.parametrize("name", sorted(RUNTIME_PINS))
def test_the_wheels_range_admits_the_pin(name: str) -> None:
    req = BASE.get(name) or next(reqs[name] for reqs in OPTIONAL.values() if name in reqs)
    assert req.specifier.contains(RUNTIME_PINS[name]), f"{req} refuses requirements.txt's {RUNTIME_PINS[name]}"
    assert req.specifier, f"{req}: give the range a lower bound at least"
    assert req.marker is None and not req.extras and req.url is None, req


def test_the_extras_bring_what_ptth_lib_extras_names() -> None:
    """`ptth[quic]` and `ptth[cluster]` install the modules whose absence ptth_lib.extras explains."""
    assert {extra: sorted(reqs) for extra, reqs in OPTIONAL.items()} == {
        extra: sorted(canonicalize_name(m) for m in modules) for extra, modules in EXTRAS.items()}


def test_the_build_uses_the_setuptools_the_tests_install() -> None:
    """tests/e2e/test_install.py builds without isolation, with requirements-dev.txt's setuptools."""
    (build_req,) = PYPROJECT["build-system"]["requires"]
    req = Requirement(build_req)
    assert canonicalize_name(req.name) == "setuptools" and str(req.specifier).startswith("==")
    assert pins(REPO / "requirements-dev.txt")["setuptools"] == Version(str(req.specifier)[2:])


def test_the_version_is_declared_once() -> None:
    assert PROJECT["dynamic"] == ["version"] and "version" not in PROJECT
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ptth_lib.__version__"}
    assert Version(ptth_lib.__version__)


def test_every_package_of_ptth_lib_is_in_the_wheel() -> None:
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "ptth_lib").rglob("__init__.py")}
    assert set(SETUPTOOLS["packages"]) == on_disk | {"ptth_lib.conf"}
    assert SETUPTOOLS["package-dir"] == {"ptth_lib.conf": "conf"}


def test_every_data_file_of_ptth_lib_is_in_the_wheel() -> None:
    """Templates, stylesheets and Lua scripts: each matched by a package-data pattern of its package."""
    data = SETUPTOOLS["package-data"]
    tracked = subprocess.run(["git", "ls-files", "ptth_lib"], cwd=REPO, capture_output=True, text=True,
                             check=False).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    for file in tracked:
        path = Path(file)
        if path.suffix == ".py":
            continue
        package = next(p for p in sorted(data, key=len, reverse=True)
                       if path.is_relative_to(Path(*p.split("."))))
        inside = path.relative_to(Path(*package.split(".")))
        assert any(inside.match(pattern) for pattern in data[package]), f"{file} is not in the wheel"


@pytest.mark.parametrize(("command", "target"), sorted(PROJECT["scripts"].items()))
def test_every_command_runs_a_main_of_a_shipped_module(command: str, target: str) -> None:
    module, _, function = target.partition(":")
    assert module in SETUPTOOLS["py-modules"] or module.startswith("ptth_lib."), target
    assert callable(getattr(importlib.import_module(module), function)), target
    assert re.fullmatch(r"ptth(-[a-z]+)+", command)


def test_shipped_entry_points_exist() -> None:
    for module in SETUPTOOLS["py-modules"]:
        assert (REPO / f"{module}.py").is_file(), module


@pytest.mark.parametrize("program", ["relay", "server", "client"])
def test_example_config_is_the_file_in_conf(program: str) -> None:
    """In a checkout --example-config reads conf/; the wheel carries the same files (test_install.py)."""
    assert example_config(program) == (REPO / "conf" / f"{program}.example.toml").read_bytes()
    tomllib.loads(example_config(program).decode())


def test_the_relay_starts_without_the_extras() -> None:
    """Nothing the relay, the server or the client over HTTP imports at start needs an extra."""
    blocked = {m for modules in EXTRAS.values() for m in modules}
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            f"        if name.partition('.')[0] in {sorted(blocked)!r}: raise ImportError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import ptth_relay, ptth_server, ptth_client, ptth_file_server, ptth_lib.relay.app, ptth_lib.server.loop\n"
            "import ptth_lib.forward.http_client, ptth_lib.forward.http_server, ptth_lib.tools.healthcheck\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_a_missing_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(EXTRAS, "quic", ("qh3", "no_such_module_for_ptth"))
    with pytest.raises(ConfigError) as e:
        require_extra("quic", "forwarding over QUIC")
    assert str(e.value) == ("forwarding over QUIC needs the Python package no_such_module_for_ptth, which is not "
                            "installed: install PTTH with its quic extra (pip install 'ptth[quic]'), or "
                            "requirements.txt")
    monkeypatch.setitem(EXTRAS, "quic", ("qh3",))
    require_extra("quic", "forwarding over QUIC")
