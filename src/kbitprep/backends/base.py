"""The strategy interface every backend implements, and the evidence helpers they share."""

from __future__ import annotations

import abc
import importlib.machinery
import importlib.util
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple, final

import torch
from torch import nn

from kbitprep._storage import (
    STORAGE_LEAF_NAMES,
    STORAGE_LEAF_SUFFIXES,
    dominant_float_dtype,
    find_storage,
    is_storage_dtype,
    is_storage_tensor,
    is_wrapper_subclass,
    model_param_bytes,
    tensor_nbytes,
)

__all__ = [
    "STORAGE_LEAF_NAMES",
    "STORAGE_LEAF_SUFFIXES",
    "MethodFacts",
    "QuantBackend",
    "UndoFn",
    "Verdict",
    "config_quant_method",
    "count_reason",
    "detect_in_tiers",
    "dominant_float_dtype",
    "find_storage",
    "found_reason",
    "is_installed",
    "is_storage_dtype",
    "is_storage_tensor",
    "is_wrapper_subclass",
    "legacy_quant_method",
    "loaded_module",
    "model_param_bytes",
    "modules_of_type",
    "most_common_dtype",
    "tensor_nbytes",
]

UndoFn = Callable[[], None]
"""What :meth:`QuantBackend.before_training` may return: a callable that reverses its fix-ups."""


class Verdict(NamedTuple):
    """The answer to a "can this model do X" question (:meth:`QuantBackend.trainable`,
    :meth:`QuantBackend.shardable`): unpacks as ``ok, reason = ...``."""

    ok: bool
    reason: str


@dataclass(frozen=True, slots=True)
class MethodFacts:
    """What a strategy states about one transformers quantization method it covers: the cells of
    its row in ``kbitprep backends --methods`` and docs/backends/coverage.md that the code cannot
    answer (:mod:`kbitprep._coverage` derives the others). Declared in
    :attr:`QuantBackend.method_facts`; kbitprep never reads it while preparing a model.

    Attributes:
        storage: What the quantized layers hold, with dtypes, e.g. ``"W_q uint8"``.
        trains: Whether LoRA adapters train on it, and under which form: what the strategy's
            ``check_trainable`` (and the quantizer's ``is_trainable`` it defers to) decides.
        note: Why it is untested or does not work on a CPU, when it is not plain.
    """

    storage: str
    trains: str
    note: str = ""


