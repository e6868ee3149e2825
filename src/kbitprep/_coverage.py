"""Which kbitprep strategy covers each transformers quantization method, built from the strategies.

One row per ``transformers.utils.quantization_config.QuantizationMethod`` value (26 in
transformers 5.24, ``quantizers/auto.py``). Each cell comes from the strategy that covers the
method, never from a second description of it:

- ``strategy``: the registered strategy whose ``quant_methods`` claims the method (the one
  :func:`kbitprep.detect_backend` would rank first: highest ``priority``, a plugin before a
  built-in of equal priority); for a method no strategy claims, the ``fallback`` strategy that
  declares it (``none`` for GGUF, ``generic`` for the rest), else ``generic``.
- ``storage``, ``trains``, ``note``: that strategy's :attr:`~kbitprep.QuantBackend.method_facts`
  entry for the method (:class:`~kbitprep.backends.base.MethodFacts`); an unclaimed method that
  no fallback declares gets :data:`kbitprep.backends.generic.UNDECLARED`.
- ``upcast``: ``"nothing"`` when the strategy inherits ``QuantBackend.should_upcast`` (which
  casts nothing), else the strategy's ``upcast_rule``, declared beside its override.

``kbitprep backends --methods`` prints these rows and ``docs/backends/coverage.md`` is written
from them (``python -m kbitprep._coverage``), so the command and the page cannot disagree. Which
tests check each method is not shipped: the page's "tested here" column is read from
``tests/coverage_tests.json`` when the page is generated from the repository.
tests/test_coverage.py fails when the installed transformers has a method no strategy declares,
when a row's strategy does not claim its method, or when the JSON names a test that does not exist.

Nothing here imports transformers except :func:`installed_methods`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kbitprep.backends.base import MethodFacts, QuantBackend

__all__ = [
    "CoverageRow",
    "declared_methods",
    "installed_methods",
    "load_tests",
    "render_markdown",
    "rows_for",
    "rows_for_installed",
    "uncovered",
    "upcast_of",
]

NO_UPCAST = "nothing"
"""The upcast cell of a strategy that inherits ``QuantBackend.should_upcast`` (default: no)."""

TESTS_FILE = "tests/coverage_tests.json"
"""Where the repository lists, per method, the tests that check it (``"path::test_name"``)."""


@dataclass(frozen=True, slots=True)
class CoverageRow:
    """One quantization method.

    Attributes:
        method: The ``QuantizationMethod`` value (``quant_method`` in a config), e.g. ``"gptq"``.
        strategy: The kbitprep backend that covers it (``generic`` when none claims it).
        storage: What the quantized layers hold, with dtypes (declared by the strategy).
        upcast: What ``upcast="auto"`` casts (from the strategy's ``should_upcast``).
        trains: Whether LoRA adapters train on it, and under which form (declared).
        note: Why it is untested or does not work on a CPU, when it is not plain (declared).
    """

    method: str
    strategy: str
    storage: str
    upcast: str
    trains: str
    note: str = ""


def installed_methods() -> tuple[str, ...]:
    """The ``QuantizationMethod`` values of the installed transformers (imports transformers).

    Raises:
        BackendUnavailableError: transformers is not installed (the table lists its methods).
    """
    try:
        from transformers.utils.quantization_config import QuantizationMethod
    except ImportError as exc:
        from kbitprep._errors import BackendUnavailableError

        raise BackendUnavailableError(
            f"The table of quantization methods lists those of the installed transformers, which cannot be "
            f"imported ({exc}). Install it with `pip install transformers`.",
            install_hint="pip install transformers",
        ) from exc

    return tuple(str(m.value) for m in QuantizationMethod)


def upcast_of(cls: type[QuantBackend]) -> str:
    """The "auto upcast" cell of a strategy: ``"nothing"`` when it inherits
    ``QuantBackend.should_upcast``, else its declared ``upcast_rule`` (a strategy that overrides
    ``should_upcast`` without one is named as deciding for itself)."""
    if cls.should_upcast is QuantBackend.should_upcast:
        return NO_UPCAST
    return cls.upcast_rule or f"what {cls.name}.should_upcast decides (no upcast_rule declared)"


def _strategies() -> list[type[QuantBackend]]:
    """Every registered strategy class that loads, in the order :func:`kbitprep.detect_backend`
    ranks claims: highest priority first, a plugin before a built-in of equal priority."""
    from kbitprep._registry import _registry

    ranked: list[tuple[int, int, int, type[QuantBackend]]] = []
    for order, name in enumerate(_registry.names()):
        try:
            cls = _registry.get_class(name)
        except Exception:  # a broken plugin covers nothing; `kbitprep backends` reports it
            continue
        builtin = _registry.sources.get(name, "builtin") == "builtin"
        ranked.append((-int(cls.priority), order if builtin else -1, order, cls))
    return [cls for *_key, cls in sorted(ranked, key=lambda r: r[:3])]


def _cover(method: str, strategies: Sequence[type[QuantBackend]]) -> tuple[type[QuantBackend], MethodFacts | None]:
    """The strategy that covers ``method`` and the facts it declares for it (``None``: none)."""
    from kbitprep.backends.generic import GenericBackend

    for cls in strategies:
        if not cls.fallback and method in cls.quant_methods:
            return cls, cls.method_facts.get(method)
    for cls in strategies:
        if cls.fallback and method in cls.method_facts:
            return cls, cls.method_facts[method]
    generic = next((c for c in strategies if c.name == GenericBackend.name), GenericBackend)
    return generic, None


def declared_methods() -> tuple[str, ...]:
    """Every method a registered strategy declares facts for, sorted."""
    return tuple(sorted({m for cls in _strategies() for m in cls.method_facts}))


def uncovered(methods: Iterable[str]) -> tuple[str, ...]:
    """The methods in ``methods`` that no strategy declares: its claiming strategy has no
    ``method_facts`` entry for it or, unclaimed, no fallback strategy declares it."""
    strategies = _strategies()
    return tuple(m for m in methods if _cover(m, strategies)[1] is None)


def rows_for(methods: Iterable[str]) -> tuple[CoverageRow, ...]:
    """One row per method, in the given order, built from the strategy that covers it.

    An unclaimed method no fallback declares gets ``generic``'s
    :data:`~kbitprep.backends.generic.UNDECLARED` facts; a claimed one whose strategy declares
    nothing says so in every declared cell.
    """
    from kbitprep.backends.generic import UNDECLARED

    strategies = _strategies()
    out = []
    for method in methods:
        cls, facts = _cover(method, strategies)
        if facts is None:
            facts = (
                UNDECLARED
                if cls.fallback
                else MethodFacts("not declared", "not declared", f"the {cls.name} strategy declares no method_facts")
            )
        out.append(CoverageRow(method, cls.name, facts.storage, upcast_of(cls), facts.trains, facts.note))
    return tuple(out)


def rows_for_installed() -> tuple[CoverageRow, ...]:
    """The rows of the installed transformers' methods, in its enum order."""
    return rows_for(installed_methods())


def render_markdown(
    rows: Sequence[CoverageRow], transformers_version: str, tests: Mapping[str, Sequence[str]] | None = None
) -> str:
    """The docs page: one table row per method.

    Args:
        rows: The rows, e.g. :func:`rows_for_installed`.
        transformers_version: The transformers version the rows were built for.
        tests: ``method -> ["path::test_name", ...]`` (the repository's ``tests/coverage_tests.json``)
            for a "tested here" column; ``None`` leaves the column out.
    """
    columns = ["method", "strategy", "storage", "auto upcast", "trains", *(["tested here"] if tests else []), "note"]
    tested = " The tests named here run on real quantized weights on a CPU unless the note says otherwise."
    lines = [
        "# Coverage: every transformers quantization method",
        "",
        f"Generated by `python -m kbitprep._coverage` from what each strategy declares (`method_facts`, "
        f"`upcast_rule`) for transformers {transformers_version}; `kbitprep backends --methods` prints the same "
        "rows. 'strategy' is the backend whose `quant_methods` claims the method, or the fallback that covers it; "
        "'auto upcast' is what `upcast=\"auto\"` casts (nothing unless the strategy overrides `should_upcast`)."
        + (tested if tests else ""),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = [f"`{row.method}`", f"`{row.strategy}`", row.storage, row.upcast, row.trains]
        if tests:
            cells.append("<br>".join(f"`{t}`" for t in tests.get(row.method, ())) or "no")
        cells.append(row.note)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def load_tests(path: str | Path = TESTS_FILE) -> dict[str, tuple[str, ...]]:
    """The repository's ``method -> tests`` mapping (a JSON object of lists of strings)."""
    data = json.loads(Path(path).read_text())
    return {str(method): tuple(str(t) for t in refs) for method, refs in data.items()}


def _main(argv: list[str]) -> int:
    """Write the docs page from the installed transformers: ``[OUT [TESTS_JSON]]``, by default
    docs/backends/coverage.md and tests/coverage_tests.json (run from the repository root)."""
    from importlib.metadata import version

    out = Path(argv[0] if argv else "docs/backends/coverage.md")
    tests_file = Path(argv[1] if len(argv) > 1 else TESTS_FILE)
    if not tests_file.is_file():
        sys.stderr.write(f"{tests_file} not found: run from the repository root, or name the tests JSON.\n")
        return 2
    out.write_text(render_markdown(rows_for_installed(), version("transformers"), load_tests(tests_file)))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
