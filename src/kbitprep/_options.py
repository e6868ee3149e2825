"""The keyword arguments of ``plan`` / ``prepare``: their types and the check of their form."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeAlias, TypedDict

import torch
from torch import nn

from kbitprep._errors import InvalidArgumentError
from kbitprep.steps import checkpoint_transformers as ckpt
from kbitprep.steps.distributed import DISTRIBUTED_MODES, DistributedMode

__all__ = ["DistributedMode", "PrepareOptions", "UpcastPolicy", "check_options"]

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


def _check_every_n(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(
            f"checkpoint_every_n_layers must be a positive int (1 checkpoints every layer); got {value!r}."
        )
    return value


def _check_distributed(mode: object) -> DistributedMode:
    """Check the ``distributed`` argument (the engines: :mod:`kbitprep.steps.distributed`)."""
    if mode not in DISTRIBUTED_MODES:
        raise InvalidArgumentError(
            f"distributed must be None (single process, the default), 'fsdp' (the model will be "
            f"sharded with FSDP1 or FSDP2), 'deepspeed' (the model will be given to deepspeed.initialize) "
            f"or 'auto' (on when an FSDP or DeepSpeed ZeRO-3 run is detected); got {mode!r}."
        )
    return mode  # type: ignore[return-value]


def check_options(
    use_gradient_checkpointing: object,
    gradient_checkpointing_kwargs: object,
    backend: object,
    upcast: object,
    upcast_dtype: object,
    distributed: object,
    activation_offload: object,
    checkpoint_every_n_layers: object,
    checkpoint_trainable_blocks_only: object,
) -> None:
    """Check the form of every option but ``keep_in_low_precision`` (read once by
    :func:`kbitprep._names.keep_patterns`) before any step reads one; each step reads the options
    it needs as :func:`kbitprep.plan` received them.

    Raises:
        InvalidArgumentError: An option has the wrong type or value; the message names it, what
            was given and what is accepted.
    """
    _check_flag("use_gradient_checkpointing", use_gradient_checkpointing)
    ckpt.resolve_kwargs(gradient_checkpointing_kwargs)
    if not isinstance(backend, str):
        raise InvalidArgumentError(f"backend must be 'auto' or a backend name (str); got {backend!r}.")
    _check_upcast(upcast, upcast_dtype)
    _check_distributed(distributed)
    _check_flag("activation_offload", activation_offload)
    _check_every_n(checkpoint_every_n_layers)
    _check_flag("checkpoint_trainable_blocks_only", checkpoint_trainable_blocks_only)
