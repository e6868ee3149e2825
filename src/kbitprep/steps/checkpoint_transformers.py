"""Gradient (activation) checkpointing through transformers: ``use_reentrant`` resolution, the one
reader of the stored setting, transformers 4/5 method names, turning it on recorded for undo, and
the input-require-grads hook for reentrant checkpointing.

transformers 5 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``
(the old name warns ``FutureWarning``); transformers 4.57 has only the old name. Every call here
uses the name that exists without a deprecation warning.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from kbitprep._errors import InvalidArgumentError

__all__ = [
    "CHECKPOINT_KWARGS",
    "HasInputEmbeddings",
    "add_input_grad_hook",
    "current_kwargs",
    "current_use_reentrant",
    "disable",
    "enable",
    "enable_installs_input_grads",
    "enable_recorded",
    "entry_modules",
    "has_input_grad_hook",
    "internal_enable",
    "is_enabled",
    "is_internal_enable",
    "normalise_kwargs",
    "resolve_kwargs",
    "supports",
    "supports_layout",
]

logger = logging.getLogger(__name__)

# keyword arguments torch.utils.checkpoint.checkpoint accepts (torch 2.4 - 2.13)
CHECKPOINT_KWARGS = frozenset(
    {"use_reentrant", "preserve_rng_state", "context_fn", "determinism_check", "debug", "early_stop"}
)

# what torch 2.13's torch.utils.checkpoint.checkpoint accepts for each keyword (its signature and
# _allowed_determinism_checks_to_fns), checked while planning rather than at the first forward
_CHECKPOINT_VALUES: dict[str, tuple[Callable[[object], bool], str]] = {
    "use_reentrant": (lambda v: isinstance(v, bool), "True or False"),
    "preserve_rng_state": (lambda v: isinstance(v, bool), "True or False"),
    "debug": (lambda v: isinstance(v, bool), "True or False"),
    "early_stop": (lambda v: isinstance(v, bool), "True or False"),
    "determinism_check": (lambda v: v in ("default", "none"), "'default' or 'none'"),
    "context_fn": (callable, "a callable returning two context managers"),
}

# names transformers (enable_input_require_grads) and peft (prepare_model_for_kbit_training)
# give their input-grad hooks; a module carrying one of these needs no second one
_FOREIGN_HOOK_NAMES = frozenset({"make_inputs_require_grads", "make_inputs_require_grad"})


class HasInputEmbeddings(Protocol):
    """What the hook code calls on a transformers 4.x/5.x ``PreTrainedModel``."""

    def get_input_embeddings(self) -> nn.Module: ...


def resolve_kwargs(kwargs: object) -> dict[str, Any]:
    """Validate ``gradient_checkpointing_kwargs`` and make ``use_reentrant`` explicit.

    Returns:
        A new dict with ``use_reentrant`` always present: the caller's value, else ``False``
        (torch 2.4+ warns when it is left implicit, and peft 0.21 passing ``{}`` falls back to
        reentrant).

    Raises:
        InvalidArgumentError: Not a mapping, an unknown key, or a value torch would refuse (a
            ``use_reentrant`` that is not a bool, an unknown ``determinism_check``, ...).
    """
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping):
        raise InvalidArgumentError(
            f"gradient_checkpointing_kwargs must be a dict such as {{'use_reentrant': False}}; got "
            f"{type(kwargs).__name__} {kwargs!r}."
        )
    unknown = sorted(str(k) for k in kwargs if k not in CHECKPOINT_KWARGS)
    if unknown:
        raise InvalidArgumentError(
            f"gradient_checkpointing_kwargs has unknown key(s) {unknown}; "
            f"torch.utils.checkpoint.checkpoint accepts {sorted(CHECKPOINT_KWARGS)}. Remove or rename them."
        )
    out = dict(kwargs)
    reentrant = out.get("use_reentrant", False)
    out["use_reentrant"] = reentrant
    for key, value in out.items():
        expected = _CHECKPOINT_VALUES[key]
        if not expected[0](value):
            raise InvalidArgumentError(
                f"gradient_checkpointing_kwargs[{key!r}] must be {expected[1]} (torch.utils.checkpoint.checkpoint "
                f"takes it so); got {value!r}. It would fail only at the first checkpointed forward."
            )
    return out


def supports(model: nn.Module) -> bool:
    """Whether ``model`` has a checkpointing switch kbitprep knows how to turn on."""
    if not (hasattr(model, "activation_checkpointing_enable") or hasattr(model, "gradient_checkpointing_enable")):
        return False
    return getattr(model, "supports_gradient_checkpointing", True) is not False


def is_enabled(model: nn.Module) -> bool:
    """Whether checkpointing is on, read from the modules' ``gradient_checkpointing`` flags
    (no deprecated property is touched)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def current_kwargs(model: nn.Module) -> dict[str, Any] | None:
    """The ``torch.utils.checkpoint`` keyword arguments checkpointing uses now, or None when off:
    the one reader of transformers' stored setting.

    transformers keeps ``functools.partial(checkpoint, **kwargs)`` as ``_gradient_checkpointing_func``
    on each checkpointed module; a missing (or None) ``use_reentrant`` means torch's implicit,
    historical reentrant mode.
    """
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            func = getattr(module, "_gradient_checkpointing_func", None)
            keywords = getattr(func, "keywords", None) if isinstance(func, functools.partial) else None
            return normalise_kwargs(keywords if isinstance(keywords, Mapping) else {})
    return None