class QuantBackend(abc.ABC):
    """Strategy for one quantization method: what is quantized storage, what may be upcast,
    whether checkpointing is wanted, and what must hold before adapters can train.

    The orchestrator (:func:`kbitprep.prepare`) asks these questions and never compares
    ``name``. Subclasses set ``name`` and say how to recognise their models: declare
    :attr:`quant_methods` and implement :meth:`find_layers` (the default :meth:`detect` reads
    both), or implement :meth:`detect` itself. Every other method has a default that is right
    for a backend whose kernels own their compute dtype; three of them read what a strategy
    declares about its layers (:attr:`storage_names`, :attr:`input_dtype_attr`,
    :attr:`layer_label`).

    Attributes:
        name: Registry name, e.g. ``"bitsandbytes"``; a plugin uses its own.
        priority: Higher wins when two backends claim one model. Built-ins use 0; the
            ``generic`` fallback uses -100 and ``none`` -1000.
        install_hint: pip command that installs the backend's library.
        requires: Import names of the libraries the backend's fix-ups call (checked with
            ``importlib.util.find_spec``; nothing is imported). The registry reads these from
            the class: ``available_backends`` reports ``missing dependency: <install_hint>``,
            and :meth:`require` raises :class:`~kbitprep.BackendUnavailableError` when a fix-up
            that needs one runs without it.
        shardable: Whether the quantized storage can be sharded by FSDP together with the
            float parameters (see :mod:`kbitprep` distributed mode). ``None`` means unknown.
    """

    name: ClassVar[str]
    priority: ClassVar[int] = 0
    install_hint: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    quant_methods: ClassVar[frozenset[str]] = frozenset()
    """transformers ``quant_method`` names (lower case) this strategy claims, e.g. ``{"gptq"}``:
    the first two tiers of the default :meth:`detect`."""
    storage_names: ClassVar[frozenset[str]] = frozenset()
    """Leaf names of the tensors that are quantized storage, whatever their dtype, on a layer
    :meth:`find_layers` yields (AQLM: ``{"codes", "codebooks", "scales"}``): the default
    :meth:`is_quantized_param` says yes to them. A float scale or codebook belongs here; a
    ``bias`` usually does not."""
    input_dtype_attr: ClassVar[str] = ""
    """The attribute of a layer :meth:`find_layers` yields that tells the dtype its floating
    inputs must have: a floating tensor (its dtype: GPTQ ``scales``, AQLM ``codebooks``) or a
    ``torch.dtype`` (HQQ ``compute_dtype``). The default :meth:`input_dtype` reads it; empty
    (the default) means the layers convert their inputs themselves."""
    layer_label: ClassVar[str] = "{cls}"
    """How the default :meth:`detect` names the layers it counts; ``{cls}`` stands for each
    layer's class name: ``"AWQ {cls}"`` gives ``"found 14 AWQ TorchAtenAwqLinear modules"``, a
    label without ``{cls}`` counts every layer under that one name (:func:`found_reason`)."""
    holds_storage: ClassVar[bool] = True
    """Whether the models this strategy claims hold quantized storage. False (``none``) means: a
    quantization label on the model needs no storage behind it, ``upcast="all"`` is not
    questioned, and an upcast warns with the bytes it adds (as peft casts a plain model)."""
    keeps_checkpointing_as_found: ClassVar[bool] = False
    """Whether checkpointing is left as the model has it: on when it is on, off when it is off
    (:meth:`wants_gradient_checkpointing` is then not asked), its ``use_reentrant`` included unless
    the caller passes ``gradient_checkpointing_kwargs`` (peft 0.21 for an unquantized model), and
    a plan warning says when it stays off."""
    CONTRACT: ClassVar[tuple[str, ...]] = (
        "detect",
        "find_layers",
        "is_quantized_param",
        "find_storage",
        "should_upcast",
        "wants_gradient_checkpointing",
        "check_trainable",
        "before_training",
        "fixup_bytes",
        "compute_dtype",
        "input_dtype",
        "plan_warnings",
        "shardable",
    )
    """The questions a strategy answers: the methods kbitprep calls and a strategy may override,
    each checked by the registry against the signature declared here. The other public methods
    (:meth:`trainable`, :meth:`is_layer`, :meth:`require`, :meth:`missing_requirements`) are
    helpers built on them."""
    fallback: ClassVar[bool] = False
    """True for a strategy that claims whatever no specific strategy claims (``generic`` and
    ``none``): when it claims a model beside another strategy, :func:`kbitprep.detect_backend`
    does not list it among ``Detection.others``."""
    method_facts: ClassVar[Mapping[str, MethodFacts]] = MappingProxyType({})
    """The coverage table's facts for each transformers ``quant_method`` this strategy claims
    (keys in :attr:`quant_methods`); a :attr:`fallback` strategy declares the methods it covers
    because no strategy claims them. Data for :mod:`kbitprep._coverage` only, never asked while
    preparing, so not part of :attr:`CONTRACT`."""
    upcast_rule: ClassVar[str] = ""
    """A short phrase for the coverage table's "auto upcast" column, set beside an override of
    :meth:`should_upcast` (the code cannot state whose rule it is). Leave it empty otherwise: a
    strategy that inherits :meth:`should_upcast` upcasts nothing, and the table says so."""

    def detect(self, model: nn.Module) -> str | None:
        """A one-line reason when this backend quantized ``model``, else ``None``.

        Must not run a forward, read ``.weight`` on a layer that has none, or import a
        library that is not already imported by the model's own layers.

        Default: :func:`detect_in_tiers`, strongest evidence first: the transformers quantizer
        or ``config.quantization_config`` names a method of :attr:`quant_methods`
        (:func:`config_quant_method`); else a legacy attribute does (``quantization_method``,
        ``is_loaded_in_4bit`` ..., :func:`legacy_quant_method`); else the layers
        :meth:`find_layers` yields, counted under :attr:`layer_label` (``"found 14 EetqLinear
        modules"``, :func:`found_reason`). A strategy that declares neither
        :attr:`quant_methods` nor :meth:`find_layers` can claim nothing with it and must
        override this (the registry refuses it otherwise).
        """
        return detect_in_tiers(model, self.quant_methods, self._layers_reason)

    def _layers_reason(self, model: nn.Module) -> str | None:
        """The third tier of the default :meth:`detect`: the found layers, counted per label."""
        label = self.layer_label
        return found_reason(label.replace("{cls}", type(m).__name__) for _n, m in self.find_layers(model))

    def find_layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """The quantized layers of this method in ``model``, as ``(name, module)`` pairs in
        ``model.named_modules()`` order (``""`` names ``model`` itself).

        The default :meth:`detect` counts them, and the defaults of :meth:`is_quantized_param`
        (:attr:`storage_names`) and :meth:`input_dtype` (:attr:`input_dtype_attr`) apply to them
        alone. Those two ask it of a single module (:meth:`is_layer`), so whether a module is a
        layer must depend on the module itself (its class, its own tensors), not on where it
        sits in the model. Like :meth:`detect`, it must not run a forward or import a library
        the model's layers did not already import: look the layer classes up in
        ``sys.modules`` (:func:`loaded_module`) and walk them with :func:`modules_of_type`.

        Default: none (a strategy that recognises its models by :meth:`detect` alone).

        Returns:
            An iterator of ``(qualified name, module)``.
        """
        return iter(())

    @final
    def is_layer(self, module: nn.Module) -> bool:
        """Whether ``module`` itself is one of the layers :meth:`find_layers` yields (it is asked
        of ``module`` alone). Helper, not a question: override :meth:`find_layers`."""
        return any(found is module for _name, found in self.find_layers(module))

    @final
    def flagged_without_layers(self, model: nn.Module) -> str | None:
        """The evidence (``"quantization_config.quant_method == 'gptq'"``) when ``model`` is
        labelled with one of :attr:`quant_methods` but :meth:`find_layers` finds none of its
        layers, else ``None``: the checkpoint's quantized tensors were not loaded, so its linears
        are plain and probably randomly initialised. A strategy's :meth:`plan_warnings` says so
        with its own remedy. Helper, not a question."""
        evidence = config_quant_method(model) or legacy_quant_method(model)
        if evidence is None or evidence[0] not in self.quant_methods or any(self.find_layers(model)):
            return None
        return evidence[1]

    def is_quantized_param(self, name: str, param: nn.Parameter, module: nn.Module) -> bool:
        """Whether ``param`` is quantized storage: never cast, never made trainable, never
        counted when deciding whether dtypes are mixed, never read as a compute dtype.

        Default: a tensor named in :attr:`storage_names` on a layer :meth:`find_layers` yields,
        whatever its dtype; elsewhere :func:`is_storage_tensor` (integer, float8, e8m0 and float4
        dtypes, tensor subclasses, and the scales / zero points / packed tensors of a module that
        holds such storage). An override should return ``True`` for its own extra storage and
        otherwise call ``super().is_quantized_param(...)``, so it keeps these rules.
        """
        if self.storage_names and name.rpartition(".")[2] in self.storage_names and self.is_layer(module):
            return True
        return is_storage_tensor(name, param, module)

    # -- helpers: not questions the orchestrator asks, not part of the contract, never overridden

    @final
    @classmethod
    def missing_requirements(cls) -> tuple[str, ...]:
        """The names in :attr:`requires` that are not installed (:func:`is_installed`: found
        without importing anything)."""
        return tuple(lib for lib in cls.requires if not is_installed(lib))

    @final
    def require(self, purpose: str) -> None:
        """Call before a fix-up imports the backend's library.

        Args:
            purpose: What needs the library, e.g. ``"decompressing weight_packed"``.

        Raises:
            BackendUnavailableError: A library in :attr:`requires` is not installed; the
                message names it and ``purpose``, and ``install_hint`` holds the pip command.
        """
        from kbitprep._errors import BackendUnavailableError

        missing = self.missing_requirements()
        if missing:
            hint = self.install_hint or f"pip install {' '.join(missing)}"
            raise BackendUnavailableError(
                f"The {self.name!r} backend needs {', '.join(repr(m) for m in missing)} for {purpose}, which is "
                f"not installed. Install it with `{hint}`.",
                install_hint=hint,
            )

    @final
    def trainable(self, model: nn.Module) -> Verdict:
        """Whether adapters on ``model`` can train, as ``(ok, reason)`` like :meth:`shardable`.

        The question :meth:`check_trainable` answers by raising; this asks it and never raises
        :class:`~kbitprep.NotTrainableError`. Override :meth:`check_trainable`, not this.
        """
        from kbitprep._errors import NotTrainableError

        try:
            self.check_trainable(model)
        except NotTrainableError as exc:
            return Verdict(False, str(exc))
        return Verdict(True, f"the {self.name} strategy found nothing that stops adapters from training")

    def find_storage(self, model: nn.Module) -> str | None:
        """A one-line account of the quantized storage ``model`` holds, or ``None`` when it
        holds none (e.g. ``"42 tensors of quantized storage (float8_e4m3fn, float32)"``).

        :func:`kbitprep.detect_backend` asks this of the strategy a quantizer label points to:
        a label with no storage behind it (gpt-oss loaded with ``Mxfp4Config(dequantize=True)``,
        an FP8 checkpoint transformers dequantized on a CPU) is an unquantized model.
        Default: :func:`find_storage` with this strategy's :meth:`is_quantized_param`.
        Override when the storage lives in float buffers the rule cannot name.
        """
        return find_storage(model, self.is_quantized_param)

    def should_upcast(self, name: str, param: nn.Parameter, module: nn.Module) -> bool:
        """Whether ``upcast="auto"`` casts this non-quantized floating parameter. Default: no."""
        return False

    def wants_gradient_checkpointing(self, model: nn.Module) -> bool:
        """Whether checkpointing is turned on when the caller leaves the default. Default: yes."""
        return True

    def check_trainable(self, model: nn.Module) -> None:
        """Raise :class:`~kbitprep.NotTrainableError` when adapters on ``model`` cannot train.

        Called before anything is changed. Default: refuse when the transformers quantizer
        says ``is_trainable`` is False (transformers 5 ``HfQuantizer.is_trainable``).

        Raises:
            NotTrainableError: The quantizer reports that it cannot be trained.
        """
        from kbitprep._errors import NotTrainableError

        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None and getattr(quantizer, "is_trainable", True) is False:
            raise NotTrainableError(
                f"{type(model).__name__} was quantized by {type(quantizer).__name__}, whose "
                "is_trainable is False: adapters on it cannot receive gradients. Load the model "
                "with a quantization config that supports training (for example bitsandbytes "
                "4-bit), or pass backend=<name> to use a strategy that knows this method trains."
            )

    def before_training(self, model: nn.Module) -> UndoFn | None:
        """Backend-specific fix-ups that training needs (kernel modes, packed layouts).

        Called after :meth:`check_trainable` and before freezing. May return a callable that
        reverses the fix-ups; :meth:`kbitprep.PreparationReport.undo` calls it. Default: nothing.
        """
        return None

    def fixup_bytes(self, model: nn.Module) -> int:
        """The bytes :meth:`before_training` will add to ``model``'s parameter storage, net of what
        it takes out (planned first, so the plan's ``bytes_delta`` is what ``prepare`` spends).
        Must change nothing. Default: 0 (fix-ups that only switch modes)."""
        return 0

    def compute_dtype(self, model: nn.Module) -> torch.dtype | None:
        """The dtype the quantized layers compute in (bitsandbytes ``bnb_4bit_compute_dtype``,
        a GPTQ layer's ``scales`` dtype, an HQQ layer's ``compute_dtype``), or ``None`` when the
        layers do not say. The plan's ``compute_dtype`` is this, else the upcast dtype, else the
        model's dtype. Never read from quantized storage. Default: the first floating
        :meth:`input_dtype` a layer of ``model`` reports, else ``None``."""
        for module in model.modules():
            dtype = self.input_dtype(module)
            if dtype is not None and dtype.is_floating_point and not is_storage_dtype(dtype):
                return dtype
        return None

    def input_dtype(self, module: nn.Module) -> torch.dtype | None:
        """The dtype a quantized layer requires of its floating inputs, or ``None`` when the
        layer converts its inputs itself (bitsandbytes) or is not a quantized layer.

        Default: on a layer :meth:`find_layers` yields, the dtype its :attr:`input_dtype_attr`
        holds (a floating tensor's dtype, or a ``torch.dtype``); ``None`` for every other module,
        and for every module when :attr:`input_dtype_attr` is empty.
        """
        if not self.input_dtype_attr or not self.is_layer(module):
            return None
        value = getattr(module, self.input_dtype_attr, None)
        if isinstance(value, torch.Tensor):
            return value.dtype if value.is_floating_point() else None
        return value if isinstance(value, torch.dtype) else None

    def plan_warnings(self, model: nn.Module) -> list[str]:
        """Backend-specific findings to show in ``plan.warnings`` (never raises). Default: none."""
        return []

    def shardable(self, model: nn.Module) -> tuple[bool, str]:
        """Whether FSDP can shard this model's quantized storage with its float parameters.

        Returns:
            ``(ok, reason)`` (a :class:`Verdict` or a plain tuple); the reason says what was
            found. Default: not shardable, because the storage's layout is unknown.
        """
        return Verdict(False, f"the {self.name} backend does not declare its storage shardable by FSDP")


