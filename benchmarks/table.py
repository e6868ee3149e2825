"""Print benchmarks/results.json as a Markdown table (the one in docs/benchmarks.md).

Usage: ``python benchmarks/table.py [results.json]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import fmt  # noqa: E402  (one formatter for the console table and this one)


def result(row: dict[str, Any]) -> str:
    met = row.get("met")
    if met is None:
        return row.get("note") or ""
    text = "met" if met else "**missed**"
    detail = row.get("detail") or ""
    if met and "within noise" in detail:
        text = "met within noise"
    if row.get("ratio_interval"):
        lo, hi, cov = row["ratio_interval"]
        text += f" (CI {lo:.2f}–{hi:.2f}, {cov:.0%})"
    return text


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| metric | kbitprep | baseline | ratio | target | result |", "|---|---|---|---|---|---|"]
    for r in rows:
        base = fmt(r["peft"], r["unit"])
        if r.get("baseline") and r["baseline"] != "peft 0.21.2":
            base += f" ({r['baseline']})"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}×"
        cells = [r["name"], fmt(r["kbitprep"], r["unit"]), base, ratio, r.get("target") or "", result(r)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else HERE / "results.json"
    print(table(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
