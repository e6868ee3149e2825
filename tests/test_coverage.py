"""The coverage table (issue 12 Build 4) is built from what the strategies declare: every
quantization method of the installed transformers has a row, each row's strategy really claims its
method, the declarations agree with the code and with transformers, every test named in
tests/coverage_tests.json exists, and the docs page and ``kbitprep backends --methods`` show the
same rows.

tests/coverage_tests.json maps a ``quant_method`` to the tests (``"path::test_name"``) that check
it on real quantized weights; it stays out of the installed package, and the docs page's "tested
here" column is generated from it (``python -m kbitprep._coverage``).
"""

from __future__ import annotations

import inspect
import json
import re
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from torch import nn

from kbitprep import QuantBackend
from kbitprep._coverage import (
    declared_methods,
    installed_methods,
    load_tests,
    render_markdown,
    rows_for,
    rows_for_installed,
    uncovered,
    upcast_of,
)
from kbitprep._registry import _registry, builtin_names, get_backend
from kbitprep.backends.base import MethodFacts
from kbitprep.backends.generic import REFUSED_BY_TRANSFORMERS, UNDECLARED, UNKNOWN_TRAINING, GenericBackend

ROOT = Path(__file__).resolve().parent.parent
TESTS_JSON = ROOT / "tests" / "coverage_tests.json"


def _builtins() -> dict[str, type[QuantBackend]]:
    return {name: _registry.get_class(name) for name in builtin_names()}


def test_every_installed_transformers_method_has_a_row() -> None:
    """Fails when transformers adds a QuantizationMethod that no strategy declares."""
    methods = installed_methods()
    assert "gptq" in methods and "bitsandbytes" in methods
    assert uncovered(methods) == ()


def test_a_method_without_a_row_is_reported_and_falls_to_generic() -> None:
    assert uncovered(("gptq", "a_method_from_the_future")) == ("a_method_from_the_future",)
    (row,) = rows_for(("a_method_from_the_future",))
    assert (row.strategy, row.storage, row.upcast, row.trains, row.note) == (
        "generic",
        UNDECLARED.storage,
        "nothing",
        UNKNOWN_TRAINING,
        UNDECLARED.note,
    )


def test_every_row_names_the_strategy_that_claims_its_method() -> None:
    rows = rows_for_installed()
    assert len({row.method for row in rows}) == len(rows)
    specific = [cls for cls in _builtins().values() if not cls.fallback]
    for row in rows:
        cls = type(get_backend(row.strategy))
        if cls.fallback:
            assert not any(row.method in c.quant_methods for c in specific), row.method
            assert row.method in cls.method_facts, (row.method, row.strategy)
        else:
            assert row.method in cls.quant_methods, (row.method, row.strategy)
    by_method = {row.method: row.strategy for row in rows}
    if "gguf" in by_method:  # transformers 5 lists gguf (dequantized while loading); 4.57 does not
        assert by_method["gguf"] == "none"


def test_declarations_belong_to_the_strategy_that_covers_the_method() -> None:
    """A specific strategy declares only methods it claims; a fallback only methods no specific
    strategy claims, and no two fallbacks the same one."""
    classes = _builtins()
    claimed = {m for cls in classes.values() if not cls.fallback for m in cls.quant_methods}
    seen: dict[str, str] = {}
    for name, cls in classes.items():
        assert all(isinstance(f, MethodFacts) for f in cls.method_facts.values()), name
        if not cls.fallback:
            assert set(cls.method_facts) <= cls.quant_methods, name
            continue
        assert not set(cls.method_facts) & claimed, name
        for method in cls.method_facts:
            assert seen.setdefault(method, name) == name, method
    assert set(declared_methods()) >= set(installed_methods())


def test_upcast_cell_comes_from_should_upcast() -> None:
    """A strategy that inherits should_upcast upcasts nothing and declares no upcast_rule; one
    that overrides it declares the rule, and the rule it states (peft's: fp16/bf16 go up) is what
    its should_upcast answers for a plain Linear's weight."""
    for name, cls in _builtins().items():
        overrides = cls.should_upcast is not QuantBackend.should_upcast
        assert bool(cls.upcast_rule) == overrides, name
        assert upcast_of(cls) == (cls.upcast_rule if overrides else "nothing"), name
        if overrides:
            module = nn.Linear(2, 2)
            cast = {
                dtype
                for dtype in (torch.float16, torch.bfloat16, torch.float32)
                if get_backend(name).should_upcast("weight", nn.Parameter(module.weight.to(dtype)), module)
            }
            assert cast == {torch.float16, torch.bfloat16}, name
            assert "peft's" in cls.upcast_rule, name


