"""Dependency floors exclude releases known to be unsafe for what stgpt does with them."""
from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:
    tomllib = pytest.importorskip("tomli")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# package -> (a release the floor must exclude, why)
UNSAFE = {
    "python-multipart": ("0.0.17", "CVE-2024-53981: a crafted multipart boundary stalls the Serve endpoint"),
    "ray": ("2.51.2", "no token authentication (RAY_AUTH_MODE=token came in 2.52.0); the clusters rely on it"),
}


def test_floors_exclude_unsafe_releases_and_the_installed_ones_pass():
    requirements = {Requirement(r).name: Requirement(r)
                    for r in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]}
    for name, (unsafe, why) in UNSAFE.items():
        spec = requirements[name].specifier
        assert not spec.contains(Version(unsafe)), f"{name} {unsafe} is allowed: {why}"
        assert spec.contains(Version(version(name))), f"installed {name} {version(name)} is below {spec}"
