"""The strategy interface every backend implements, and the evidence helpers they share."""

from __future__ import annotations

import abc
import sys
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = [
    "QuantBackend",
    "UndoFn",
    "config_quant_method",
    "count_reason",
    "detect_in_tiers",
    "is_storage_dtype",
    "is_wrapper_subclass",
    "layer_counter",
    "legacy_quant_method",
    "loaded_module",
    "modules_of_type",
    "tensor_nbytes",
]

UndoFn = Callable[[], None]
"""What :meth:`QuantBackend.before_training` may return: a callable that reverses its fix-ups."""


class QuantBackend(abc.ABC):
    """Strategy for one quantization method: what is quantized storage, what may be upcast,
    whether checkpointing is wanted, and what must hold before adapters can train.

    The orchestrator (:func:`kbitprep.prepare`) asks these questions and never compares
    ``name``. Subclasses set ``name`` and implement :meth:`detect`; every other method has a
    default that is right for a backend whose kernels own their compute dtype.

    Attributes:
        name: Registry name, e.g. ``"bitsandbytes"``; a plugin uses its own.
        priority: Higher wins when two backends claim one model. Built-ins use 0; the
            ``generic`` fallback uses -100 and ``none`` -1000.
        install_hint: pip command that installs the backend's library.
        shardable: Whether the quantized storage can be sharded by FSDP together with the
            float parameters (see :mod:`kbitprep` distributed mode). ``None`` means unknown.
    """

    name: ClassVar[str]
    priority: ClassVar[int] = 0
    install_hint: ClassVar[str] = ""
    quant_methods: ClassVar[frozenset[str]] = frozenset()
    """transformers ``quant_method`` names (lower case) this strategy claims, e.g. ``{"gptq"}``."""
    unquantized: ClassVar[bool] = False
    """True only for the strategy of a model with no quantized storage (``none``): peft's
    upcast, checkpointing left as the model has it, and a warning that states the bytes added."""

    @abc.abstractmethod
    def detect(self, model: nn.Module) -> str | None:
        """A one-line reason when this backend quantized ``model``, else ``None``.

        Must not run a forward, read ``.weight`` on a layer that has none, or import a
        library that is not already imported by the model's own layers.
        """

    def is_quantized_param(self, name: str, param: nn.Parameter, module: nn.Module) -> bool:
        """Whether ``param`` is quantized storage: never cast, never made trainable.

        Default: an integer or boolean dtype, or any tensor subclass other than plain
        ``nn.Parameter`` (torchao's float-reporting subclasses, bitsandbytes ``Params4bit``).
        """
        return (not param.is_floating_point() and not param.is_complex()) or is_wrapper_subclass(param)

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

    def compute_dtype(self, model: nn.Module) -> torch.dtype | None:
        """The dtype the quantized layers compute in (bitsandbytes ``bnb_4bit_compute_dtype``,
        a GPTQ layer's ``scales`` dtype, an HQQ layer's ``compute_dtype``), or ``None`` when the
        layers do not say. The plan's ``compute_dtype`` is this, else the upcast dtype, else the
        model's dtype. Never read from quantized storage. Default: ``None``."""
        return None

    def input_dtype(self, module: nn.Module) -> torch.dtype | None:
        """The dtype a quantized layer requires of its floating inputs, or ``None`` when the
        layer converts its inputs itself (bitsandbytes) or is not a quantized layer."""
        return None

    def plan_warnings(self, model: nn.Module) -> list[str]:
        """Backend-specific findings to show in ``plan.warnings`` (never raises). Default: none."""
        return []

    def shardable(self, model: nn.Module) -> tuple[bool, str]:
        """Whether FSDP can shard this model's quantized storage with its float parameters.

        Returns:
            ``(ok, reason)``; the reason says what was found. Default: not shardable, because
            the storage's layout is unknown.
        """
        return False, f"the {self.name} backend does not declare its storage shardable by FSDP"


# -- evidence helpers shared by the built-in strategies ---------------------------------------


def _storage_float_dtypes() -> frozenset[torch.dtype]:
    names = (
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
    )
    return frozenset(d for n in names if isinstance(d := getattr(torch, n, None), torch.dtype))


_STORAGE_FLOAT_DTYPES = _storage_float_dtypes()


def is_storage_dtype(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` only ever holds quantized storage: integers, booleans, and the
    float8 (e4m3/e5m2), e8m0 and float4 formats torch 2.13 defines. No module computes in
    these, so they are never cast, trained or read as a compute dtype."""
    return dtype in _STORAGE_FLOAT_DTYPES or not (dtype.is_floating_point or dtype.is_complex)


def is_wrapper_subclass(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a tensor subclass other than plain ``Tensor`` / ``nn.Parameter``.

    torchao's quantized tensors report a float dtype (C07) and bitsandbytes' ``Params4bit`` may
    be stored as bf16 (C06); neither may be treated as an ordinary float parameter.
    """
    return type(tensor) not in (torch.Tensor, nn.Parameter) or hasattr(tensor, "__tensor_flatten__")


def tensor_nbytes(tensor: torch.Tensor) -> int:
    """Bytes of the real storage of ``tensor``: numel × element size, or for a wrapper subclass
    (``__tensor_flatten__``, e.g. torchao ``Int8Tensor``) the sum over its inner tensors."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, nn.Parameter):
        try:
            names, _ctx = flatten()
            inner = [getattr(tensor, n) for n in names]
            return sum(tensor_nbytes(t) for t in inner if isinstance(t, torch.Tensor))
        except Exception:  # a subclass whose flatten misbehaves: fall back to the outer view
            pass
    return tensor.numel() * tensor.element_size()


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


def layer_counter(classes: Callable[[], tuple[type, ...]], label: str) -> Callable[[nn.Module], str | None]:
    """The third detection tier for a backend with one kind of layer: ``"found 14 <label>
    modules"`` when ``model`` holds instances of ``classes()`` (looked up lazily), else None."""

    def layers(model: nn.Module) -> str | None:
        n = sum(1 for _ in modules_of_type(model, classes()))
        return count_reason(n, label) if n else None

    return layers


def count_reason(count: int, what: str) -> str:
    """``"found 14 Linear4bit modules"`` style reason text."""
    return f"found {count} {what} module{'s' if count != 1 else ''}"
