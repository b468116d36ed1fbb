"""Shared by the benchmark scripts: the markdown table, the machine line and RESULTS.md (newest first)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Sequence

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    widths = [max(len(str(r[i])) for r in [*rows, header]) for i in range(len(header))]
    lines = ["| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |",
             "| " + " | ".join("-" * w for w in widths) + " |"]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def prepend(head: str, table: str) -> Path:
    """Insert a ``## head`` section with the table after RESULTS.md's introduction."""
    prev = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nNewest first.\n"
    intro, _, rest = prev.partition("\n## ")
    RESULTS.write_text(intro.rstrip() + "\n\n" + head + "\n\n" + table + "\n" + ("\n## " + rest if rest else ""))
    return RESULTS
