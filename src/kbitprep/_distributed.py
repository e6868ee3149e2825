"""Distributed (FSDP) preparation: one floating dtype per model, and adapters cast to match.

FSDP1 (``FullyShardedDataParallel``) flattens every parameter of a wrap unit into one
``FlatParameter`` and refuses mixed dtypes (``ValueError: Must flatten tensors with uniform dtype
but got torch.bfloat16 and torch.float32``, torch 2.13 ``_flat_param.py``). peft's fp32 upcast of
norms beside bf16-stored 4-bit weights produces exactly that mix. FSDP2 (``fully_shard``) shards
per parameter and accepts mixed dtypes, but every fp32 copy still costs memory on every rank.
In the distributed mode kbitprep therefore keeps every floating parameter in one dtype: the
quantized storage's own float dtype when it has one (bitsandbytes ``bnb_4bit_quant_storage``),
else the dtype holding most of the model's floating bytes.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

import torch
from torch import nn

from kbitprep._hf import adapter_param_ids
from kbitprep._errors import InvalidArgumentError, KbitPrepWarning, NotShardableError
from kbitprep.backends.base import QuantBackend, tensor_nbytes

__all__ = ["DistributedDecision", "DistributedMode", "cast_adapters", "fsdp_signal", "resolve"]

DistributedMode: TypeAlias = Literal["auto", "fsdp"] | None

MODES = ("auto", "fsdp", None)


def validate(mode: object) -> DistributedMode:
    """Check the ``distributed`` argument."""
    if mode not in MODES:
        raise InvalidArgumentError(
            f"distributed must be None (single process, the default), 'fsdp' (the model will be "
            f"sharded with FSDP1 or FSDP2) or 'auto' (on when a sharded run is detected); got {mode!r}."
        )
    return mode  # type: ignore[return-value]


def fsdp_signal() -> str | None:
    """Evidence that this process runs a sharded job, or ``None``.

    accelerate sets ``ACCELERATE_USE_FSDP=true`` when launched with an FSDP plugin config
    (accelerate 1.x ``Accelerator.__init__``, ``accelerate launch --use_fsdp``); any launcher
    that initialised a ``torch.distributed`` process group of more than one rank counts too.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1"):
        return "ACCELERATE_USE_FSDP is set"
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return f"a torch.distributed process group of {dist.get_world_size()} ranks is initialised"
    return None


@dataclass(frozen=True, slots=True)
class DistributedDecision:
    """What the distributed step decided; the orchestrator's planner reads nothing else.

    Attributes:
        mode: ``"fsdp"`` (more engines may follow), or ``None`` when the mode is off.
        shard_dtype: The one dtype every floating, non-storage parameter ends in (FSDP), or the
            dtype the engine will leave them in; ``None`` when off or no floating parameter.
        cast_to_shard_dtype: Whether kbitprep casts parameters to ``shard_dtype`` itself (FSDP:
            yes); ``False`` when the engine converts them and a cast would be wasted.
        use_reentrant: The ``use_reentrant`` the engine requires of checkpointing, or ``None``
            when the caller's choice (default ``False``) stands.
    """

    mode: str | None = None
    shard_dtype: torch.dtype | None = None
    cast_to_shard_dtype: bool = True
    use_reentrant: bool | None = None


OFF = DistributedDecision()


def _majority_dtype(params: Sequence[nn.Parameter]) -> torch.dtype | None:
    by_bytes: Counter[torch.dtype] = Counter()
    for p in params:
        by_bytes[p.dtype] += tensor_nbytes(p)
    return by_bytes.most_common(1)[0][0] if by_bytes else None


