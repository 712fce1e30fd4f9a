"""Every Python package in the tree is in pyproject's package list, so a non-editable install
(the Dockerfile's `pip install .`) ships all of it."""

from __future__ import annotations

import tomllib

from tests.helpers import ROOT


def test_every_package_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    roots = {name: ROOT / path for name, path in config["package-dir"].items() if name}
    found = set()
    for top in listed & {p.split(".")[0] for p in listed}:
        base = roots.get(top, ROOT / top)
        for init in base.rglob("__init__.py"):
            parts = init.parent.relative_to(base).parts
            found.add(".".join((top, *parts)))
    assert found - listed == set(), "add these to [tool.setuptools] packages"
