"""Name patterns, read as peft reads ``target_modules`` (used by ``keep_in_low_precision``).

- A sequence of names: each name matches a module whose qualified name equals it or ends with
  ``"." + name`` (a dotted suffix: ``"lm_head"``, ``"layers.0"``, ``"model.layers.0"``,
  ``"vision_tower"``), and a parameter the same way (``"model.norm.weight"``, ``"norm.weight"``).
  A name holding a glob character (``*``, ``?``, ``[``) is an ``fnmatch`` glob over whole module
  and parameter names (``"*layernorm*"``), kept from kbitprep's first releases; peft has no globs,
  and a regular expression says the same more precisely.
- A single string: one regular expression, full-matched (``re.fullmatch``) against module names,
  as peft matches a ``target_modules`` string.

A matched module covers its whole subtree: every parameter and submodule under it. Names are
those of the transformers model: inside a ``peft.PeftModel`` they are read relative to it (its
``base_model.model.`` prefix stripped, as peft matches ``target_modules``), so a pattern written
for the bare model matches the same modules after ``get_peft_model``; a name in a sequence may
also spell a full name in the wrapper (``"base_model.model.lm_head"``). A pattern that matches nothing is an
:class:`~kbitprep.InvalidArgumentError` naming the closest names, raised while planning, before
anything changes.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from kbitprep._errors import InvalidArgumentError

__all__ = ["KeepPatterns", "NameMatch", "covering", "keep_patterns", "match_keep", "match_names"]

_GLOB = frozenset("*?[")


@dataclass(frozen=True, slots=True)
class NameMatch:
    """What one pattern matched in one model.

    Attributes:
        pattern: The pattern as the caller wrote it.
        modules: Qualified names (in the model passed) of the modules it matched; each covers
            its subtree.
        params: Qualified names of the parameters it matched by their own name.
        first: The first name it matched, in model order (modules first).
    """

    pattern: str
    modules: frozenset[str]
    params: frozenset[str]
    first: str

    def covers(self, name: str) -> bool:
        """Whether the parameter called ``name`` is matched, itself or through a module above it."""
        if name in self.params:
            return True
        end = name.rfind(".")
        while end > 0:
            if name[:end] in self.modules:
                return True
            end = name.rfind(".", 0, end)
        return False


def covering(found: Sequence[NameMatch], names: Iterable[str]) -> list[str]:
    """The patterns in ``found`` that cover a parameter known by any of ``names`` (a tied
    parameter has several), in the caller's order."""
    names = tuple(names)
    return [m.pattern for m in found if any(m.covers(n) for n in names)]


def _is_glob(pattern: str) -> bool:
    return not _GLOB.isdisjoint(pattern)


def _tester(pattern: str, regex: bool) -> Callable[[str], bool]:
    if regex:
        compiled = re.compile(pattern)
        return lambda name: compiled.fullmatch(name) is not None
    if _is_glob(pattern):
        return lambda name: fnmatch.fnmatchcase(name, pattern)
    dotted = "." + pattern
    return lambda name: name == pattern or name.endswith(dotted)


def _inside(names: Iterable[str], prefix: str) -> list[tuple[str, str]]:
    """(name in the model passed, name in the transformers model) of each name strictly inside
    the transformers model (a ``peft.PeftModel``'s own modules and the base itself left out)."""
    out = []
    for name in names:
        if name.startswith(prefix) and len(name) > len(prefix):
            out.append((name, name[len(prefix) :]))
    return out


def match_names(
    model: nn.Module,
    prefix: str,
    patterns: Sequence[str],
    *,
    regex: bool,
    option: str = "keep_in_low_precision",
) -> list[NameMatch]:
    """Match ``patterns`` against the module and parameter names of ``model``.

    Names are those of the transformers model (inside a ``peft.PeftModel``, relative to it, as
    peft matches ``target_modules``); a name in a sequence may also be a full name in the model
    passed (``"base_model.model.lm_head"``).

    Args:
        model: The model passed to ``plan`` (maybe a ``peft.PeftModel``).
        prefix: The transformers model's qualified name inside ``model`` plus a dot, or ``""``.
        patterns: The checked option: names (``regex=False``) or one regular expression.
        regex: Whether ``patterns`` is one regular expression (the option was a single string).
        option: The option's name, for the error message.

    Returns:
        One :class:`NameMatch` per pattern, in order; its names are full names in ``model``.

    Raises:
        InvalidArgumentError: A pattern matches no module (and, for names, no parameter); the
            message names the closest names of the model.
    """
    modules = _inside((n for n, _m in model.named_modules(remove_duplicate=False)), prefix)
    params = [] if regex else _inside((n for n, _p in model.named_parameters(remove_duplicate=False)), prefix)
    found: list[NameMatch] = []
    for pattern in patterns:
        test = _tester(pattern, regex)
        exact_full = not regex and bool(prefix) and pattern.startswith(prefix)
        hit_modules = [full for full, rel in modules if test(rel) or (exact_full and full == pattern)]
        hit_params = [full for full, rel in params if test(rel) or (exact_full and full == pattern)]
        if not hit_modules and not hit_params:
            names = [rel for _full, rel in modules + params]
            raise InvalidArgumentError(_no_match(model, pattern, regex, option, names))
        found.append(NameMatch(pattern, frozenset(hit_modules), frozenset(hit_params), (hit_modules + hit_params)[0]))
    return found


