"""Fitting a prepared model into training loops that switch things on themselves.

transformers' ``Trainer`` calls ``activation_checkpointing_enable`` at the start of ``train()``
when ``TrainingArguments(gradient_checkpointing=True)``, and TRL's ``SFTTrainer`` calls
``enable_input_require_grads`` when it attaches adapters. On transformers 5.24 each of those
calls registers a fresh input-grad hook on the input embeddings without removing the earlier one
(``PreTrainedModel.enable_input_require_grads`` replaces its list of handles, not the hooks), so a
model kbitprep already prepared ends with two or three hooks and checkpointing set up twice.

:func:`guard_checkpointing` (called by :func:`kbitprep.prepare`) puts two small guards on the
prepared model instance:

- ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` on transformers 4):
  a call while checkpointing is already on with the same ``torch.utils.checkpoint`` keyword
  arguments, or with none, changes nothing. A call asking for different keyword arguments is
  applied, as transformers would, and reported with a :class:`~kbitprep.KbitPrepWarning` that
  names both values: kbitprep never resolves that conflict silently.
- ``enable_input_require_grads``: adds a hook only to an input embedding that has none.

Both are recorded in the report's undo log; :meth:`kbitprep.PreparationReport.undo` removes them.

:func:`mark_trainable` is the explicit opt-in for a model that transformers marks
non-trainable (``HfQuantizer.is_trainable`` False) although kbitprep's strategy has checked that
its quantized layers pass gradients (torchao ``IntxWeightOnlyConfig`` int4, case C16).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import types
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from kbitprep import _checkpointing as ckpt
from kbitprep._errors import KbitPrepWarning

__all__ = ["TrainabilityOverride", "guard_checkpointing", "internal_enable", "mark_trainable"]

logger = logging.getLogger(__name__)

_STATE = "_kbitprep_checkpointing_guard"
_INTERNAL: contextvars.ContextVar[bool] = contextvars.ContextVar("kbitprep_internal_enable", default=False)


@dataclass
class _GuardState:
    """What the guards on one model know and have done (kept on the model as ``_STATE``)."""

    enable_name: str  # "activation_checkpointing_enable" (transformers 5) or "gradient_checkpointing_enable"
    prepared_kwargs: dict[str, Any]
    log_add: Callable[[Callable[[], None]], None]
    absorbed_enable: int = 0  # enable calls answered without touching the model
    absorbed_input_grads: int = 0  # enable_input_require_grads calls that added nothing
    conflicts: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)


@contextlib.contextmanager
def internal_enable() -> Iterator[None]:
    """Let kbitprep's own checkpointing call through the guard (a second ``prepare``)."""
    token = _INTERNAL.set(True)
    try:
        yield
    finally:
        _INTERNAL.reset(token)


def current_kwargs(model: nn.Module) -> dict[str, Any] | None:
    """The ``torch.utils.checkpoint`` keyword arguments checkpointing uses now, or None when off.

    transformers keeps ``functools.partial(checkpoint, **kwargs)`` as ``_gradient_checkpointing_func``
    on each checkpointed module; a missing ``use_reentrant`` means torch's implicit reentrant mode.
    """
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            func = getattr(module, "_gradient_checkpointing_func", None)
            keywords = getattr(func, "keywords", None)
            out = dict(keywords) if isinstance(keywords, Mapping) else {}
            out.setdefault("use_reentrant", True)
            return out
    return None