def is_installed(name: str) -> bool:
    """Whether the import name ``name`` (dotted, e.g. ``"optimum.quanto"``) can be imported, found
    without importing anything: ``importlib.util.find_spec`` imports a dotted name's parent
    packages, so each part is looked up in its parent's search path instead."""
    head, *rest = name.split(".")
    try:
        spec = importlib.util.find_spec(head)
    except (ImportError, ValueError):
        return False
    for part in rest:
        locations = None if spec is None else spec.submodule_search_locations
        if spec is None or not locations:
            return False
        spec = importlib.machinery.PathFinder.find_spec(f"{spec.name}.{part}", list(locations))
    return spec is not None


# -- evidence helpers shared by the built-in strategies ---------------------------------------
# (the storage and byte helpers live in kbitprep._storage and are re-exported here for plugins)


def _method_name(value: Any) -> str | None:
    if value is None:
        return None
    value = getattr(value, "value", value)  # transformers' QuantizationMethod is a str Enum
    return str(value).lower() if isinstance(value, str) and value else None


def config_quant_method(model: nn.Module) -> tuple[str, str] | None:
    """``(quant_method, evidence)`` from the transformers quantizer or config, else ``None``.

    Looks at ``model.hf_quantizer.quantization_config`` first, then
    ``model.config.quantization_config`` as an object (transformers 5) or a dict
    (transformers 4.57 for some methods).
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        qc = getattr(quantizer, "quantization_config", None)
        method = _method_name(getattr(qc, "quant_method", None))
        if method:
            return method, f"model.hf_quantizer is {type(quantizer).__name__} (quant_method {method!r})"
    config = getattr(model, "config", None)
    qc = getattr(config, "quantization_config", None)
    if isinstance(qc, dict):
        method = _method_name(qc.get("quant_method"))
        if method:
            return method, f"model.config.quantization_config['quant_method'] is {method!r}"
    elif qc is not None:
        method = _method_name(getattr(qc, "quant_method", None))
        if method:
            return method, f"model.config.quantization_config.quant_method is {method!r}"
    return None


def legacy_quant_method(model: nn.Module) -> tuple[str, str] | None:
    """``(quant_method, evidence)`` from the legacy instance attributes, else ``None``.

    transformers sets these with ``setattr`` and only on quantized loads, so each is read with
    ``getattr(..., default)``: ``quantization_method`` (all methods), ``is_loaded_in_4bit`` /
    ``is_loaded_in_8bit`` (bitsandbytes only), ``hqq_quantized`` (hqq's own wrapper).
    """
    method = _method_name(getattr(model, "quantization_method", None))
    if method:
        return method, f"model.quantization_method is {method!r}"
    if getattr(model, "is_loaded_in_4bit", False) is True:
        return "bitsandbytes", "model.is_loaded_in_4bit is True"
    if getattr(model, "is_loaded_in_8bit", False) is True:
        return "bitsandbytes", "model.is_loaded_in_8bit is True"
    if getattr(model, "hqq_quantized", False) is True:
        return "hqq", "model.hqq_quantized is True"
    return None


def loaded_module(name: str) -> Any | None:
    """The module ``name`` if it has already been imported, else ``None``.

    A model cannot hold a layer of a library that was never imported, so checking
    ``sys.modules`` finds layer classes without importing anything.
    """
    return sys.modules.get(name)


def modules_of_type(model: nn.Module, classes: tuple[type, ...]) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every submodule of ``model`` that is an instance of ``classes``."""
    if not classes:
        return
    for name, module in model.named_modules():
        hit = isinstance(module, classes)  # kept in a variable so the type is not narrowed
        if hit:
            yield name, module


def detect_in_tiers(
    model: nn.Module,
    methods: frozenset[str],
    layers: Callable[[nn.Module], str | None],
) -> str | None:
    """The shared three-tier detection: quantizer/config, legacy attributes, then layers.

    Args:
        model: The (unwrapped) model.
        methods: ``quant_method`` names that belong to the backend, lower case.
        layers: Looks at the modules themselves; returns a reason or None.
    """
    for evidence in (config_quant_method(model), legacy_quant_method(model)):
        if evidence is not None and evidence[0] in methods:
            return evidence[1]
    return layers(model)


def count_reason(count: int, what: str) -> str:
    """``"found 14 Linear4bit modules"`` style reason text."""
    return f"found {count} {what} module{'s' if count != 1 else ''}"


def found_reason(labels: Iterable[str], noun: str = "module") -> str | None:
    """The layer-count reason of a detection: each distinct label with how often it occurs,
    sorted by label, after one ``"found"``, or ``None`` when ``labels`` is empty.

    ``["EetqLinear"] * 14`` gives ``"found 14 EetqLinear modules"`` (as :func:`count_reason`);
    two labels give ``"found 2 Linear4bit modules, 1 Linear8bitLt module"``. ``noun`` names what
    was counted (torchao counts ``"weight"`` tensors).
    """
    counts = Counter(labels)
    if not counts:
        return None
    return "found " + ", ".join(f"{n} {label} {noun}{'s' if n != 1 else ''}" for label, n in sorted(counts.items()))


def most_common_dtype(dtypes: Iterable[torch.dtype | None]) -> torch.dtype | None:
    """The dtype that occurs most often in ``dtypes`` (``None`` skipped; of a tie, the one seen
    first), or ``None`` when there is none: e.g. the compute dtype most of a strategy's layers
    report (``most_common_dtype(self.input_dtype(m) for _n, m in self.find_layers(model))``)."""
    counts = Counter(d for d in dtypes if d is not None)
    return counts.most_common(1)[0][0] if counts else None
