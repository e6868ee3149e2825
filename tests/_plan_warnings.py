"""Finding warnings by kind and text: every assertion on a plan warning names its kind (one of
``kbitprep.WARNING_KINDS``), and on an emitted warning its category, with the text only where it
tells two warnings of that kind apart."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from kbitprep import KbitPrepWarning, PlanWarning
from kbitprep._errors import WARNING_KINDS


def _plan_warnings(source: Any) -> tuple[PlanWarning, ...]:
    if isinstance(source, Mapping):  # PreparationPlan.to_dict(): the texts and their kinds side by side
        return tuple(PlanWarning(k, w) for k, w in zip(source["warning_kinds"], source["warnings"], strict=True))
    found = tuple(getattr(source, "warnings", source))
    assert all(isinstance(w, PlanWarning) for w in found), f"not PlanWarnings: {found!r}"
    return found


def warnings_of(source: Any, kind: str, text: str = "") -> list[PlanWarning]:
    """The warnings of ``source`` (a plan or report, its ``to_dict()``, or the warnings themselves)
    of ``kind`` whose text contains ``text``; an unknown kind fails, so a misspelt one cannot
    silently match nothing."""
    assert kind in WARNING_KINDS, f"unknown warning kind {kind!r}; one of {sorted(WARNING_KINDS)}"
    return [w for w in _plan_warnings(source) if w.kind == kind and text in w]


def warning_of(source: Any, kind: str, text: str = "") -> PlanWarning:
    """The one warning of ``source`` of ``kind`` whose text contains ``text`` (asserted: exactly one)."""
    found = warnings_of(source, kind, text)
    assert len(found) == 1, f"{len(found)} {kind!r} warnings containing {text!r} in {_plan_warnings(source)!r}"
    return found[0]


def has_warning(source: Any, kind: str, text: str = "") -> bool:
    """Whether ``source`` has a warning of ``kind`` whose text contains ``text`` (for ``assert not``)."""
    return bool(warnings_of(source, kind, text))


def emitted_of(
    records: Iterable[warnings.WarningMessage], category: type[KbitPrepWarning], text: str = ""
) -> list[str]:
    """The messages of the recorded warnings of exactly ``category`` (``kbitprep.MemoryWarning``,
    ...) whose text contains ``text``."""
    assert category in WARNING_KINDS.values(), f"{category!r} is not the category of a warning kind"
    return [str(w.message) for w in records if w.category is category and text in str(w.message)]
