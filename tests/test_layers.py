"""Imports run one way (DESIGN.md, "Layers"): pyproject's import-linter contracts hold, and
every product module sits in a layer, so a new module cannot slip past them."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = {
    "echolabel": ROOT / "echolabel",
    "backend": ROOT / "backend",
    "workers": ROOT / "workers",
}
PRODUCT["vectorstore"] = ROOT / "qdrant" / "vectorstore"


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _layer_modules() -> list[str]:
    (layers,) = [c for c in _contracts() if c["type"] == "layers"]
    names = []
    for layer in layers["layers"]:
        names += [n.strip() for n in layer.replace("|", ":").split(":") if n.strip()]
    return names


def test_import_linter_contracts_hold():
    # Run as a program, as CI would: the same grimp graph import-linter builds for a developer.
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
            "--no-cache",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'qdrant'}"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_every_product_module_belongs_to_a_layer():
    layered = _layer_modules()
    loose = []
    for package, folder in PRODUCT.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            module = ".".join(parts)
            covered = any(module == m or module.startswith(m + ".") for m in layered)
            # A package's own __init__ (echolabel, workers) holds no code to place.
            if not covered and path.name != "__init__.py":
                loose.append(module)
    assert not loose, f"modules outside every layer of pyproject's contract: {sorted(loose)}"
