"""echolabel's benchmark suite: `echolabel bench` (docs/performance.md).

Benchmarks are scripts that print numbers measured in one run, side by side, with ratios
against baselines measured in the same run; tests only check that they run and parse.
"""

from __future__ import annotations

import importlib

# pyproject's `bench` extra, import name → package: the structures the suite compares and its
# RSS readings. The product does not need them itself, so a plain install may lack them.
EXTRA_MODULES = {"hnswlib": "hnswlib", "sklearn": "scikit-learn", "psutil": "psutil"}
INSTALL_EXTRA = 'pip install -e ".[bench]"'


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """What to tell the user when an import of the bench extra failed; None for any other
    missing module (that one is a bug, not an install choice)."""
    module = (exc.name or "").partition(".")[0]
    if module not in EXTRA_MODULES:
        return None
    package = EXTRA_MODULES[module]
    named = module if package == module else f"{module} (package {package})"
    return (
        f"bench needs {named}, which comes with the bench extra and is not installed: "
        f"run `{INSTALL_EXTRA}` in the repository root "
        f"(it adds {', '.join(sorted(EXTRA_MODULES.values()))})"
    )


def require_extra() -> None:
    """Import the whole extra up front, so that a run without it stops before its first
    section (a full run takes 46 min) with ModuleNotFoundError naming the module."""
    for module in EXTRA_MODULES:
        importlib.import_module(module)
