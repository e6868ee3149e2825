"""Backend registry: built-ins held as lazy dotted paths, plugins read from entry points once.

Built-ins are imported on first lookup (their modules import only torch); plugins from the
``kbitprep.backends`` entry-point group are read once, on the first lookup, never at import.
A plugin that fails to load is recorded as ``broken: <reason>`` and never stops another backend.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Any, TypeVar, overload

from torch import nn

from kbitprep._errors import (
    DuplicateBackendError,
    InvalidArgumentError,
    UnknownBackendError,
)
from kbitprep._hf import unwrap_model
from kbitprep.backends.base import MethodFacts, QuantBackend

__all__ = [
    "BackendInfo",
    "Detection",
    "available_backends",
    "detect_backend",
    "get_backend",
    "register_backend",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kbitprep.backends"

# name -> "module:Class"; sorted. The library a built-in needs and its pip hint live on the
# class (``QuantBackend.requires`` / ``install_hint``), read when the class is first imported
# (built-in backend modules import only torch).
_BUILTINS: dict[str, str] = {
    "aqlm": "kbitprep.backends.aqlm:AqlmBackend",
    "awq": "kbitprep.backends.awq:AwqBackend",
    "bitnet": "kbitprep.backends.bitnet:BitNetBackend",
    "bitsandbytes": "kbitprep.backends.bitsandbytes:BitsAndBytesBackend",
    "compressed_tensors": "kbitprep.backends.compressed_tensors:CompressedTensorsBackend",
    "eetq": "kbitprep.backends.eetq:EetqBackend",
    "fp8": "kbitprep.backends.fp8:Fp8Backend",
    "generic": "kbitprep.backends.generic:GenericBackend",
    "gptq": "kbitprep.backends.gptq:GptqBackend",
    "hqq": "kbitprep.backends.hqq:HqqBackend",
    "mxfp4": "kbitprep.backends.mxfp4:Mxfp4Backend",
    "none": "kbitprep.backends.none:NoQuantBackend",
    "quanto": "kbitprep.backends.quanto:QuantoBackend",
    "torchao": "kbitprep.backends.torchao:TorchAoBackend",
}

_B = TypeVar("_B", bound=type[QuantBackend])


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """What :func:`available_backends` reports for one backend.

    Attributes:
        name: Registry name.
        source: ``"builtin"``, a plugin's distribution name, or ``"runtime"``.
        status: ``"ok"``, ``"missing dependency: pip install …"`` or ``"broken: <reason>"``.
        priority: The backend class's priority (0 when the class could not be loaded).
    """

    name: str
    source: str
    status: str
    priority: int


@dataclass(frozen=True, slots=True)
class Detection:
    """Result of :func:`detect_backend`.

    Attributes:
        backend: Registry name of the backend that claimed the model; ``"none"`` when the model
            is not quantized.
        reason: Which evidence decided, e.g. ``"model.is_loaded_in_4bit is True"``.
        others: ``(name, reason)`` of lower-ranked backends that also claimed the model.
    """

    backend: str
    reason: str
    others: tuple[tuple[str, str], ...] = ()


class _Registry:
    def __init__(self) -> None:
        self.classes: dict[str, type[QuantBackend]] = {}
        self.sources: dict[str, str] = {}
        self.broken: dict[str, tuple[str, str]] = {}  # key -> (source, reason)
        self.failed: dict[str, str] = {}  # registered name -> why it could not be instantiated later
        self.instances: dict[str, QuantBackend] = {}
        self.blocked: dict[str, str] = {}  # entry-point name -> distribution, not loaded on request
        self.plugins_loaded = False

    def load_builtin(self, name: str) -> type[QuantBackend]:
        cls = self.classes.get(name)
        if cls is not None:
            return cls
        module_name, _, attr = _BUILTINS[name].partition(":")
        loaded: Any = getattr(importlib.import_module(module_name), attr)
        self.classes[name] = loaded
        self.sources[name] = "builtin"
        return loaded  # type: ignore[no-any-return]

    def load_plugins(self) -> None:
        if self.plugins_loaded:
            return
        self.plugins_loaded = True
        blocked = blocked_plugins()
        if blocked is None:
            logger.debug("KBITPREP_DISABLE_PLUGINS=1: backend plugins skipped")
            return
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            source = ep.dist.name if ep.dist is not None else ep.value
            if ep.name in blocked or source in blocked:
                logger.debug("KBITPREP_DISABLE_PLUGINS blocks backend plugin %r from %s", ep.name, source)
                self.blocked[ep.name] = source
                continue
            try:
                cls = ep.load()
                _check_class(cls)
                if cls.name in _BUILTINS or cls.name in self.classes:
                    owner = "builtin" if cls.name in _BUILTINS else self.sources.get(cls.name, "?")
                    raise DuplicateBackendError(
                        f"backend name {cls.name!r} is already provided by {owner}; a plugin may not "
                        "shadow it. Rename the plugin's backend."
                    )
                self.classes[cls.name] = cls
                self.sources[cls.name] = source
            except Exception as exc:  # one bad plugin never hides the others
                # a name already taken (built-in, loaded, broken) gets the source appended, so the
                # broken entry is listed by available_backends and never hidden behind the other
                taken = ep.name in _BUILTINS or ep.name in self.broken or ep.name in self.classes
                key = f"{ep.name} [{source}]" if taken else ep.name
                self.broken[key] = (source, f"{type(exc).__name__}: {exc}")
                logger.error(
                    "Could not load kbitprep backend plugin %r from %s: %s",
                    ep.name,
                    source,
                    exc,
                    exc_info=logger.isEnabledFor(logging.DEBUG),
                )

    def names(self) -> list[str]:
        self.load_plugins()
        return sorted(set(_BUILTINS) | set(self.classes))

    def get_class(self, name: str) -> type[QuantBackend]:
        self.load_plugins()
        if name in self.classes:
            return self.classes[name]
        if name in _BUILTINS:
            return self.load_builtin(name)
        known = ", ".join(repr(n) for n in self.names())
        extra = f" (broken plugin: {self.broken[name][1]})" if name in self.broken else ""
        if name in self.blocked:
            extra = (
                f" (the plugin from {self.blocked[name]} is blocked by KBITPREP_DISABLE_PLUGINS; remove "
                f"{name!r} from that variable to use it)"
            )
        raise UnknownBackendError(
            f"No kbitprep backend is named {name!r}{extra}. Known backends: {known}. Pass one of "
            "those, or backend='auto' to detect it from the model."
        )


_registry = _Registry()


def _check_class(cls: object) -> None:
    """Refuse a backend class that the registry could not use, before it is registered.

    Checked: a :class:`QuantBackend` subclass with a ``name``; ``quant_methods``,
    ``storage_names``, ``input_dtype_attr`` and ``layer_label`` of the types the default
    questions read, and ``method_facts`` / ``upcast_rule`` of the types the coverage table reads; a way to claim a model (its own ``detect``, or ``quant_methods`` or
    ``find_layers`` for the default one); no abstract method left; ``requires`` a tuple of
    strings; instantiable as ``cls()``; and every method of the ``QuantBackend`` contract it
    overrides callable with the arguments kbitprep passes. A plugin entry point naming a refused
    class is listed as ``broken: <reason>``.

    Raises:
        InvalidArgumentError: One of those does not hold; the message says what was found, what
            was expected and how to fix it.
    """
    if not (isinstance(cls, type) and issubclass(cls, QuantBackend)):
        raise InvalidArgumentError(
            f"A backend must be a subclass of kbitprep.QuantBackend; got {cls!r}. "
            "Subclass QuantBackend and set a `name`."
        )
    where = f"{cls.__module__}.{cls.__qualname__}"
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise InvalidArgumentError(f'Backend class {where} has no `name`; set the class attribute `name = "..."`.')
    _check_declared(where, cls)
    if cls.detect is QuantBackend.detect and cls.find_layers is QuantBackend.find_layers and not cls.quant_methods:
        raise InvalidArgumentError(
            f"Backend class {where} does not implement detect() and declares neither `quant_methods` nor "
            "`find_layers`, so the default detect could never claim a model. Define "
            "`def detect(self, model) -> str | None`, returning a one-line reason when it quantized the model "
            "and None otherwise, or declare what the default detect reads: "
            '`quant_methods = frozenset({"mymethod"})` (the transformers quant_method) and '
            "`def find_layers(self, model)` yielding (name, module) for each quantized layer."
        )
    abstract = sorted(getattr(cls, "__abstractmethods__", ()))
    if abstract:
        raise InvalidArgumentError(
            f"Backend class {where} cannot be instantiated: its abstract method(s) {', '.join(abstract)} are "
            "not implemented. Implement them, or register a concrete subclass instead."
        )
    if not isinstance(getattr(cls, "requires", ()), tuple) or not all(isinstance(r, str) for r in cls.requires):
        raise InvalidArgumentError(
            f"Backend class {where}.requires must be a tuple of import names such as ('mylib',); "
            f'got {cls.requires!r}. Set `requires = ("mylib",)` on the class.'
        )
    try:
        instance = cls()
    except Exception as exc:
        raise InvalidArgumentError(
            f"Backend class {where} cannot be instantiated without arguments ({type(exc).__name__}: {exc}); "
            "the registry creates its one instance with cls(). Give __init__ no required arguments and "
            "defer anything that may fail (a library import, a device query) to the method that needs it."
        ) from exc
    _check_hooks(where, cls, instance)


def _check_declared(where: str, cls: type[QuantBackend]) -> None:
    """What the default questions read from the class has the type they expect: a string in
    place of a set would make ``"gptq" in "autogptq"`` a match."""
    for attr in ("quant_methods", "storage_names"):
        value = getattr(cls, attr, None)
        if not isinstance(value, (frozenset, set)) or not all(isinstance(v, str) and v for v in value):
            raise InvalidArgumentError(
                f"Backend class {where}.{attr} must be a frozenset of non-empty strings; got {value!r}. "
                f'Set `{attr} = frozenset({{"..."}})`, or leave it out for none.'
            )
    upper = sorted(m for m in cls.quant_methods if m != m.lower())
    if upper:
        raise InvalidArgumentError(
            f"Backend class {where}.quant_methods holds {', '.join(repr(m) for m in upper)}; transformers' "
            "quant_method names are compared in lower case, so these could never match. Write them in lower case."
        )
    for attr in ("input_dtype_attr", "layer_label", "upcast_rule"):
        value = getattr(cls, attr, None)
        if not isinstance(value, str):
            raise InvalidArgumentError(
                f"Backend class {where}.{attr} must be a string; got {value!r}. Set it to a string, or leave it out."
            )
    facts = getattr(cls, "method_facts", None)
    if not isinstance(facts, Mapping) or not all(
        isinstance(k, str) and isinstance(v, MethodFacts) for k, v in facts.items()
    ):
        raise InvalidArgumentError(
            f"Backend class {where}.method_facts must map quant_method names to MethodFacts (what "
            f"`kbitprep backends --methods` shows); got {facts!r}. Set "
            '`method_facts = {"mymethod": MethodFacts(storage="...", trains="...")}`, or leave it out.'
        )


@functools.cache
def _contract_methods() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``(method, argument names)`` of every question in ``QuantBackend.CONTRACT``."""
    return tuple(
        (attr, tuple(inspect.signature(getattr(QuantBackend, attr)).parameters)[1:]) for attr in QuantBackend.CONTRACT
    )


