"""The keyword arguments of ``plan`` / ``prepare``, validated once into :class:`Options`."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, TypedDict

import torch
from torch import nn

from kbitprep._errors import InvalidArgumentError
from kbitprep.steps import checkpoint_transformers as ckpt

__all__ = ["Options", "PrepareOptions", "UpcastPolicy", "parse_options"]

UpcastPolicy: TypeAlias = "Literal['auto', 'all', 'none'] | Callable[[str, nn.Parameter, nn.Module], bool]"


class PrepareOptions(TypedDict, total=False):
    """The keyword-only options of ``plan``, ``prepare`` and ``prepare_model_for_kbit_training``
    (documented on :func:`kbitprep.plan`)."""

    backend: str
    upcast: Any
    upcast_dtype: torch.dtype
    keep_in_low_precision: str | Iterable[str]
    distributed: Any
    activation_offload: bool
    checkpoint_every_n_layers: int
    checkpoint_trainable_blocks_only: bool


# compute dtypes a parameter may be upcast to; float8 types are storage formats, not compute dtypes
UPCAST_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True, slots=True)
class Options:
    """Every option of one ``plan`` / ``prepare`` call, checked.

    Attributes:
        use_gradient_checkpointing: Turn checkpointing on (peft's first positional argument).
        checkpoint_kwargs: ``torch.utils.checkpoint`` keyword arguments, ``use_reentrant``
            explicit (the caller's value, else ``False``).
        kwargs_given: Whether the caller passed ``gradient_checkpointing_kwargs``.
        backend: ``"auto"`` or a registered backend name.
        upcast: ``"auto"``, ``"all"``, ``"none"`` or a callable ``(name, param, module) -> bool``.
        upcast_dtype: The dtype an upcast produces.
        keep: ``keep_in_low_precision`` name patterns (see :mod:`kbitprep._names`).
        keep_regex: ``keep`` is one regular expression (``keep_in_low_precision`` was a single
            string), full-matched against module names as peft matches a ``target_modules``
            string.
        distributed: ``None``, ``"auto"`` or an engine name (see :mod:`kbitprep.steps.distributed`).
        activation_offload: Keep checkpointed activations in host memory (transformers 5).
        checkpoint_every_n_layers: Checkpoint every n-th layer only (transformers 5).
        checkpoint_trainable_blocks_only: Checkpoint only blocks holding trainable parameters.
    """

    use_gradient_checkpointing: bool
    checkpoint_kwargs: Mapping[str, Any]
    kwargs_given: bool
    backend: str
    upcast: Any
    upcast_dtype: torch.dtype
    keep: tuple[str, ...]
    keep_regex: bool = False
    distributed: DistributedMode = None
    activation_offload: bool = False
    checkpoint_every_n_layers: int = 1
    checkpoint_trainable_blocks_only: bool = False


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be True or False; got {value!r}.")
    return value


def _check_upcast(upcast: object, upcast_dtype: object) -> None:
    if not (upcast in ("auto", "all", "none") or callable(upcast)):
        raise InvalidArgumentError(
            f"upcast must be 'auto', 'all', 'none' or a callable (name, param, module) -> bool; got {upcast!r}."
        )
    if not isinstance(upcast_dtype, torch.dtype) or upcast_dtype not in UPCAST_DTYPES:
        raise InvalidArgumentError(
            f"upcast_dtype must be one of torch.float32, torch.float64, torch.bfloat16, torch.float16 "
            f"(a compute dtype parameters can be kept in; float8 types cannot); got {upcast_dtype!r}."
        )


def _check_keep(keep_in_low_precision: object) -> tuple[tuple[str, ...], bool]:
    """``(patterns, regex)``: a single string is one regular expression (peft's ``target_modules``
    convention), any other iterable a sequence of names."""
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
        return (keep_in_low_precision,), True
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
    return keep, False


def _check_every_n(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(
            f"checkpoint_every_n_layers must be a positive int (1 checkpoints every layer); got {value!r}."
        )
    return value


DistributedMode: TypeAlias = Literal["auto", "fsdp", "deepspeed"] | None

MODES = ("auto", "fsdp", "deepspeed", None)


def _check_distributed(mode: object) -> DistributedMode:
    """Check the ``distributed`` argument (the engines: :mod:`kbitprep.steps.distributed`)."""
    if mode not in MODES:
        raise InvalidArgumentError(
            f"distributed must be None (single process, the default), 'fsdp' (the model will be "
            f"sharded with FSDP1 or FSDP2), 'deepspeed' (the model will be given to deepspeed.initialize) "
            f"or 'auto' (on when an FSDP or DeepSpeed ZeRO-3 run is detected); got {mode!r}."
        )
    return mode  # type: ignore[return-value]


def parse_options(
    use_gradient_checkpointing: object,
    gradient_checkpointing_kwargs: object,
    *,
    backend: object = "auto",
    upcast: object = "auto",
    upcast_dtype: object = torch.float32,
    keep_in_low_precision: str | Iterable[str] | object = (),
    distributed: object = None,
    activation_offload: object = False,
    checkpoint_every_n_layers: object = 1,
    checkpoint_trainable_blocks_only: object = False,
) -> Options:
    """Check every option and return them as :class:`Options`.

    Raises:
        InvalidArgumentError: An option has the wrong type or value (or is unknown); the message
            names it, what was given and what is accepted.
    """
    _check_flag("use_gradient_checkpointing", use_gradient_checkpointing)
    kwargs = ckpt.resolve_kwargs(gradient_checkpointing_kwargs)
    if not isinstance(backend, str):
        raise InvalidArgumentError(f"backend must be 'auto' or a backend name (str); got {backend!r}.")
    _check_upcast(upcast, upcast_dtype)
    assert isinstance(upcast_dtype, torch.dtype)
    keep, keep_regex = _check_keep(keep_in_low_precision)
    return Options(
        use_gradient_checkpointing=bool(use_gradient_checkpointing),
        checkpoint_kwargs=kwargs,
        kwargs_given=gradient_checkpointing_kwargs is not None,
        backend=backend,
        upcast=upcast,
        upcast_dtype=upcast_dtype,
        keep=keep,
        keep_regex=keep_regex,
        distributed=_check_distributed(distributed),
        activation_offload=_check_flag("activation_offload", activation_offload),
        checkpoint_every_n_layers=_check_every_n(checkpoint_every_n_layers),
        checkpoint_trainable_blocks_only=_check_flag(
            "checkpoint_trainable_blocks_only", checkpoint_trainable_blocks_only
        ),
    )
