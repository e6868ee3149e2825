"""The coverage table (issue 12 Build 4): every quantization method of the installed transformers
has a row, each row's strategy really claims its method, each named test exists, and the docs
page and ``kbitprep backends --methods`` show the same rows."""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path

import pytest

from kbitprep._coverage import ROWS, installed_methods, render_markdown, rows_for_installed, uncovered
from kbitprep._registry import get_backend

ROOT = Path(__file__).resolve().parent.parent


def test_every_installed_transformers_method_has_a_row() -> None:
    """Fails when transformers adds a QuantizationMethod that no row covers."""
    methods = installed_methods()
    assert "gptq" in methods and "bitsandbytes" in methods
    assert uncovered(methods) == ()


def test_a_method_without_a_row_is_reported() -> None:
    assert uncovered(("gptq", "a_method_from_the_future")) == ("a_method_from_the_future",)


def test_rows_are_unique_and_name_registered_strategies() -> None:
    methods = [row.method for row in ROWS]
    assert len(methods) == len(set(methods))
    for row in ROWS:
        backend = get_backend(row.strategy)
        if row.strategy in ("generic", "none"):
            assert not any(row.method in get_backend(r.strategy).quant_methods for r in ROWS), row.method
        else:
            assert row.method in backend.quant_methods, (row.method, row.strategy)


def test_every_named_test_exists() -> None:
    for row in ROWS:
        for ref in row.tests:
            path, _, name = ref.partition("::")
            source = (ROOT / path).read_text()
            assert re.search(rf"^def {re.escape(name)}\(", source, re.MULTILINE), ref


def test_docs_page_is_generated_from_the_rows() -> None:
    page = (ROOT / "docs" / "backends" / "coverage.md").read_text()
    generated_for = re.search(r"for transformers (\S+);", page)
    assert generated_for is not None
    if generated_for.group(1) != version("transformers"):
        pytest.skip(f"the page is generated for transformers {generated_for.group(1)}, not {version('transformers')}")
    assert page == render_markdown(rows_for_installed(), version("transformers")), (
        "docs/backends/coverage.md is stale: run `python -m kbitprep._coverage`"
    )


def test_cli_backends_methods_json_lists_every_installed_method(capsys: pytest.CaptureFixture[str]) -> None:
    from kbitprep.cli import main

    assert main(["backends", "--methods", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["method"] for d in data] == list(installed_methods())
    by_method = {d["method"]: d for d in data}
    assert by_method["quanto"]["strategy"] == "quanto"
    assert by_method["awq"]["tests"][0].startswith("tests/backends/test_awq.py::")


def test_cli_backends_methods_table(capsys: pytest.CaptureFixture[str]) -> None:
    from kbitprep.cli import main

    assert main(["backends", "--methods"]) == 0
    out = capsys.readouterr().out
    assert "transformers quantization methods" in out
    assert all(m in out for m in ("mxfp4", "bitnet", "quanto", "awq"))