def _check_hooks(where: str, cls: type[QuantBackend], instance: QuantBackend) -> None:
    """Every contract method ``cls`` overrides is callable with kbitprep's positional arguments."""
    for attr, args in _contract_methods():
        if getattr(cls, attr, None) is getattr(QuantBackend, attr):
            continue  # inherited as it is
        expected = f"def {attr}(self{''.join(', ' + a for a in args)})"
        impl = getattr(instance, attr, None)
        if not callable(impl):
            raise InvalidArgumentError(
                f"Backend class {where}.{attr} is {impl!r}, not a method. kbitprep calls "
                f"{attr}({', '.join(args)}) on every backend; define `{expected}` or remove the attribute."
            )
        try:
            signature = inspect.signature(impl)
        except (TypeError, ValueError):  # a builtin or C callable: nothing to compare
            continue
        try:
            signature.bind(*args)
        except TypeError as exc:
            found = ", ".join(str(p.replace(annotation=inspect.Parameter.empty)) for p in signature.parameters.values())
            raise InvalidArgumentError(
                f"Backend class {where}.{attr} takes ({found}), so kbitprep's call {attr}({', '.join(args)}) "
                f"would fail ({exc}). Give it the signature `{expected}`."
            ) from None


@overload
def register_backend(cls: _B, *, replace: bool = False) -> _B: ...
@overload
def register_backend(cls: None = None, *, replace: bool = False) -> Callable[[_B], _B]: ...
def register_backend(cls: _B | None = None, *, replace: bool = False) -> _B | Callable[[_B], _B]:
    """Register a :class:`QuantBackend` subclass at runtime; also usable as a class decorator.

    Args:
        cls: The backend class. Omit it to get a decorator (``@register_backend(replace=True)``).
        replace: Allow replacing a backend already registered under the same name
            (built-in, plugin or runtime). Default False.

    Returns:
        ``cls`` unchanged, so the decorator form keeps the class.

    Raises:
        InvalidArgumentError: ``cls`` is not a ``QuantBackend`` subclass with a ``name``.
        DuplicateBackendError: The name is taken and ``replace`` is False.
    """

    def decorate(klass: _B) -> _B:
        _check_class(klass)
        if klass.name == "auto":
            raise InvalidArgumentError(
                "A backend may not be named 'auto': backend='auto' always means 'detect'. Rename it."
            )
        _registry.load_plugins()
        name = klass.name
        taken = name in _BUILTINS or name in _registry.classes
        if taken and not replace:
            owner = _registry.sources.get(name, "builtin")
            raise DuplicateBackendError(
                f"A backend named {name!r} is already registered ({owner}). Pass replace=True to "
                "replace it, or give your backend another name."
            )
        _registry.classes[name] = klass
        _registry.sources[name] = "runtime"
        _registry.instances.pop(name, None)
        _registry.failed.pop(name, None)
        return klass

    if cls is None:
        return decorate
    return decorate(cls)


