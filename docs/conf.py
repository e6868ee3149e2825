"""Sphinx configuration for the kbitprep documentation (MyST Markdown, furo theme)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.parsers.rst import Directive
from docutils.statemachine import StringList

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # autodoc imports kbitprep from the checkout when not installed

project = "kbitprep"
author = "kbitprep developers"
copyright = "2025, kbitprep developers"
release = "0.1.0"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = "kbitprep"

# Google-style docstrings (STYLE.md §6); attributes as :ivar: so dataclass fields are not
# described twice
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"show-inheritance": True}
# heavy or optional libraries the docstrings may mention; kbitprep itself imports only torch
autodoc_mock_imports: list[str] = []

intersphinx_mapping: dict[str, tuple[str, str | None]] = {}


class BenchTable(Directive):
    """``bench-table``: the metrics of benchmarks/results.json as a table."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        path = ROOT / "benchmarks" / "results.json"
        if not path.is_file():
            para = nodes.paragraph(text="benchmarks/results.json is missing: run `nox -s bench`.")
            return [para]
        rows: list[dict[str, Any]] = json.loads(path.read_text())

        def fmt(value: float, unit: str) -> str:
            if unit == "bytes":
                return f"{value / 1e6:,.2f} MB"
            if unit == "s":
                return f"{value * 1000:,.1f} ms" if value < 1 else f"{value:,.2f} s"
            return f"{value:.4f}"

        lines = [".. list-table::", "   :header-rows: 1", ""]
        header = ["metric", "kbitprep", "baseline", "ratio", "target", "result"]
        lines.append("   * - " + "\n     - ".join(header))
        for r in rows:
            base = fmt(r["peft"], r["unit"])
            if r.get("baseline") and r["baseline"] != "peft 0.21.2":
                base += f" ({r['baseline']})"
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}x"
            met = r.get("met")
            result = "met" if met else (r.get("note") or ("missed" if met is False else "-"))
            cells = [r["name"], fmt(r["kbitprep"], r["unit"]), base, ratio, r.get("target") or "-", result]
            lines.append("   * - " + "\n     - ".join(c.replace("*", "\\*") for c in cells))
        node = nodes.container()
        self.state.nested_parse(StringList(lines, source=str(path)), self.content_offset, node)
        return node.children


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("bench-table", BenchTable)
    return {"parallel_read_safe": True}