@dataclass(frozen=True, slots=True)
class KeepPatterns:
    """The ``keep_in_low_precision`` option, read once (a generator is consumed here only).

    Attributes:
        patterns: Names (globs allowed), or the one regular expression.
        regex: Whether ``patterns`` is one regular expression (the option was a single string).
    """

    patterns: tuple[str, ...] = ()
    regex: bool = False

    def __bool__(self) -> bool:
        return bool(self.patterns)


def keep_patterns(keep_in_low_precision: object) -> KeepPatterns:
    """``keep_in_low_precision`` as the caller passed it, read once: a single string is one
    regular expression (peft's ``target_modules`` convention), any other iterable (a tuple, a
    list, a set, a generator) a sequence of names.

    Raises:
        InvalidArgumentError: An empty string, a string that does not compile as a regular
            expression, a mapping or bytes, something not iterable, or an element that is not a
            non-empty string.
    """
    if isinstance(keep_in_low_precision, str):
        if not keep_in_low_precision:
            raise InvalidArgumentError(
                "keep_in_low_precision='' names nothing; pass a sequence of module names such as "
                "('lm_head', 'embed_tokens') or a regular expression such as r'.*\\.mlp'."
            )
        try:
            re.compile(keep_in_low_precision)
        except re.error as exc:
            raise InvalidArgumentError(
                f"keep_in_low_precision={keep_in_low_precision!r} is a single string, so it is read as a regular "
                f"expression (full-matched against module names, as peft reads target_modules), and it does not "
                f"compile: {exc}. Pass a sequence such as ({keep_in_low_precision!r},) to match a name instead."
            ) from None
        return KeepPatterns((keep_in_low_precision,), True)
    if isinstance(keep_in_low_precision, (Mapping, bytes, bytearray)):
        raise InvalidArgumentError(
            f"keep_in_low_precision must be a sequence of module names such as ('lm_head',) or one regular "
            f"expression (str); got a {type(keep_in_low_precision).__name__}: {keep_in_low_precision!r}."
        )
    try:
        keep: tuple[Any, ...] = tuple(keep_in_low_precision)  # type: ignore[call-overload,arg-type]
    except TypeError:
        raise InvalidArgumentError(
            f"keep_in_low_precision must be a sequence of module names such as ('lm_head',) or one regular "
            f"expression (str); got {keep_in_low_precision!r}."
        ) from None
    if not all(isinstance(k, str) and k for k in keep):
        raise InvalidArgumentError(
            f"keep_in_low_precision must hold non-empty strings (module or parameter names, exact or a dotted "
            f"suffix; globs allowed); got {keep!r}."
        )
    return KeepPatterns(keep, False)


def match_keep(model: nn.Module, prefix: str, keep_in_low_precision: KeepPatterns) -> list[NameMatch]:
    """:func:`match_names` for the ``keep_in_low_precision`` option, read by :func:`keep_patterns`.

    Raises:
        InvalidArgumentError: As :func:`match_names`.
    """
    return match_names(model, prefix, keep_in_low_precision.patterns, regex=keep_in_low_precision.regex)


def _closest(pattern: str, names: Iterable[str]) -> list[str]:
    """The names closest to ``pattern`` (``difflib``), every dotted suffix of each name a candidate
    so that a short name is compared with short names."""
    candidates: set[str] = set()
    for name in names:
        parts = name.split(".")
        candidates.update(".".join(parts[i:]) for i in range(len(parts)))
    return difflib.get_close_matches(pattern, sorted(candidates), n=3, cutoff=0.6)


def _no_match(model: nn.Module, pattern: str, regex: bool, option: str, names: list[str]) -> str:
    kind = "regular expression" if regex else "pattern"
    what = "module name" if regex else "module or parameter"
    close = _closest(pattern, names)
    text = f"{option} {kind} {pattern!r} matches no {what} of {type(model).__name__}"
    text += f"; closest names: {', '.join(map(repr, close))}." if close else "."
    if regex:
        text += (
            " A single string is a regular expression full-matched against module names (as peft reads "
            "target_modules), e.g. r'.*\\.(q_proj|v_proj)'; pass a sequence to match names by their exact name or "
            "a dotted suffix."
        )
    else:
        text += (
            " A name matches a module (and everything under it) or a parameter by its exact qualified name or a "
            "dotted suffix, e.g. 'lm_head', 'layers.0', 'model.norm.weight'; see model.named_modules()."
        )
    if "," in pattern:
        several = tuple(p.strip() for p in pattern.split(",") if p.strip())
        text += f" To name several modules pass a sequence: {option}={several!r}."
    return text + " Nothing was changed."