def _missing_dependency(name: str) -> str | None:
    """The pip hint when a library the backend's class lists in ``requires`` is not installed
    (``importlib.util.find_spec``, nothing imported), else None. Built-ins and plugins alike."""
    try:
        cls = _registry.get_class(name)
    except Exception:
        return None
    missing = cls.missing_requirements()
    if not missing:
        return None
    return cls.install_hint or f"pip install {' '.join(missing)}"


def get_backend(name: str) -> QuantBackend:
    """The backend instance registered as ``name`` (one instance per name).

    A missing library does not stop this: a strategy needs its library only for the fix-ups
    that call it, and raises :class:`~kbitprep.BackendUnavailableError` from there
    (:meth:`QuantBackend.require`). A GPTQ model whose layers come from another kernel library
    is prepared on a machine without gptqmodel.

    Raises:
        UnknownBackendError: No backend has that name; the message lists the known names.
    """
    if not isinstance(name, str):
        raise InvalidArgumentError(f"backend must be a str such as 'auto' or 'bitsandbytes'; got {name!r}.")
    cls = _registry.get_class(name)
    instance = _registry.instances.get(name)
    if instance is None:
        instance = cls()
        _registry.instances[name] = instance
    return instance


def blocked_plugins() -> frozenset[str] | None:
    """The plugins ``KBITPREP_DISABLE_PLUGINS`` blocks: None when it is ``1`` (every plugin),
    else the entry-point names and distribution names it lists, comma-separated
    (``KBITPREP_DISABLE_PLUGINS=goodquant,kbitprep-brokenplugin``), read when plugins load.
    The idea is pluggy's ``PluginManager.set_blocked``: a blocked plugin is never imported."""
    raw = os.environ.get("KBITPREP_DISABLE_PLUGINS", "").strip()
    if raw == "1":
        return None
    return frozenset(part.strip() for part in raw.split(",") if part.strip())