def _normalise(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    out.setdefault("use_reentrant", True)  # torch's implicit (historical) default
    return out


def _requested(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Mapping[str, Any] | None, int, bool]:
    """(checkpoint kwargs, every_n_layers, offload) from a call to either enable name."""
    requested = (
        args[0] if args else kwargs.get("activation_checkpointing_kwargs", kwargs.get("gradient_checkpointing_kwargs"))
    )
    every_n_layers = args[1] if len(args) > 1 else kwargs.get("every_n_layers", 1)
    offload = args[2] if len(args) > 2 else kwargs.get("offload", False)
    return requested, int(every_n_layers), bool(offload)


def _guarded_enable(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    state: _GuardState = getattr(self, _STATE)
    original = getattr(type(self), state.enable_name).__get__(self)
    if _INTERNAL.get():
        return original(*args, **kwargs)
    if not ckpt.is_enabled(self):
        # turned on after prepare (a trainer, or the user): adapters must still get gradients
        # whatever the call order (C11); transformers 4.57 adds no input-grad hook here
        result = original(*args, **kwargs)
        if ckpt.current_use_reentrant(self):
            _ensure_entry_hooks(self, state)
        return result
    requested, every_n_layers, offload = _requested(args, kwargs)
    current = current_kwargs(self) or {}
    default_layout = every_n_layers == 1 and not offload
    if not requested:  # no preference (Trainer passes None when TrainingArguments has no kwargs)
        if default_layout:
            state.absorbed_enable += 1
            logger.debug("Checkpointing is already on with %s; %s() changed nothing", current, state.enable_name)
            return None
        return original(current, *args[1:], **{k: v for k, v in kwargs.items() if not k.endswith("_kwargs")})
    if _normalise(requested) == current:
        if default_layout:
            state.absorbed_enable += 1
            logger.debug("Checkpointing is already on with %s; %s() changed nothing", current, state.enable_name)
            return None
        return original(*args, **kwargs)
    wanted = _normalise(requested)
    state.conflicts.append((dict(current), wanted))
    source = "kbitprep.prepare" if current == state.prepared_kwargs else "an earlier enable call"
    warnings.warn(
        f"Gradient checkpointing is already on with gradient_checkpointing_kwargs={current} (set by "
        f"{source}), and {state.enable_name} now asks for {dict(requested)} (for example from "
        "TrainingArguments.gradient_checkpointing_kwargs). kbitprep applies the later request, as "
        "transformers would, and keeps one input-grad hook. To silence this, pass the same "
        "gradient_checkpointing_kwargs to kbitprep.prepare and to the trainer.",
        KbitPrepWarning,
        stacklevel=3,
    )
    result = original(*args, **kwargs)
    if wanted.get("use_reentrant"):
        _ensure_entry_hooks(self, state)
    return result


def _ensure_entry_hooks(model: nn.Module, state: _GuardState) -> None:
    # reentrant checkpointing needs the embeddings' output to require grad (C08); transformers'
    # enable adds it only when main_input_name is "input_ids"
    for _name, module in ckpt.entry_modules(model):
        if not ckpt.has_input_grad_hook(module):
            handle = ckpt.add_input_grad_hook(module)
            state.log_add(handle.remove)


def _hooked_modules(model: nn.Module) -> dict[int, nn.Module]:
    return {id(m): m for _n, m in ckpt.entry_modules(model) if ckpt.has_input_grad_hook(m)}


def _guarded_input_grads(self: nn.Module) -> Any:
    state: _GuardState = getattr(self, _STATE)
    entries = [m for _n, m in ckpt.entry_modules(self)]
    hooked = _hooked_modules(self)
    if entries and all(id(m) in hooked for m in entries):
        state.absorbed_input_grads += 1
        logger.debug("The input embeddings already carry an input-grad hook; enable_input_require_grads() added none")
        return None
    before = list(getattr(self, "_require_grads_hooks", None) or [])
    result = type(self).enable_input_require_grads(self)  # type: ignore[attr-defined]
    kept = []
    for handle in list(getattr(self, "_require_grads_hooks", None) or []):
        if any(m._forward_hooks is handle.hooks_dict_ref() for m in hooked.values()):
            handle.remove()  # that embedding had a hook already
        else:
            kept.append(handle)
    handles = before + kept
    # transformers keeps its handles here (disable_input_require_grads removes them)
    self._require_grads_hooks = handles  # type: ignore[assignment]
    if handles:
        self._require_grads_hook = handles[0]
    return result


def guard_checkpointing(
    model: nn.Module, prepared_kwargs: Mapping[str, Any], log_add: Callable[[Callable[[], None]], None]
) -> bool:
    """Install the two guards on ``model`` (the transformers model, not a ``PeftModel``).

    Args:
        model: The model whose checkpointing :func:`kbitprep.prepare` just turned on or found on.
        prepared_kwargs: The ``torch.utils.checkpoint`` keyword arguments it uses
            (``use_reentrant`` explicit).
        log_add: Where to record the undo of each change (``_UndoLog.add``).

    Returns:
        Whether guards were installed now (False when present already or when the model has no
        transformers checkpointing method).
    """
    if _STATE in vars(model):
        return False
    if hasattr(type(model), "activation_checkpointing_enable"):  # transformers 5 renamed the method
        enable_name = "activation_checkpointing_enable"
    elif hasattr(type(model), "gradient_checkpointing_enable"):
        enable_name = "gradient_checkpointing_enable"
    else:
        return False
    state = _GuardState(enable_name, _normalise(prepared_kwargs), log_add)
    setattr(model, _STATE, state)
    installed = [enable_name]
    setattr(model, enable_name, types.MethodType(_guarded_enable, model))
    if hasattr(type(model), "enable_input_require_grads"):
        model.enable_input_require_grads = types.MethodType(_guarded_input_grads, model)  # type: ignore[assignment]
        installed.append("enable_input_require_grads")

    def remove() -> None:
        for name in installed:
            value = vars(model).get(name)
            if isinstance(value, types.MethodType) and value.__func__ in (_guarded_enable, _guarded_input_grads):
                delattr(model, name)
        vars(model).pop(_STATE, None)

    log_add(remove)
    return True


# -- the is_trainable opt-in ----------------------------------------------------------------

_TRAINABLE_CLASSES: dict[type, type] = {}


def _trainable_subclass(cls: type) -> type:
    sub = _TRAINABLE_CLASSES.get(cls)
    if sub is None:
        sub = type(
            cls.__name__,
            (cls,),
            {
                "is_trainable": property(lambda self: True),
                "_kbitprep_original_class": cls,
                "__doc__": f"{cls.__name__} with is_trainable True (kbitprep.mark_trainable).",
                "__module__": __name__,
                "__qualname__": f"_TRAINABLE_CLASSES[{cls.__name__}]",
            },
        )
        _TRAINABLE_CLASSES[cls] = sub
    return sub


@dataclass
class TrainabilityOverride:
    """What :func:`mark_trainable` changed; :meth:`undo` (or leaving the ``with`` block) reverts it.

    Attributes:
        quantizer: The ``model.hf_quantizer`` whose ``is_trainable`` now reads True, or None when
            nothing needed changing.
        reason: Why the override was (or was not) needed, for logs.
    """

    quantizer: Any
    reason: str

    @property
    def active(self) -> bool:
        """Whether the override is in place."""
        q = self.quantizer
        return q is not None and getattr(type(q), "_kbitprep_original_class", None) is not None

    def undo(self) -> None:
        """Give the quantizer its own class back, so ``is_trainable`` is transformers' answer
        again. Calling it twice does nothing."""
        q = self.quantizer
        if q is not None:
            original = getattr(type(q), "_kbitprep_original_class", None)
            if original is not None:
                q.__class__ = original

    def __enter__(self) -> TrainabilityOverride:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()


def mark_trainable(model: nn.Module) -> TrainabilityOverride:
    """Let transformers' ``Trainer`` accept a model it marks non-trainable but that trains.

    transformers 5.24 ``Trainer.__init__`` calls ``trainer_utils.validate_quantization_for_training``,
    which refuses any model whose ``hf_quantizer.is_trainable`` is False. For torchao that flag is
    decided by the config's bit width (``TorchAoHfQuantizer.is_trainable`` is True only for 8-bit
    configs), so ``IntxWeightOnlyConfig(weight_dtype=torch.int4)`` is refused although LoRA on it
    receives gradients (case C16). This function asks kbitprep's strategy first: only when its
    ``check_trainable`` passes (for torchao, a train-mode probe of every quantized layer with a
    grad-requiring input) does it make ``model.hf_quantizer.is_trainable`` read True, by giving
    that quantizer object a subclass of its own class that overrides only ``is_trainable``.
    Nothing else about the model changes.

    Args:
        model: A transformers model or a ``peft.PeftModel`` around one, on any device.

    Returns:
        The override; call ``undo()`` after training, or use it as a context manager around
        building and running the trainer. When the quantizer already says trainable, or there is
        none, the override changes nothing (``active`` is False).

    Raises:
        NotTrainableError: kbitprep's strategy for this backend says adapters cannot train
            (e.g. torchao ``Int8DynamicActivationInt8WeightConfig``, or a backend that defers to
            transformers' flag), so the flag is left as it is.
    """
    from kbitprep._registry import detect_backend, get_backend, unwrap_model

    base = unwrap_model(model)
    quantizer = getattr(base, "hf_quantizer", None)
    if quantizer is None:
        return TrainabilityOverride(None, "the model has no transformers quantizer; Trainer does not check it")
    if getattr(type(quantizer), "_kbitprep_original_class", None) is not None:
        return TrainabilityOverride(quantizer, "already marked trainable")
    if getattr(quantizer, "is_trainable", False) is True:
        return TrainabilityOverride(None, f"{type(quantizer).__name__}.is_trainable is already True")
    detection = detect_backend(base)
    get_backend(detection.backend).check_trainable(base)  # raises NotTrainableError
    quantizer.__class__ = _trainable_subclass(type(quantizer))
    reason = (
        f"{type(quantizer).__name__}.is_trainable is False, but the {detection.backend} strategy found "
        "that every quantized layer passes gradients"
    )
    logger.info("Marked %s trainable for transformers' Trainer: %s", type(base).__name__, reason)
    return TrainabilityOverride(quantizer, reason)
