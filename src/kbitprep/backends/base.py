"""The strategy interface every backend implements, and the evidence helpers they share."""

from __future__ import annotations

import abc
import importlib.util
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

__all__ = [
    "STORAGE_LEAF_NAMES",
    "STORAGE_LEAF_SUFFIXES",
    "QuantBackend",
    "UndoFn",
    "Verdict",
    "config_quant_method",
    "count_reason",
    "detect_in_tiers",
    "dominant_float_dtype",
    "find_storage",
    "is_storage_dtype",
    "is_storage_tensor",
    "is_wrapper_subclass",
    "layer_counter",
    "legacy_quant_method",
    "loaded_module",
    "model_param_bytes",
    "modules_of_type",
    "tensor_nbytes",
]

UndoFn = Callable[[], None]
"""What :meth:`QuantBackend.before_training` may return: a callable that reverses its fix-ups."""


class Verdict(NamedTuple):
    """The answer to a "can this model do X" question (:meth:`QuantBackend.trainable`,
    :meth:`QuantBackend.shardable`): unpacks as ``ok, reason = ...``."""

    ok: bool
    reason: str


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
    """transformers ``quant_method`` names (lower case) this strategy claims, e.g. ``{"gptq"}``."""
    unquantized: ClassVar[bool] = False
    """True only for the strategy of a model with no quantized storage (``none``): peft's
    upcast, checkpointing left as the model has it, and a warning that states the bytes added."""
    fallback: ClassVar[bool] = False
    """True for a strategy that claims whatever no specific strategy claims (``generic`` and
    ``none``): when it claims a model beside another strategy, :func:`kbitprep.detect_backend`
    does not list it among ``Detection.others``."""

    @abc.abstractmethod
    def detect(self, model: nn.Module) -> str | None:
        """A one-line reason when this backend quantized ``model``, else ``None``.

        Must not run a forward, read ``.weight`` on a layer that has none, or import a
        library that is not already imported by the model's own layers.
        """

    def is_quantized_param(self, name: str, param: nn.Parameter, module: nn.Module) -> bool:
        """Whether ``param`` is quantized storage: never cast, never made trainable, never
        counted when deciding whether dtypes are mixed, never read as a compute dtype.

        Default: :func:`is_storage_tensor` (integer, float8, e8m0 and float4 dtypes, tensor
        subclasses, and the scales / zero points / packed tensors of a module that holds such
        storage). An override should return ``True`` for its own extra storage and otherwise
        call ``super().is_quantized_param(...)``, so it keeps this rule.
        """
        return is_storage_tensor(name, param, module)

    @classmethod
    def missing_requirements(cls) -> tuple[str, ...]:
        """The names in :attr:`requires` that ``importlib.util.find_spec`` cannot find."""
        missing = []
        for lib in cls.requires:
            try:
                found = importlib.util.find_spec(lib) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                missing.append(lib)
        return tuple(missing)

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
        layer converts its inputs itself (bitsandbytes) or is not a quantized layer."""
        return None

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


STORAGE_LEAF_NAMES = frozenset(
    {
        "activation_scale",
        "input_global_scale",
        "input_scale",
        "input_zero_point",
        "output_scale",
        "packed_weight",
        "qzeros",
        "scale",
        "scales",
        "weight_global_scale",
        "weight_packed",
        "weight_scale",
        "weight_scale_2",
        "weight_scale_inv",
        "weight_zero_point",
        "zero_point",
        "zeros",
    }
)
"""Leaf names of quantization metadata that layers keep in a float dtype: transformers 5.24
``FP8Linear.weight_scale_inv`` / ``activation_scale`` and ``FbgemmFp8Linear.weight_scale``,
compressed-tensors 0.20 ``weight_scale`` / ``weight_zero_point`` / ``weight_global_scale`` /
``input_scale`` / ``weight_packed``, GPTQ/AWQ ``scales`` / ``qzeros``, ModelOpt ``weight_scale_2``."""

STORAGE_LEAF_SUFFIXES = ("_scale", "_scale_inv", "_scales", "_zero_point", "_global_scale", "_packed")
"""Suffixes of the same metadata on fused layers, e.g. transformers 5.24
``FbgemmFp8Llama4TextExperts.gate_up_proj_scale``."""


_INDEX_DTYPES = (torch.int64, torch.bool)  # position_ids, token_type_ids, causal masks: not storage


def _holds_primary_storage(module: nn.Module) -> bool:
    """Whether ``module`` itself (not its children) holds a storage-dtype or subclass tensor."""
    own = [
        *module._parameters.values(),
        *(b for b in module._buffers.values() if b is not None and b.dtype not in _INDEX_DTYPES),
    ]
    return any(t is not None and (is_storage_dtype(t.dtype) or is_wrapper_subclass(t)) for t in own)


def is_storage_tensor(name: str, tensor: torch.Tensor, module: nn.Module) -> bool:
    """Whether ``tensor`` (a parameter or buffer named ``name``, owned by ``module``) is
    quantized storage under the rule every backend shares.

    Storage is:

    * a tensor whose dtype only holds quantized data (:func:`is_storage_dtype`): integers,
      booleans, float8 ``e4m3fn``/``e4m3fnuz``/``e5m2``/``e5m2fnuz``, ``float8_e8m0fnu`` and
      ``float4_e2m1fn_x2``;
    * a tensor subclass (:func:`is_wrapper_subclass`: torchao, bitsandbytes ``Params4bit``);
    * a float tensor holding quantization metadata, named like a scale, zero point, global
      scale or packed tensor (:data:`STORAGE_LEAF_NAMES`, :data:`STORAGE_LEAF_SUFFIXES`),
      but only when ``module`` itself also holds a tensor of the first two kinds. A plain
      module's ``layer_scale`` therefore stays an ordinary parameter.

    Args:
        name: The tensor's name, qualified (``"model.layers.0.q_proj.weight_scale"``) or leaf.
        tensor: The parameter or buffer.
        module: The module that owns it directly.

    Returns:
        ``True`` when the tensor must never be cast, trained, or read as a compute dtype.
    """
    if is_storage_dtype(tensor.dtype) or is_wrapper_subclass(tensor):
        return True
    leaf = name.rpartition(".")[2]
    named_like = leaf in STORAGE_LEAF_NAMES or leaf.endswith(STORAGE_LEAF_SUFFIXES)
    return named_like and _holds_primary_storage(module)


def find_storage(
    model: nn.Module, is_storage: Callable[[str, nn.Parameter, nn.Module], bool] | None = None
) -> str | None:
    """Count the quantized storage ``model`` holds; ``None`` when it holds none.

    Parameters count when ``is_storage(name, param, owner)`` says so (default
    :func:`is_storage_tensor`). Buffers count under :func:`is_storage_tensor`, except int64 and
    bool buffers, which plain models use for indices and masks (``position_ids``, causal masks).

    Returns:
        ``"N tensors of quantized storage (dtype, ...)"`` or ``None``.
    """
    check = is_storage or is_storage_tensor
    modules = dict(model.named_modules(remove_duplicate=False))
    found: list[torch.dtype] = []
    for name, param in model.named_parameters():
        if check(name, param, modules.get(name.rpartition(".")[0], model)):
            found.append(param.dtype)
    for name, buf in model.named_buffers():
        owner = modules.get(name.rpartition(".")[0], model)
        if buf.dtype not in _INDEX_DTYPES and is_storage_tensor(name, buf, owner):
            found.append(buf.dtype)
    if not found:
        return None
    kinds = ", ".join(sorted({str(d).removeprefix("torch.") for d in found}))
    return f"{len(found)} tensor{'s' if len(found) != 1 else ''} of quantized storage ({kinds})"


def is_wrapper_subclass(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a tensor subclass other than plain ``Tensor`` / ``nn.Parameter``.

    torchao's quantized tensors report a float dtype and bitsandbytes' ``Params4bit`` may
    be stored as bf16; neither may be treated as an ordinary float parameter.
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


def dominant_float_dtype(
    model: nn.Module, is_storage: Callable[[str, nn.Parameter, nn.Module], bool]
) -> torch.dtype | None:
    """The floating dtype holding most bytes of ``model``'s parameters that are not storage by
    ``is_storage(name, param, owner)`` (the dtype the model was loaded in); ``None`` without any."""
    modules = dict(model.named_modules())
    by_bytes: Counter[torch.dtype] = Counter()
    for name, param in model.named_parameters():
        owner = modules.get(name.rpartition(".")[0], model)
        if param.is_floating_point() and not is_storage(name, param, owner):
            by_bytes[param.dtype] += tensor_nbytes(param)
    return by_bytes.most_common(1)[0][0] if by_bytes else None


def model_param_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters, each tensor once (tied weights counted once), by
    :func:`tensor_nbytes` (the real storage of quantized subclasses)."""
    return sum(tensor_nbytes(p) for p in model.parameters())  # parameters() yields each tensor once


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
