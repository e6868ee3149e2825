"""Sphinx configuration for the kbitprep documentation (MyST Markdown, furo theme)."""

from __future__ import annotations

import sys
from pathlib import Path

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

# the docstrings are Google style (the project's convention); attributes as :ivar: so
# dataclass fields are not described twice
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"show-inheritance": True}
# heavy or optional libraries the docstrings may mention; kbitprep itself imports only torch
autodoc_mock_imports: list[str] = []

intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
