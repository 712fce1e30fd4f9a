"""Result tables, the machine they were measured on, and their JSON / markdown forms.

A section returns a `SectionResult`: tables of rows (plain dicts, so the JSON is the data) plus
findings (decisions and explanations drawn from the same run). Skipped cells are never dropped
silently: each is a note on its table that says why.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

Row = dict[str, Any]


@dataclass
class Table:
    """One printed table: columns as (key, label) pairs, rows keyed by those keys."""

    title: str
    columns: list[tuple[str, str]]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def skip(self, where: str, reason: str) -> None:
        """Record a cell that was not measured and why (printed under the table)."""
        self.notes.append(f"skipped {where}: {reason}")

    def markdown(self) -> str:
        header = "| " + " | ".join(label for _, label in self.columns) + " |"
        rule = "|" + "|".join("---" for _ in self.columns) + "|"
        body = [
            "| " + " | ".join(format_value(key, row.get(key)) for key, _ in self.columns) + " |"
            for row in self.rows
        ]
        notes = [f"- {note}" for note in self.notes]
        return "\n".join([f"**{self.title}**", "", header, rule, *body, *(["", *notes])])

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "columns": [list(column) for column in self.columns],
            "rows": self.rows,
            "notes": self.notes,
        }


@dataclass
class SectionResult:
    """What one section measured: its tables and the findings drawn from them."""

    name: str
    tables: list[Table] = field(default_factory=list)
    findings: dict[str, Any] = field(default_factory=dict)

    def table(self, title: str, columns: list[tuple[str, str]]) -> Table:
        created = Table(title, columns)
        self.tables.append(created)
        return created

    def markdown(self) -> str:
        parts = [table.markdown() for table in self.tables]
        if self.findings:
            parts.append(
                "**findings**\n\n```json\n" + json.dumps(self.findings, indent=2) + "\n```"
            )
        return "\n\n".join(parts)


def format_value(key: str, value: Any) -> str:
    """Readable cell text: ratios as `n×`, recall with 3 decimals, 3 significant digits."""
    if value is None:
        return "–"
    if isinstance(value, (bool, str)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not isinstance(value, float):
        return str(value)
    if key.endswith("_x"):
        return f"{_significant(value)}×"
    if "recall" in key:
        return f"{value:.3f}"
    return _significant(value)


def _significant(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def machine() -> dict[str, Any]:
    """What the numbers were measured on, including how busy the machine was."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_average_1m": load_average(),
    }
    for package in ("numpy", "scipy", "torch", "qdrant-client", "qdrant-edge-py", "hnswlib"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    return info


def describe(info: dict[str, Any]) -> str:
    """One line for a README table caption."""
    return (
        f"{info['cpu']}, {info['usable_cores']} cores, {info['memory_gib']} GiB, "
        f"Python {info['python']}, load {info.get('load_average_1m_at_start')} at start, "
        f"{info.get('load_average_1m')} at end"
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write(
    result: SectionResult,
    out_dir: Path,
    *,
    mode: str,
    command: str,
    load_at_start: float | None = None,
    elapsed_s: float | None = None,
) -> Path:
    """Write `<section>.json` and `<section>.md` under out_dir; return the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Other work on a shared machine skews timings: the load before and after says how much.
    stamp = {
        "section": result.name,
        "mode": mode,
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "elapsed_s": elapsed_s,
        "machine": {**machine(), "load_average_1m_at_start": load_at_start},
    }
    path = out_dir / f"{result.name}.json"
    document = {
        **stamp,
        "tables": [t.to_json() for t in result.tables],
        "findings": result.findings,
    }
    path.write_text(json.dumps(document, indent=2, default=_jsonable) + "\n")
    caption = f"{stamp['date']}, {mode} run (`{command}`), {describe(stamp['machine'])}"
    (out_dir / f"{result.name}.md").write_text(f"{caption}\n\n{result.markdown()}\n")
    return path


def _jsonable(value: object) -> object:
    # numpy scalars and paths reach the rows through measured values.
    if hasattr(value, "item"):
        return value.item()  # type: ignore[no-any-return, attr-defined]
    return str(value)
