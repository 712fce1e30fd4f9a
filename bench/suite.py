"""Run the benchmark sections, print their tables, write `<section>.json` / `.md` results."""

from __future__ import annotations

import dataclasses
import importlib
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from . import profiles, report
from .report import SectionResult

SECTIONS = ("search", "latency", "embedding", "memory", "embedded")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"

Log = Callable[[str], None]


class Section(Protocol):
    def run(self, profile: profiles.Profile, log: Log) -> SectionResult: ...


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(
    profile: profiles.Profile,
    sections: Sequence[str] = SECTIONS,
    out_dir: Path = DEFAULT_OUT,
    *,
    command: str = "",
    log: Log = log_to_stderr,
) -> dict[str, Path]:
    """Run `sections` in order; print each one's markdown; return the JSON file of each."""
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(
            f"unknown bench section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}"
        )
    written = {}
    for name in sections:
        module: Section = importlib.import_module(f"bench.{name}")  # type: ignore[assignment]
        load = report.load_average()
        log(f"== {name} ({profile.name}) ==")
        started = time.perf_counter()
        result = module.run(profile, log)
        elapsed = time.perf_counter() - started
        print(result.markdown(), flush=True)
        written[name] = report.write(
            result,
            out_dir,
            mode=profile.name,
            command=command,
            load_at_start=load,
            elapsed_s=elapsed,
        )
        log(f"wrote {written[name]} ({name} took {elapsed:.0f} s)")
    return written


def run_from_cli(
    smoke: bool,
    only: str | None,
    out: Path | None,
    argv: Sequence[str],
    embedded_large: int | None = None,
) -> int:
    """`echolabel bench [--smoke] [--only a,b] [--out DIR] [--embedded-large N]`."""
    profile = profiles.smoke() if smoke else profiles.full()
    if embedded_large is not None:
        profile = dataclasses.replace(
            profile, embedded=dataclasses.replace(profile.embedded, large=embedded_large)
        )
    sections = [s.strip() for s in only.split(",") if s.strip()] if only else list(SECTIONS)
    run(profile, sections, out or DEFAULT_OUT, command="echolabel " + " ".join(argv))
    return 0
