"""The result every benchmark returns: tables for people, a dict for --json."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        self.rows.append(list(cells))


@dataclass
class Report:
    name: str
    tables: list[Table] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def table(self, title: str, columns: list[str]) -> Table:
        t = Table(title, columns)
        self.tables.append(t)
        return t

    def print(self, *, json_output: bool = False) -> None:
        if json_output:
            doc = {"bench": self.name, **self.data}
            if self.notes:
                doc["notes"] = self.notes
            json.dump(doc, sys.stdout, indent=2, default=str)
            sys.stdout.write("\n")
            return
        from rich.console import Console
        from rich.table import Table as RichTable

        console = Console()
        for t in self.tables:
            rt = RichTable(title=t.title, title_justify="left")
            for col in t.columns:
                rt.add_column(col, justify="left" if col == t.columns[0] else "right")
            for row in t.rows:
                rt.add_row(*(fmt(c) for c in row))
            console.print(rt)
        for note in self.notes:
            console.print(f"[dim]{note}[/dim]")


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    if value is None:
        return "-"
    return str(value)


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]
