"""The transformers / peft internals kbitprep touches, in one place.

Unwrapping a ``peft.PeftModel``, finding the parameters of adapters already attached, and the
input-grad hook bookkeeping transformers keeps (``_require_grads_hooks``) all live here; no other
module reads or edits them.

Fitting a prepared model into training loops that switch things on themselves:

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
  applied, as transformers would, and reported with a :class:`~kbitprep.CheckpointingWarning` that
  names both values: kbitprep never resolves that conflict silently.
- ``enable_input_require_grads``: adds a hook only to an input embedding that has none.

Both are recorded in the report's undo log; :meth:`kbitprep.PreparationReport.undo` removes them.

"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import logging
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kbitprep import _checkpointing as ckpt
from kbitprep._errors import CheckpointingWarning

__all__ = [
    "adapter_param_ids",
    "checkpoint_blocks",
    "enable_recorded",
    "guard_checkpointing",
    "install_selective",
    "internal_enable",
    "unwrap_model",
]

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
    if _normalise(requested) == current:
        if default_layout:
            _absorb(self, state, current)
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
    state = _GuardState(enable_name, _normalise(prepared_kwargs), log_add)
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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``peft.PeftModel`` (looked through), else ``model``."""
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model, getattr(peft, "PeftModel", ())):
        wrapped: Any = model
        base: nn.Module = wrapped.get_base_model()
        return base
    return model


def adapter_param_ids(model: nn.Module) -> set[int]:
    """ids of the parameters of adapters already attached: PEFT tuner layers' adapter
    sub-modules (``lora_A``, ``lora_B``, ...) and ``modules_to_save`` copies. Reads peft only
    when it is already imported (a model cannot hold its layers otherwise)."""
    peft_tuners = sys.modules.get("peft.tuners.tuners_utils")
    base_layer_cls = getattr(peft_tuners, "BaseTunerLayer", None) if peft_tuners else None
    ids: set[int] = set()
    if base_layer_cls is None:
        return ids
    peft_other = sys.modules.get("peft.utils.other")
    wrapper_cls = getattr(peft_other, "ModulesToSaveWrapper", None) if peft_other else None
    for module in model.modules():
        if isinstance(module, base_layer_cls):
            for attr in tuple(getattr(module, "adapter_layer_names", ())) + ("modules_to_save",):
                ids.update(_param_ids(getattr(module, attr, None)))
        if wrapper_cls is not None and isinstance(module, wrapper_cls):
            ids.update(_param_ids(getattr(module, "modules_to_save", None)))
    return ids


def _param_ids(sub: object) -> set[int]:
    if isinstance(sub, nn.Module):
        return {id(p) for p in sub.parameters()}
    if isinstance(sub, torch.Tensor):
        return {id(sub)}
    return set()


# -- turning checkpointing on, recorded for undo -------------------------------------------------

_MISSING = object()
_HANDLE_ATTRS = ("_require_grads_hooks", "_require_grads_hook")


def enable_recorded(
    base: nn.Module,
    kwargs: dict[str, Any],
    every_n_layers: int,
    offload: bool,
    log_add: Callable[[Callable[[], None]], None],
) -> None:
    """Turn checkpointing on through transformers' own call and record how to undo it.

    Whatever that call installs for training to work (transformers 5 adds an input-grad hook to
    the input embeddings) is kept; undo removes exactly what it added and puts back the
    per-module checkpointing attributes and transformers' handle bookkeeping
    (``_require_grads_hooks``), also when checkpointing was already on in another mode.
    """
    before_ids = {id(h) for h in getattr(base, "_require_grads_hooks", None) or []}
    saved_attrs = [
        (m, a, m.__dict__.get(a, _MISSING))
        for m in base.modules()
        if hasattr(m, "gradient_checkpointing")
        for a in ("gradient_checkpointing", "_gradient_checkpointing_func")
    ]
    saved_handles = {a: vars(base).get(a, _MISSING) for a in _HANDLE_ATTRS}
    hooked = {id(m._forward_hooks) for m in base.modules() if ckpt.has_input_grad_hook(m)}
    before = list(getattr(base, "_require_grads_hooks", None) or [])
    with internal_enable():  # past our own guard on a second prepare
        ckpt.enable(base, kwargs, every_n_layers, offload)
    added = [h for h in (getattr(base, "_require_grads_hooks", None) or []) if id(h) not in before_ids]
    # an embedding that already had an input-grad hook keeps that one; the call's second is dropped
    for handle in [h for h in added if id(h.hooks_dict_ref()) in hooked]:
        handle.remove()
        added.remove(handle)
    if added or before:
        hf: Any = base
        hf._require_grads_hooks = before + added
        hf._require_grads_hook = (before + added)[0]

    def restore() -> None:
        for handle in added:
            handle.remove()
        for module, attr, value in saved_attrs:
            _put_back(module, attr, value)
        for attr, value in saved_handles.items():
            _put_back(base, attr, value)

    log_add(restore)