def normalise_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``use_reentrant`` explicit: absent or None is torch's implicit default (True)."""
    out = dict(kwargs)
    if out.get("use_reentrant") is None:
        out["use_reentrant"] = True
    return out


def current_use_reentrant(model: nn.Module) -> bool | None:
    """The ``use_reentrant`` the model's checkpointing currently uses, or None when off."""
    kwargs = current_kwargs(model)
    return None if kwargs is None else bool(kwargs["use_reentrant"])


def enable(model: nn.Module, kwargs: dict[str, Any], every_n_layers: int = 1, offload: bool = False) -> None:
    """Turn checkpointing on with ``kwargs`` (``use_reentrant`` explicit).

    ``every_n_layers`` and ``offload`` are transformers 5.24 ``activation_checkpointing_enable``
    arguments; on transformers 4 only their defaults exist (the plan refuses others).
    """
    hf: Any = model  # a transformers PreTrainedModel; its methods are not on nn.Module
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers 5
        layout: dict[str, Any] = {}
        if every_n_layers != 1:
            layout["every_n_layers"] = every_n_layers
        if offload:
            layout["offload"] = True
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **layout)
    else:  # transformers 4
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def supports_layout(model: nn.Module) -> bool:
    """Whether the enabling call takes ``every_n_layers`` and ``offload`` (transformers 5.24+)."""
    method = getattr(type(model), "activation_checkpointing_enable", None)
    if method is None:
        return False
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return "every_n_layers" in params and "offload" in params


def enable_installs_input_grads(model: nn.Module) -> bool:
    """Whether transformers' own enabling call adds an input-grad hook to the input embeddings.

    transformers 5.24 ``_activation_checkpointing_enable`` calls ``enable_input_require_grads``
    when ``main_input_name == "input_ids"`` or a peft adapter is loaded through transformers;
    transformers 4.57 only in the latter case. kbitprep never removes that hook: peft's
    Activated LoRA relies on the block inputs requiring grad (peft#2826).
    """
    peft_loaded = getattr(model, "_hf_peft_config_loaded", False) is True
    if hasattr(type(model), "activation_checkpointing_enable"):
        return peft_loaded or getattr(model, "main_input_name", None) == "input_ids"
    return peft_loaded


def disable(model: nn.Module) -> None:
    """Turn checkpointing off (transformers 5 name first)."""
    hf: Any = model
    if hasattr(hf, "activation_checkpointing_disable"):
        hf.activation_checkpointing_disable()
    elif hasattr(hf, "gradient_checkpointing_disable"):
        hf.gradient_checkpointing_disable()


def _safe_input_embeddings(module: nn.Module) -> nn.Module | None:
    getter = getattr(type(module), "get_input_embeddings", None)
    if getter is None:
        return None
    try:
        found = module.get_input_embeddings()  # type: ignore[operator]
    except Exception:  # custom-code models raise NotImplementedError and worse
        return None
    return found if isinstance(found, nn.Module) else None


def entry_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose outputs feed checkpointed blocks: each sub-model's input embeddings.

    Every submodule that exposes ``get_input_embeddings`` (a vision tower, an audio tower, the
    text model) contributes its own. When none answers (missing, raising or returning
    None), the first ``nn.Embedding`` is used; an empty list means there is none.
    """
    names = {id(m): n for n, m in model.named_modules()}
    found: dict[int, tuple[str, nn.Module]] = {}
    for _name, module in model.named_modules():
        emb = _safe_input_embeddings(module)
        if emb is not None and id(emb) in names and id(emb) not in found:
            found[id(emb)] = (names[id(emb)], emb)
    if not found:
        for name, module in model.named_modules():
            if isinstance(module, nn.Embedding):
                return [(name, module)]
        return []
    return list(found.values())


def _make_output_require_grad(module: nn.Module, args: Any, output: Any) -> None:
    if isinstance(output, torch.Tensor) and output.is_floating_point() and not output.requires_grad:
        output.requires_grad_(True)


_make_output_require_grad._kbitprep_hook = "input_grad"  # type: ignore[attr-defined]


def has_input_grad_hook(module: nn.Module) -> bool:
    """Whether ``module`` already carries an input-grad hook (ours, transformers' or peft's)."""
    for hook in module._forward_hooks.values():
        if getattr(hook, "_kbitprep_hook", None) == "input_grad":
            return True
        if getattr(hook, "__name__", "") in _FOREIGN_HOOK_NAMES:
            return True
    return False


def add_input_grad_hook(module: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Register the hook that makes ``module``'s floating output require grad."""
    return module.register_forward_hook(_make_output_require_grad)


# -- turning checkpointing on, recorded for undo -------------------------------------------------

_INTERNAL: contextvars.ContextVar[bool] = contextvars.ContextVar("kbitprep_internal_enable", default=False)


@contextlib.contextmanager
def internal_enable() -> Iterator[None]:
    """Let kbitprep's own checkpointing call through the guard (a second ``prepare``)."""
    token = _INTERNAL.set(True)
    try:
        yield
    finally:
        _INTERNAL.reset(token)


def is_internal_enable() -> bool:
    """Whether the running enabling call is kbitprep's own (inside :func:`internal_enable`)."""
    return _INTERNAL.get()


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
    hooked = {id(m._forward_hooks) for m in base.modules() if has_input_grad_hook(m)}
    before = list(getattr(base, "_require_grads_hooks", None) or [])
    with internal_enable():  # past our own guard on a second prepare
        enable(base, kwargs, every_n_layers, offload)
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