def available_backends() -> Mapping[str, BackendInfo]:
    """Every backend with its source, status and priority (a read-only mapping, sorted by name).

    Status is ``"ok"``, ``"missing dependency: <pip command>"`` when the backend's library is
    not installed (checked with ``importlib.util.find_spec``, nothing is imported),
    ``"broken: <reason>"`` for a plugin or class that failed to load, or ``"blocked:
    KBITPREP_DISABLE_PLUGINS"`` for a plugin that environment variable names (not imported).
    """
    out: dict[str, BackendInfo] = {}
    for name in _registry.names():
        source = _registry.sources.get(name, "builtin")
        try:
            cls = _registry.get_class(name)
        except Exception as exc:
            out[name] = BackendInfo(name, source, f"broken: {type(exc).__name__}: {exc}", 0)
            continue
        hint = _missing_dependency(name)
        status = f"missing dependency: {hint}" if hint else "ok"
        if name in _registry.failed:
            status = f"broken: {_registry.failed[name]}"
        out[name] = BackendInfo(name, _registry.sources.get(name, source), status, int(cls.priority))
    for key, (source, reason) in _registry.broken.items():
        out.setdefault(key, BackendInfo(key, source, f"broken: {reason}", 0))
    for key, source in _registry.blocked.items():
        out.setdefault(key, BackendInfo(key, source, "blocked: KBITPREP_DISABLE_PLUGINS", 0))
    return MappingProxyType(dict(sorted(out.items())))