def test_generic_rows_match_what_the_transformers_quantizer_says() -> None:
    """generic refuses exactly what the quantizer marks not trainable (the inherited
    check_trainable): a row saying "no: refused" names a quantizer whose is_trainable is False
    whatever its config, an "unknown" row one whose is_trainable is True. Rows whose answer depends
    on the config ("refused unless ...") are not checked here."""
    auto = pytest.importorskip("transformers.quantizers.auto")
    checked = 0
    for method, facts in GenericBackend.method_facts.items():
        quantizer = auto.AUTO_QUANTIZER_MAPPING.get(method)
        prop = inspect.getattr_static(quantizer, "is_trainable", None) if quantizer is not None else None
        if not isinstance(prop, property) or prop.fget is None:
            continue  # not in this transformers, or not a property there
        if facts.trains == REFUSED_BY_TRANSFORMERS or facts.trains.startswith("no: refused"):
            assert prop.fget(SimpleNamespace()) is False, method
            checked += 1
        elif facts.trains == UNKNOWN_TRAINING:
            assert prop.fget(SimpleNamespace()) is True, method
            checked += 1
    assert checked


def test_every_named_test_exists() -> None:
    tests = load_tests(TESTS_JSON)
    assert tests and set(tests) <= set(declared_methods())
    for method, refs in tests.items():
        assert refs, method
        for ref in refs:
            path, _, name = ref.partition("::")
            source = (ROOT / path).read_text()
            assert re.search(rf"^def {re.escape(name)}\(", source, re.MULTILINE), ref


def test_the_package_ships_no_test_paths() -> None:
    for row in rows_for(declared_methods()):
        for cell in (row.storage, row.upcast, row.trains, row.note):
            assert "tests/" not in cell and "::test_" not in cell, (row.method, cell)


def test_a_registered_strategy_claiming_a_method_takes_its_row(clean_registry: None) -> None:
    from kbitprep import register_backend

    class SinqStrategy(QuantBackend):
        name = "sinq-coverage-test"
        quant_methods: ClassVar[frozenset[str]] = frozenset({"sinq"})
        method_facts: ClassVar[dict[str, MethodFacts]] = {"sinq": MethodFacts("SINQ weights", "yes")}

        def detect(self, model: nn.Module) -> str | None:
            return None

    register_backend(SinqStrategy)
    (row,) = rows_for(("sinq",))
    assert (row.strategy, row.storage, row.upcast, row.trains, row.note) == (
        "sinq-coverage-test",
        "SINQ weights",
        "nothing",
        "yes",
        "",
    )


def test_docs_page_is_generated_from_the_strategies() -> None:
    page = (ROOT / "docs" / "backends" / "coverage.md").read_text()
    generated_for = re.search(r"for transformers (\S+);", page)
    assert generated_for is not None
    if generated_for.group(1) != version("transformers"):
        pytest.skip(f"the page is generated for transformers {generated_for.group(1)}, not {version('transformers')}")
    assert page == render_markdown(rows_for_installed(), version("transformers"), load_tests(TESTS_JSON)), (
        "docs/backends/coverage.md is stale: run `python -m kbitprep._coverage`"
    )


def test_cli_backends_methods_json_lists_every_installed_method(capsys: pytest.CaptureFixture[str]) -> None:
    from kbitprep.cli import main

    assert main(["backends", "--methods", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["method"] for d in data] == list(installed_methods())
    assert all(set(d) == {"method", "strategy", "storage", "upcast", "trains", "note"} for d in data)
    by_method = {d["method"]: d for d in data}
    assert by_method["quanto"]["strategy"] == "quanto"
    assert by_method["bitsandbytes"]["upcast"] == get_backend("bitsandbytes").upcast_rule


def test_cli_backends_methods_table(capsys: pytest.CaptureFixture[str]) -> None:
    from kbitprep.cli import main

    assert main(["backends", "--methods"]) == 0
    out = capsys.readouterr().out
    assert "transformers quantization methods" in out
    assert all(m in out for m in ("mxfp4", "bitnet", "quanto", "awq"))