def _put_back(obj: Any, attr: str, value: Any) -> None:
    if value is not _MISSING:
        setattr(obj, attr, value)
    elif attr in vars(obj):
        delattr(obj, attr)


def checkpoint_blocks(base: nn.Module) -> list[nn.Module]:
    """The repeated blocks transformers checkpoints (``GradientCheckpointingLayer`` instances)."""
    layers = sys.modules.get("transformers.modeling_layers")
    cls = getattr(layers, "GradientCheckpointingLayer", None)
    if cls is None:
        return []
    return [m for m in base.modules() if isinstance(m, cls)]


def _has_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


_SELECTIVE = "_kbitprep_selective"


def _tensors(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """The tensors in a block's arguments (one level of tuples, lists and dicts deep, as
    ``position_embeddings=(cos, sin)``)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 2 and isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item, depth + 1)
    elif depth < 2 and isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item, depth + 1)


def _replace(value: Any, swap: Mapping[int, torch.Tensor], depth: int = 0) -> Any:
    """``value`` with each tensor whose id is in ``swap`` replaced (same nesting as :func:`_tensors`)."""
    if isinstance(value, torch.Tensor):
        return swap.get(id(value), value)
    if depth < 2 and isinstance(value, tuple):
        return tuple(_replace(v, swap, depth + 1) for v in value)
    if depth < 2 and isinstance(value, list):
        return [_replace(v, swap, depth + 1) for v in value]
    if depth < 2 and isinstance(value, dict):
        return {k: _replace(v, swap, depth + 1) for k, v in value.items()}
    return value


class _FrozenPrefix:
    """The frozen-prefix rule of the selective checkpointing layouts, for one model.

    During a training forward (train mode, grad enabled), a block that holds no trainable
    parameter and whose tensor inputs require grad only because they were marked so (the input
    embeddings' output, made to require grad by an input-grad hook: transformers'
    ``enable_input_require_grads`` or kbitprep's own) has nothing to send a gradient to: no
    trainable parameter is upstream of it or in it. It runs with grad mode off, so it builds no
    graph and keeps no activation, and it is not checkpointed (its ``gradient_checkpointing``
    flag is turned off, and back on once the prefix ends before it, unless checkpointing was set
    up anew in between). The first block that holds a trainable parameter or receives a truly
    trainable input ends the prefix for this forward: it and every block after it run as the
    checkpointing layout says; when it is checkpointed and none of its positional inputs
    requires grad (the prefix ran without a graph), its hidden state is handed on as a leaf that
    requires grad (see ``_hand_on``).

    The rule never changes a gradient: the prefix had no path to a trainable parameter. An input
    is truly trainable when its autograd graph reaches a leaf that is not marked: a trainable
    parameter, a ``requires_grad`` tensor the caller passed, a prompt encoder's output. Marked
    are the input embeddings' leaf outputs and whatever a prefix block hands on that requires
    grad (a leaf a model makes for reentrant checkpointing, such as T5's zero position bias),
    in this forward.
    """

    def __init__(self) -> None:
        self.checking = False
        self.marked: list[weakref.ref[torch.Tensor]] = []
        # id(block) -> (block, the checkpoint function in place when its flag was turned off)
        self.off: dict[int, tuple[nn.Module, Any]] = {}
        self.now: set[int] = set()  # the blocks of this forward's prefix
        self.paused: set[int] = set()  # prefix blocks running now, grad mode off

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the weak references of the forward in progress."""
        return {"checking": False, "marked": [], "off": self.off, "now": set(), "paused": set()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.off = {id(block): (block, func) for block, func in self.off.values()}  # keyed by the new blocks

    def __deepcopy__(self, memo: dict[int, Any]) -> _FrozenPrefix:
        """A copy for the copied model (its blocks, found through ``memo``), with no forward in
        progress; registered in ``memo`` first, as the blocks' hooks refer back to it."""
        new = _FrozenPrefix()
        memo[id(self)] = new
        copied = copy.deepcopy(list(self.off.values()), memo)
        new.off = {id(block): (block, func) for block, func in copied}
        return new

    # -- hooks ----------------------------------------------------------------------------------

    def start(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook of the model: a new forward starts checking from the first block."""
        self.checking = module.training and torch.is_grad_enabled()
        self.marked.clear()
        self.now.clear()

    def record(self, module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook of each input embedding: a leaf output (the embedding is frozen) that
        requires grad does so only because an input-grad hook says so, before or after this one."""
        if self.checking and isinstance(output, torch.Tensor) and output.grad_fn is None:
            self.marked.append(weakref.ref(output))

    def enter(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Forward pre-hook of each block (with kwargs): run a frozen prefix block without
        building a graph, or end the prefix."""
        if not self.checking or not block.training or not torch.is_grad_enabled():
            return None
        grads = [t for t in _tensors((args, kwargs)) if t.requires_grad]
        if not _has_trainable(block) and not self._any_trainable_path(grads):
            self._turn_off(block)
            self.paused.add(id(block))
            torch.set_grad_enabled(False)
            return None
        self.checking = False
        self._turn_back_on(keep=self.now)
        return self._hand_on(block, args, kwargs)

    def leave(self, block: nn.Module, args: Any, output: Any) -> None:
        """Forward hook of each block (always called): after a prefix block, turn grad mode back
        on, record what it hands on that requires grad (a leaf a model makes inside for reentrant
        checkpointing, such as T5's zero position bias) as marked, and release what peft's aLoRA
        registered for the recompute of a checkpointed block
        (``_peft_gradient_checkpointing_forward_hooks``): the full backward hook that removes them
        never fires on a block that built no graph, and peft refuses the block's next forward
        while they are left."""
        if id(block) not in self.paused:
            return
        self.paused.discard(id(block))
        torch.set_grad_enabled(True)
        self.marked.extend(weakref.ref(t) for t in _tensors(output) if t.requires_grad)
        handles = getattr(block, "_peft_gradient_checkpointing_forward_hooks", None)
        while isinstance(handles, list) and handles:
            handle = handles.pop()
            if isinstance(handle, torch.utils.hooks.RemovableHandle):
                handle.remove()

    # -- helpers --------------------------------------------------------------------------------

    def _any_trainable_path(self, grads: list[torch.Tensor]) -> bool:
        if not grads:
            return False
        marked = {id(t) for t in (ref() for ref in self.marked) if t is not None}
        seen: dict[int, Any] = {}
        stack: list[Any] = []
        for t in grads:
            if t.grad_fn is None:
                if id(t) not in marked:
                    return True
            else:
                stack.append(t.grad_fn)
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen[id(node)] = node  # held, so that ids stay unique during the walk
            variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf that requires grad
            if isinstance(variable, torch.Tensor):
                if id(variable) not in marked:
                    return True
                continue
            stack.extend(n for n, _i in node.next_functions if n is not None)
        return False

    def _turn_off(self, block: nn.Module) -> None:
        layer: Any = block
        self.now.add(id(block))
        if layer.gradient_checkpointing:
            layer.gradient_checkpointing = False
            self.off[id(block)] = (block, getattr(block, "_gradient_checkpointing_func", None))

    def _turn_back_on(self, keep: set[int] | frozenset[int] = frozenset()) -> None:
        """Blocks of an earlier prefix that are not in this one (``keep``) are checkpointed again
        as the layout says; not when checkpointing was set up anew (or turned off) since, which
        replaces the checkpoint function."""
        for key, (block, func) in list(self.off.items()):
            if key in keep:
                continue
            layer: Any = block
            if getattr(block, "_gradient_checkpointing_func", None) is func:
                layer.gradient_checkpointing = True
            del self.off[key]

    def _hand_on(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A checkpointed block after a detached prefix gets its hidden state as a leaf that
        requires grad, as it would have without the rule: reentrant checkpointing records no
        backward otherwise, and peft's aLoRA under non-reentrant checkpointing removes its
        per-forward hooks from a full backward hook that, without an input requiring grad, fires
        before the recompute (a ``CheckpointError``)."""
        layer: Any = block
        if not layer.gradient_checkpointing:
            return None
        positional = [t for t in _tensors(args) if t.is_floating_point()]
        if not positional or any(t.requires_grad for t in positional):
            return None
        hidden = positional[0]
        return _replace(args, {id(hidden): hidden.detach().requires_grad_(True)}), kwargs

    def restore(self) -> None:
        """Undo: the flags this rule turned off are turned back on."""
        self._turn_back_on()


def install_selective(base: nn.Module, log_add: Callable[[Callable[[], None]], None]) -> bool:
    """Install the frozen-prefix rule of the selective layouts on ``base`` (see
    :class:`_FrozenPrefix`): ``checkpoint_trainable_blocks_only`` (every block from the first
    trainable one on checkpointed) and ``checkpoint_every_n_layers`` (every n-th block, as
    transformers sets the flags).

    Adapters are usually attached after ``prepare``, so the rule is applied at each training
    forward: a forward pre-hook on ``base`` starts it, a forward hook on each input embedding
    records the outputs an input-grad hook marks, a forward pre-hook on each block decides, and
    a forward hook on each block tidies after a prefix block.

    Returns:
        Whether the hooks were installed now (False when present already, e.g. a second
        ``prepare``, or when the model has no checkpointed blocks).
    """
    blocks = checkpoint_blocks(base)
    if not blocks or _SELECTIVE in vars(base):
        return False
    rule = _FrozenPrefix()
    handles = [base.register_forward_pre_hook(rule.start)]
    handles += [module.register_forward_hook(rule.record) for _n, module in ckpt.entry_modules(base)]
    handles += [block.register_forward_pre_hook(rule.enter, with_kwargs=True) for block in blocks]
    handles += [block.register_forward_hook(rule.leave, always_call=True) for block in blocks]
    setattr(base, _SELECTIVE, rule)

    def remove() -> None:
        for handle in handles:
            handle.remove()
        rule.restore()
        vars(base).pop(_SELECTIVE, None)

    log_add(remove)
    return True
