"""Keeps benchmarks/RESULTS.md up to date: each benchmark owns one section and rewrites only that.

A section is the text between `<!-- name:start -->` and `<!-- name:end -->`, so benchmarks can rerun in any
order without touching each other's figures.
"""
from __future__ import annotations

import os
import platform
import re
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
TITLE = "# Benchmark results\n"


def write_section(name: str, markdown: str, path: Path = RESULTS) -> None:
    """Replace section `name` of RESULTS.md with `markdown`; append it, or create the file, if absent."""
    if not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"section name {name!r} must be letters, digits, '_', '.' or '-'")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else TITLE
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def machine_info() -> str:
    """One line on where and when a benchmark ran, for its section."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", load average %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = platform.processor() or platform.machine()
    return f"{cpus} CPU cores ({machine}), Python {platform.python_version()}{load}, {when}"