def resolve(
    mode: DistributedMode,
    strategy: QuantBackend,
    model: nn.Module,
    storage: Sequence[nn.Parameter],
    floating: Sequence[nn.Parameter],
    found: list[str],
) -> DistributedDecision:
    """Decide whether the distributed mode is on and, if so, the one floating dtype.

    Args:
        mode: The ``distributed`` argument.
        strategy: The resolved backend.
        model: The unwrapped model.
        storage: Quantized storage parameters (never cast).
        floating: Floating, non-storage, non-adapter parameters.
        found: Plan warnings; findings are appended.

    Returns:
        The decision; :data:`OFF` when the mode is off.

    Raises:
        NotShardableError: ``mode == "fsdp"`` and the backend says its storage cannot be
            sharded, or the storage holds several floating dtypes.
    """
    if mode is None:
        return OFF
    float_storage = sorted({p.dtype for p in storage if p.is_floating_point()}, key=str)
    int_storage = sorted({p.dtype for p in storage if not p.is_floating_point()}, key=str)
    if mode == "auto":
        signal = fsdp_signal()
        if signal is None:
            return OFF
        if not float_storage:
            if int_storage:
                found.append(
                    f"distributed='auto': {signal}, but the quantized storage is "
                    f"{', '.join(map(str, int_storage))}, so the distributed mode stays off. FSDP1 refuses "
                    "integer storage ('Cannot flatten integer dtype tensors'); FSDP2 shards it. For "
                    "bitsandbytes, load with bnb_4bit_quant_storage set to the model's dtype (e.g. "
                    "torch.bfloat16), or pass distributed='fsdp' for FSDP2."
                )
            return OFF
        found.append(f"distributed='auto' turned the distributed (FSDP) mode on: {signal}.")
    ok, why = strategy.shardable(model)
    if not ok:
        raise NotShardableError(
            f"distributed={mode!r}: the {strategy.name} backend's quantized storage cannot be sharded by "
            f"FSDP ({why}). Train on one device (distributed=None), or quantize with a method whose "
            "storage FSDP can shard, such as bitsandbytes 4-bit with bnb_4bit_quant_storage=torch.bfloat16."
        )
    if len(float_storage) > 1:
        raise NotShardableError(
            f"distributed={mode!r}: the quantized storage holds several floating dtypes "
            f"({', '.join(map(str, float_storage))}), so no single dtype can hold the whole model. "
            "Reload it with one storage dtype."
        )
    if int_storage:
        found.append(
            f"distributed='fsdp': the quantized storage is {', '.join(map(str, int_storage))} ({why}). "
            "FSDP2 (fully_shard) shards it per parameter; FSDP1 (FullyShardedDataParallel) cannot flatten "
            "it and raises 'Cannot flatten integer dtype tensors'. For FSDP1 "
            "with bitsandbytes, load with bnb_4bit_quant_storage set to the model's dtype."
        )
    shard = float_storage[0] if float_storage else _majority_dtype(floating)
    return DistributedDecision("fsdp", shard, use_reentrant=False)  # FSDP needs non-reentrant checkpointing


def cast_adapters(model: nn.Module, dtype: torch.dtype) -> tuple[str, ...]:
    """Cast the parameters of attached adapters to ``dtype``, in place.

    ``peft.get_peft_model`` creates LoRA weights in fp32 whatever the base model's dtype, so
    after :func:`kbitprep.prepare` with ``distributed="fsdp"`` (which keeps the base model in
    one dtype, ``plan.shard_dtype``) the adapters must be cast too before FSDP wraps the model:
    FSDP1 refuses a wrap unit that mixes dtypes. Call it after ``get_peft_model`` and before
    ``FullyShardedDataParallel`` / ``fully_shard`` (and before creating the optimizer).

    Args:
        model: The model with adapters attached (a ``peft.PeftModel`` or a model with PEFT tuner
            layers), on any device.
        dtype: Floating dtype, e.g. ``torch.bfloat16`` (the plan's ``shard_dtype``).

    Returns:
        Names of the parameters that were cast (those already in ``dtype`` are left alone).
        Adapter parameters are those of PEFT tuner layers (``lora_A``, ``lora_B``, ...) and
        ``modules_to_save`` copies; base and quantized weights are never touched.

    Raises:
        InvalidArgumentError: ``dtype`` is not a floating ``torch.dtype``.

    Warns:
        KbitPrepWarning: No adapter parameter was found (call it after ``get_peft_model``).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidArgumentError(f"dtype must be a floating torch.dtype such as torch.bfloat16; got {dtype!r}.")
    ids = adapter_param_ids(model)
    if not ids:
        warnings.warn(
            f"cast_adapters found no adapter parameters on {type(model).__name__}; call it after "
            "attaching adapters (peft.get_peft_model).",
            KbitPrepWarning,
            stacklevel=2,
        )
        return ()
    cast: list[str] = []
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) not in ids or id(param) in seen:
            continue
        seen.add(id(param))
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast.append(name)
    return tuple(cast)
