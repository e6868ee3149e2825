"""Fitting a prepared model into training loops that switch checkpointing on themselves.

Fitting a prepared model into training loops that switch things on themselves:

transformers' ``Trainer`` calls ``activation_checkpointing_enable`` at the start of ``train()``
when ``TrainingArguments(gradient_checkpointing=True)``, and TRL's ``SFTTrainer`` calls
``enable_input_require_grads`` when it attaches adapters. On transformers 5.24 each of those
calls registers a fresh input-grad hook on the input embeddings without removing the earlier one
(``PreTrainedModel.enable_input_require_grads`` replaces its list of handles, not the hooks), so a
model kbitprep already prepared ends with two or three hooks and checkpointing set up twice.

:func:`guard_checkpointing` (called by the checkpoint step's apply) puts two small guards on the
prepared model instance:

- ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` on transformers 4):
  a call while checkpointing is already on with the same ``torch.utils.checkpoint`` keyword
  arguments, or with none, changes nothing. A call asking for different keyword arguments is
  applied, as transformers would, and reported with a :class:`~kbitprep.CheckpointingWarning` that
  names both values: kbitprep never resolves that conflict silently.
- ``enable_input_require_grads``: adds a hook only to an input embedding that has none.

Both are recorded in the report's undo log; :meth:`kbitprep.PreparationReport.undo` removes them.

"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from kbitprep._errors import CheckpointingWarning
from kbitprep.steps import checkpoint_transformers as ckpt
from kbitprep.steps.checkpoint_transformers import current_kwargs, normalise_kwargs

__all__ = ["guard_checkpointing"]

logger = logging.getLogger(__name__)

_STATE = "_kbitprep_checkpointing_guard"


@dataclass
class _GuardState:
    """What the guards on one model know and have done (kept on the model as ``_STATE``)."""

    enable_name: str  # "activation_checkpointing_enable" (transformers 5) or "gradient_checkpointing_enable"
    prepared_kwargs: dict[str, Any]
    log_add: Callable[[Callable[[], None]], None]
    absorbed_enable: int = 0  # enable calls answered without touching the model
    absorbed_input_grads: int = 0  # enable_input_require_grads calls that added nothing
    conflicts: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the undo log (its entries close over the live model): a model loaded
        back keeps its guards, and what they absorb later is not recorded for an undo."""
        return {**self.__dict__, "log_add": _unlogged}

    def __deepcopy__(self, memo: dict[int, Any]) -> _GuardState:
        new = object.__new__(_GuardState)
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new


def _unlogged(_undo: Callable[[], None]) -> None:
    """The undo log of a guard loaded back from a pickle: nothing to record into."""


class _Guard:
    """One guard method bound to its model, set as an instance attribute in place of the
    transformers method. A bound method of a module-level function would not pickle (pickle looks
    the function up on the model by name); this holds the function and the model."""

    def __init__(self, func: Callable[..., Any], model: nn.Module) -> None:
        self.func = func
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(self.model, *args, **kwargs)


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
    if ckpt.is_internal_enable():
        return original(*args, **kwargs)
    if not ckpt.is_enabled(self):
        # turned on after prepare (a trainer, or the user): adapters must still get gradients
        # whatever the call order; transformers 4.57 adds no input-grad hook here
        result = original(*args, **kwargs)
        if ckpt.current_use_reentrant(self) or ckpt.enable_installs_input_grads(self):
            _ensure_entry_hooks(self, state)
        return result
    requested, every_n_layers, offload = _requested(args, kwargs)
    current = current_kwargs(self) or {}
    default_layout = every_n_layers == 1 and not offload
    if not requested:  # no preference (Trainer passes None when TrainingArguments has no kwargs)
        if default_layout:
            _absorb(self, state, current)
            return None
        return original(current, *args[1:], **{k: v for k, v in kwargs.items() if not k.endswith("_kwargs")})
    if normalise_kwargs(requested) == current:
        if default_layout:
            _absorb(self, state, current)
            return None
        return original(*args, **kwargs)
    wanted = normalise_kwargs(requested)
    state.conflicts.append((dict(current), wanted))
    source = "kbitprep.prepare" if current == state.prepared_kwargs else "an earlier enable call"
    warnings.warn(
        f"Gradient checkpointing is already on with gradient_checkpointing_kwargs={current} (set by "
        f"{source}), and {state.enable_name} now asks for {dict(requested)} (for example from "
        "TrainingArguments.gradient_checkpointing_kwargs). kbitprep applies the later request, as "
        "transformers would, and keeps one input-grad hook. To silence this, pass the same "
        "gradient_checkpointing_kwargs to kbitprep.prepare and to the trainer.",
        CheckpointingWarning,
        stacklevel=3,
    )
    result = original(*args, **kwargs)
    if wanted.get("use_reentrant") or ckpt.enable_installs_input_grads(self):
        _ensure_entry_hooks(self, state)
    return result


def _absorb(model: nn.Module, state: _GuardState, current: Mapping[str, Any]) -> None:
    """An enable call answered without re-enabling: still leave what the call itself would
    have installed for training to work (transformers 5's input-grad hook)."""
    state.absorbed_enable += 1
    if current.get("use_reentrant") or ckpt.enable_installs_input_grads(model):
        _ensure_entry_hooks(model, state)
    logger.debug("Checkpointing is already on with %s; %s() changed nothing", current, state.enable_name)


def _ensure_entry_hooks(model: nn.Module, state: _GuardState) -> None:
    # reentrant checkpointing needs the embeddings' output to require grad; transformers'
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
    state = _GuardState(enable_name, normalise_kwargs(prepared_kwargs), log_add)
    setattr(model, _STATE, state)
    installed = [enable_name]
    setattr(model, enable_name, _Guard(_guarded_enable, model))
    if hasattr(type(model), "enable_input_require_grads"):
        setattr(model, "enable_input_require_grads", _Guard(_guarded_input_grads, model))  # noqa: B010
        installed.append("enable_input_require_grads")

    def remove() -> None:
        for name in installed:
            value = vars(model).get(name)
            if isinstance(value, _Guard) and value.func in (_guarded_enable, _guarded_input_grads):
                delattr(model, name)
        vars(model).pop(_STATE, None)

    log_add(remove)
    return True