def _claims(model: nn.Module) -> list[tuple[int, int, str, str]]:
    """(priority, order, name, reason) of every backend whose ``detect`` claims ``model``."""
    claims = []
    for order, name in enumerate(_registry.names()):
        try:
            backend = _registry.get_class(name)()
        except Exception as exc:  # registration checks make this rare; never skip it silently
            logger.error("Backend %r could not be instantiated while detecting, so it was skipped: %s", name, exc)
            _registry.failed[name] = f"{type(exc).__name__}: {exc} (raised creating the backend during detection)"
            continue
        _registry.failed.pop(name, None)
        try:
            reason = backend.detect(model)
        except Exception as exc:
            logger.warning("Backend %r failed while detecting: %s", name, exc)
            continue
        if reason:
            # a plugin's claim ranks before a built-in's of equal priority
            builtin = _registry.sources.get(name, "builtin") == "builtin"
            claims.append((int(backend.priority), order if builtin else -1, name, reason))
    claims.sort(key=lambda c: (-c[0], c[1]))
    return claims


def detect_backend(model: nn.Module) -> Detection:
    """Find which backend quantized ``model``, strongest evidence first.

    Each backend's :meth:`QuantBackend.detect` looks in tiers: the transformers quantizer and
    ``config.quantization_config`` (object or dict), then the legacy attributes
    (``is_loaded_in_4bit``, ``quantization_method``, ``hqq_quantized``, read with ``getattr``),
    then the modules and parameter types themselves. A ``peft.PeftModel`` is looked through.
    When several backends claim the model, the highest ``priority`` wins and the others are
    listed in ``Detection.others``.

    Returns:
        The detection; ``backend == "none"`` for an unquantized model.

    Raises:
        InvalidModelError: ``model`` is not an ``nn.Module``.
    """
    from kbitprep._errors import InvalidModelError

    if not isinstance(model, nn.Module):
        raise InvalidModelError(
            f"detect_backend expects a torch.nn.Module; got {type(model).__name__}. Pass the model "
            "returned by from_pretrained (or a peft.PeftModel)."
        )
    base = unwrap_model(model)
    claims = _claims(base)
    if not claims:  # cannot happen while the none backend is registered
        return Detection(_unquantized_name(), "no backend claimed the model")
    _prio, _order, name, reason = claims[0]
    dequantized = _label_without_storage(base, name)
    if dequantized is not None:
        return Detection(_unquantized_name(), dequantized)
    others = tuple((n, r) for _p, _o, n, r in claims[1:] if not _registry.get_class(n).fallback)
    return Detection(name, reason, others)


def _unquantized_name() -> str:
    """The fallback strategy for a model that holds no quantized storage (``none``)."""
    for name in _registry.names():
        cls = _registry.get_class(name)
        if cls.fallback and not cls.holds_storage:
            return name
    raise UnknownBackendError("No fallback backend for unquantized models is registered (the built-in 'none').")


def _label_without_storage(model: nn.Module, name: str) -> str | None:
    """The ``none`` verdict's reason when a quantization label has no storage behind it.

    The quantizer, ``quantization_config`` and legacy attributes are evidence, not the verdict:
    transformers keeps ``hf_quantizer`` and the config on a model it
    loaded dequantized (``Mxfp4Config(dequantize=True)``; an FP8 checkpoint on a CPU), whose
    parameters are all ordinary floats. Asks the claiming strategy's ``find_storage``.
    """
    from kbitprep.backends.base import config_quant_method, legacy_quant_method

    label = config_quant_method(model) or legacy_quant_method(model)
    if label is None and getattr(model, "is_quantized", False) is True:
        label = ("unknown", "model.is_quantized is True")
    if label is None:
        return None
    try:
        strategy = _registry.get_class(name)()
        if not strategy.holds_storage or strategy.find_storage(model) is not None:
            return None
    except Exception as exc:  # a strategy that cannot answer keeps its claim
        logger.warning("Backend %r failed while looking for quantized storage: %s", name, exc)
        return None
    method, evidence = label
    return (
        f"{evidence}, but the model holds no quantized storage for {method!r}: every parameter and "
        "buffer is an ordinary float or index tensor, so the weights are dequantized (as transformers "
        "loads them with dequantize=True, or on a device its kernels do not support) and the model is "
        "prepared as unquantized"
    )


@functools.cache
def builtin_names() -> tuple[str, ...]:
    """Names of the built-in backends, sorted."""
    return tuple(_BUILTINS)
