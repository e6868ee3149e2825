"""Distributed preparation (FSDP, DeepSpeed): predict the dtypes the engine leaves, and cast to match.

FSDP1 (``FullyShardedDataParallel``) flattens every parameter of a wrap unit into one
``FlatParameter`` and refuses mixed dtypes (``ValueError: Must flatten tensors with uniform dtype
but got torch.bfloat16 and torch.float32``, torch 2.13 ``_flat_param.py``). peft's fp32 upcast of
norms beside bf16-stored 4-bit weights produces exactly that mix. FSDP2 (``fully_shard``) shards
per parameter and accepts mixed dtypes, but every fp32 copy still costs memory on every rank.
In the FSDP mode kbitprep therefore keeps every floating parameter in one dtype: the
quantized storage's own float dtype when it has one (bitsandbytes ``bnb_4bit_quant_storage``),
else the dtype holding most of the model's floating bytes.

DeepSpeed converts the model itself: with ``bf16`` (or ``fp16``) enabled, ``deepspeed.initialize``
sets every fp16/bf16/fp32/fp64 parameter to that dtype, adapters included (DeepSpeed 0.19.8
``runtime/engine.py``, ``_cast_module_mixed_precision``), which silently undoes peft's fp32 upcast;
without either it casts nothing. In the DeepSpeed mode kbitprep reads the DeepSpeed config this
process already holds (transformers' ``HfDeepSpeedConfig``, or accelerate's launch environment),
predicts the dtypes the engine will leave, casts nothing the engine would undo, and under ZeRO-3
chooses the checkpointing mode the installed DeepSpeed can run (docs/distributed.md).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal, TypeAlias

import torch
from torch import nn

from kbitprep._errors import AdapterWarning, InvalidArgumentError, NotShardableError, PlanWarning
from kbitprep._hf import adapter_param_ids
from kbitprep._storage import tensor_nbytes
from kbitprep.backends.base import QuantBackend
from kbitprep.steps.context import Context, StepPlan

__all__ = [
    "DISTRIBUTED_MODES",
    "DeepSpeedSetup",
    "DistributedDecision",
    "DistributedMode",
    "DistributedPlan",
    "cast_adapters",
    "deepspeed_setup",
    "fsdp_signal",
    "plan_distributed",
    "resolve",
]


DistributedMode: TypeAlias = Literal["auto", "fsdp", "deepspeed"] | None
"""The ``distributed`` option of :func:`kbitprep.plan`: off, detect, or an engine."""

DISTRIBUTED_MODES: tuple[DistributedMode, ...] = ("auto", "fsdp", "deepspeed", None)


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
        mode: ``"fsdp"`` or ``"deepspeed"``, or ``None`` when the mode is off.
        shard_dtype: The one dtype every floating, non-storage parameter ends in (FSDP), or the
            dtype the engine will leave them in (DeepSpeed with bf16/fp16: adapters too);
            ``None`` when off, when no floating parameter, or when the engine keeps each
            parameter's dtype (DeepSpeed without bf16/fp16).
        cast_to_shard_dtype: Whether kbitprep casts parameters to ``shard_dtype`` itself (FSDP:
            yes); ``False`` when the engine converts them and a cast would be wasted (DeepSpeed).
        use_reentrant: The ``use_reentrant`` the engine requires of checkpointing, or ``None``
            when the caller's choice (default ``False``) stands.
        upcast_kept: Whether the engine keeps the dtypes it is given, so the backend's upcast
            policy (peft's fp32 norms and embeddings) applies as in the single-process mode
            (DeepSpeed without bf16/fp16, on a model not partitioned by ``zero.Init``). Added
            for DeepSpeed; defaults to ``False`` (upcast nothing).
    """

    mode: str | None = None
    shard_dtype: torch.dtype | None = None
    cast_to_shard_dtype: bool = True
    use_reentrant: bool | None = None
    upcast_kept: bool = False


OFF = DistributedDecision()


def _majority_dtype(params: Sequence[nn.Parameter]) -> torch.dtype | None:
    by_bytes: Counter[torch.dtype] = Counter()
    for p in params:
        by_bytes[p.dtype] += tensor_nbytes(p)
    return by_bytes.most_common(1)[0][0] if by_bytes else None


# -- DeepSpeed --------------------------------------------------------------------------------

DEEPSPEED_RECOMPUTE_FIX = (0, 19, 3)
"""First DeepSpeed release in which ZeRO-3 keeps frozen parameters gathered during a
non-reentrant checkpoint recompute (PR #8148). Before it, the recompute raises ``CheckpointError:
Recomputed values for the following tensors have different metadata`` (saved shape ``[64]``,
recomputed ``[0]``; DeepSpeed #4332, transformers #47254), which is why TRL forces
``use_reentrant=True`` under ZeRO-3 (trl #4951, #6356). Both modes were measured on 0.19.8 and with
the fix switched off (tests/test_deepspeed.py)."""

_PRECISIONS: Mapping[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp8": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, slots=True)
class DeepSpeedSetup:
    """What this process knows of the DeepSpeed config it will train with.

    Attributes:
        source: Where it was read, for plan warnings (e.g. ``"transformers' HfDeepSpeedConfig"``).
        stage: The ZeRO stage (0-3); ``None`` when the config does not say.
        dtype_known: Whether the engine's precision is known (``False`` for an unresolved
            ``"auto"`` with no ``ACCELERATE_MIXED_PRECISION`` to resolve it).
        dtype: ``torch.bfloat16`` / ``torch.float16`` when ``bf16`` / ``fp16`` is enabled (the
            engine converts every floating parameter to it); ``None`` when neither is (the engine
            keeps each parameter's dtype), or when unknown.
    """

    source: str
    stage: int | None
    dtype_known: bool
    dtype: torch.dtype | None


def _enabled(config: Mapping[str, Any], *keys: str) -> bool | str:
    for key in keys:  # DeepSpeed reads "bf16" and its older spelling "bfloat16" (runtime/constants.py)
        section = config.get(key)
        if isinstance(section, Mapping) and "enabled" in section:
            value = section["enabled"]
            return value if isinstance(value, str) else bool(value)
    return False


def _setup_from_config(config: Mapping[str, Any], source: str, stage_default: int | None) -> DeepSpeedSetup:
    zero = config.get("zero_optimization")
    stage = zero.get("stage", stage_default) if isinstance(zero, Mapping) else stage_default
    bf16, fp16 = _enabled(config, "bf16", "bfloat16"), _enabled(config, "fp16")
    if "auto" in (bf16, fp16):  # filled from the launch's mixed precision (accelerate, Trainer)
        mixed = os.environ.get("ACCELERATE_MIXED_PRECISION")
        if mixed is None:
            return DeepSpeedSetup(source, _int_or_none(stage), False, None)
        return DeepSpeedSetup(source, _int_or_none(stage), True, _PRECISIONS.get(mixed.lower()))
    dtype = torch.bfloat16 if bf16 is True else torch.float16 if fp16 is True else None
    return DeepSpeedSetup(source, _int_or_none(stage), True, dtype)


def _int_or_none(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload, no-any-return]
    except (TypeError, ValueError):
        return None


def deepspeed_setup() -> DeepSpeedSetup | None:
    """The DeepSpeed config this process will train with, or ``None`` when there is no sign of one.

    Read in this order, importing nothing:

    1. transformers' ``HfDeepSpeedConfig`` (kept by ``TrainingArguments(deepspeed=...)`` or created by
       the caller; transformers 5.24 ``integrations/deepspeed.py`` ``deepspeed_config()``), only when
       that module is already imported. Trainer has resolved its ``"auto"`` values by then.
    2. accelerate's launch environment (accelerate 1.15 ``utils/launch.py``):
       ``ACCELERATE_USE_DEEPSPEED=true``, the JSON file in ``ACCELERATE_DEEPSPEED_CONFIG_FILE`` if
       any, else ``ACCELERATE_DEEPSPEED_ZERO_STAGE`` (accelerate's default stage is 2) and
       ``ACCELERATE_MIXED_PRECISION`` (``bf16``, ``fp16``, ``fp8`` = bf16 under DeepSpeed, ``no``).
    """
    integration = sys.modules.get("transformers.integrations.deepspeed")
    read = getattr(integration, "deepspeed_config", None)
    config = read() if callable(read) else None
    if isinstance(config, Mapping):
        return _setup_from_config(config, "transformers' HfDeepSpeedConfig", None)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() not in ("true", "1"):
        return None
    stage = _int_or_none(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and path != "none":
        try:
            with open(path, encoding="utf-8") as fh:
                loaded = json.load(fh)
        except (OSError, ValueError):
            loaded = None
        if isinstance(loaded, Mapping):
            return _setup_from_config(loaded, f"the DeepSpeed config {path} (ACCELERATE_DEEPSPEED_CONFIG_FILE)", stage)
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION")
    dtype = _PRECISIONS.get(mixed.lower()) if mixed else None
    return DeepSpeedSetup("accelerate's launch environment (ACCELERATE_USE_DEEPSPEED)", stage, mixed is not None, dtype)


def _installed_deepspeed() -> tuple[int, ...] | None:
    try:
        text = metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        return None
    parts: list[int] = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _zero3_reentrant(asked: str, stage: int | None, found: list[str]) -> bool | None:
    """The ``use_reentrant`` ZeRO-3 requires: ``True`` when ZeRO-3 (or an unknown stage) meets a
    DeepSpeed without the recompute fix, ``None`` (the caller's choice stands) otherwise. Under
    ZeRO-3 the plan says which it is and why, as TRL's trainers override the mode there."""
    if stage is not None and stage != 3:
        return None
    version = _installed_deepspeed()
    if version is not None and version >= DEEPSPEED_RECOMPUTE_FIX:
        found.append(
            f"distributed={asked!r}: checkpointing keeps the caller's use_reentrant (default False). ZeRO-3 on "
            f"DeepSpeed {'.'.join(map(str, version))} keeps frozen parameters gathered while a non-reentrant "
            "checkpoint recomputes (fixed in 0.19.3), so both modes train. TRL's trainers still force "
            "use_reentrant=True for PEFT under ZeRO-3; that trains too."
        )
        return None
    have = (
        "DeepSpeed is not installed in this process" if version is None else f"DeepSpeed {'.'.join(map(str, version))}"
    )
    found.append(
        f"distributed={asked!r}: checkpointing uses use_reentrant=True. {have}; before 0.19.3 ZeRO-3 "
        "re-partitions frozen parameters during a non-reentrant recompute, and backward fails with "
        "'CheckpointError: Recomputed values ... have different metadata'. Upgrade to deepspeed>=0.19.3 "
        "to keep non-reentrant checkpointing."
    )
    return True


def resolve(
    mode: DistributedMode,
    strategy: QuantBackend,
    model: nn.Module,
    storage: Sequence[nn.Parameter],
    floating: Sequence[nn.Parameter],
    found: list[str],
) -> DistributedDecision:
    """Decide whether the distributed mode is on and, if so, the dtypes the engine will leave.

    ``"auto"`` looks for DeepSpeed first (a DeepSpeed launch also initialises a process group,
    which alone would read as FSDP): a ZeRO-3 config turns the DeepSpeed mode on, another ZeRO
    stage leaves the mode off with a plan warning; then for an FSDP launch (:func:`fsdp_signal`).

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
        NotShardableError: FSDP (or ZeRO-3) cannot shard the backend's storage, the storage
            holds several floating dtypes, or DeepSpeed would convert float-typed packed storage.
    """
    if mode is None:
        return OFF
    if mode == "deepspeed":
        return _resolve_deepspeed("deepspeed", deepspeed_setup(), strategy, model, storage, floating, found)
    if mode == "auto":
        setup = deepspeed_setup()
        if setup is not None:
            if setup.stage != 3:
                found.append(
                    f"distributed='auto': {setup.source} configures DeepSpeed ZeRO stage {setup.stage}, not 3, so "
                    "the distributed mode stays off. With bf16 or fp16 enabled, deepspeed.initialize converts "
                    "every floating parameter to that dtype at any stage, undoing the fp32 upcast; pass "
                    "distributed='deepspeed' to plan for it."
                )
                return OFF
            return _resolve_deepspeed("auto", setup, strategy, model, storage, floating, found)
    return _resolve_fsdp(mode, strategy, model, storage, floating, found)


def _storage_dtypes(storage: Sequence[nn.Parameter]) -> tuple[list[torch.dtype], list[torch.dtype]]:
    float_storage = sorted({p.dtype for p in storage if p.is_floating_point()}, key=str)
    int_storage = sorted({p.dtype for p in storage if not p.is_floating_point()}, key=str)
    return float_storage, int_storage


def _resolve_fsdp(
    mode: DistributedMode,
    strategy: QuantBackend,
    model: nn.Module,
    storage: Sequence[nn.Parameter],
    floating: Sequence[nn.Parameter],
    found: list[str],
) -> DistributedDecision:
    """The FSDP mode (``"fsdp"``, or ``"auto"`` with no DeepSpeed config)."""
    float_storage, int_storage = _storage_dtypes(storage)
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


def _resolve_deepspeed(
    asked: str,
    setup: DeepSpeedSetup | None,
    strategy: QuantBackend,
    model: nn.Module,
    storage: Sequence[nn.Parameter],
    floating: Sequence[nn.Parameter],
    found: list[str],
) -> DistributedDecision:
    """The DeepSpeed mode: predict the dtypes ``deepspeed.initialize`` leaves; cast nothing it undoes."""
    float_storage, _ = _storage_dtypes(storage)
    if len(float_storage) > 1:
        raise NotShardableError(
            f"distributed={asked!r}: the quantized storage holds several floating dtypes "
            f"({', '.join(map(str, float_storage))}), and DeepSpeed in bf16/fp16 converts every floating "
            "parameter to one dtype, which would convert packed storage as numbers. Reload it with one storage dtype."
        )
    stage = None if setup is None else setup.stage
    if stage in (None, 3):
        ok, why = strategy.shardable(model)
        if not ok:
            raise NotShardableError(
                f"distributed={asked!r}: DeepSpeed ZeRO-3 partitions every parameter across ranks, and the "
                f"{strategy.name} backend does not declare its quantized storage shardable ({why}). Train with "
                "ZeRO stage 0-2 (zero_optimization.stage), which keeps whole parameters on every rank, on one device (distributed=None), or "
                "quantize with bitsandbytes 4-bit and bnb_4bit_quant_storage=torch.bfloat16."
            )
    if asked == "auto" and setup is not None:
        found.append(f"distributed='auto' turned the DeepSpeed mode on: {setup.source} configures ZeRO stage 3.")
    reentrant = _zero3_reentrant(asked, stage, found)
    if setup is None or not setup.dtype_known:
        shard = float_storage[0] if float_storage else _majority_dtype(floating)
        what = (
            "no DeepSpeed config was found in this process"
            if setup is None
            else f"{setup.source} leaves bf16/fp16 at 'auto'"
        )
        found.append(
            f"distributed={asked!r}: {what}, so kbitprep assumes the engine runs in {shard} (bf16.enabled or "
            f"fp16.enabled to match) and casts nothing. Create TrainingArguments(deepspeed=...) or "
            "transformers' HfDeepSpeedConfig before prepare, or launch with accelerate, so the plan reads the config."
        )
        return DistributedDecision("deepspeed", shard, cast_to_shard_dtype=False, use_reentrant=reentrant)
    zero_init = any(hasattr(p, "ds_id") for p in model.parameters())  # partitioned by zero.Init at load
    if zero_init:  # DeepSpeed 0.19.8 engine.py: no per-parameter cast for a zero.Init model
        found.append(
            f"distributed={asked!r}: the model was partitioned by DeepSpeed's zero.Init when it was loaded, so "
            f"its parameters are already in {setup.dtype or torch.float32} and deepspeed.initialize casts "
            "nothing: adapters attached after prepare keep their own dtype (peft creates LoRA in float32)."
        )
    if setup.dtype is None:  # neither bf16 nor fp16: the engine keeps every dtype (measured: peft's fp32 norms stay)
        return DistributedDecision(
            "deepspeed", None, cast_to_shard_dtype=False, use_reentrant=reentrant, upcast_kept=not zero_init
        )
    if float_storage and float_storage[0] != setup.dtype:
        raise NotShardableError(
            f"distributed={asked!r}: {setup.source} enables {setup.dtype}, and deepspeed.initialize converts "
            f"every floating parameter to it, including the {strategy.name} packed storage held as "
            f"{float_storage[0]}: its bytes would be converted as numbers and the weights destroyed. Load the "
            f"model with its quant_storage set to {setup.dtype}, or enable the config's precision that matches "
            f"{float_storage[0]}."
        )
    return DistributedDecision("deepspeed", setup.dtype, cast_to_shard_dtype=False, use_reentrant=reentrant)


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
        AdapterWarning: No adapter parameter was found (call it after ``get_peft_model``).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidArgumentError(f"dtype must be a floating torch.dtype such as torch.bfloat16; got {dtype!r}.")
    ids = adapter_param_ids(model)
    if not ids:
        warnings.warn(
            f"cast_adapters found no adapter parameters on {type(model).__name__}; call it after "
            "attaching adapters (peft.get_peft_model).",
            AdapterWarning,
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


# -- the step ---------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DistributedPlan(StepPlan):
    """The distributed step's decisions: the engine and its one dtype (fields of
    :class:`~kbitprep.PreparationPlan`), and the whole decision the cast and checkpointing steps
    read (not a plan field)."""

    distributed: str | None = None
    shard_dtype: torch.dtype | None = None
    decision: DistributedDecision = OFF

    def plan_fields(self) -> dict[str, object]:
        """The plan fields: the engine and its dtype (the decision stays with the steps)."""
        return {"distributed": self.distributed, "shard_dtype": self.shard_dtype}


def plan_distributed(ctx: Context, distributed: DistributedMode, upcast: object) -> DistributedPlan:
    """Whether a sharded run is on (``distributed=``, or detected under ``"auto"``), the dtypes its
    engine leaves, and the check that the ``upcast`` option agrees with it.

    Args:
        ctx: The shared planning context.
        distributed: The ``distributed`` option of :func:`kbitprep.plan`.
        upcast: The ``upcast`` option of :func:`kbitprep.plan`.

    Raises:
        InvalidArgumentError: An explicit ``upcast`` with a mode that keeps one dtype.
        NotShardableError: The engine cannot shard the backend's storage (see :func:`resolve`).
    """
    notes: list[str] = []
    decision = resolve(
        distributed,
        ctx.strategy,
        ctx.base,
        [e.param for e in ctx.inventory if e.storage],
        [e.param for e in ctx.inventory if e.plain_float],
        notes,
    )
    found = tuple(PlanWarning("distributed", n) for n in notes)
    if decision.mode is None:
        return DistributedPlan(decision=decision, warnings=found)
    if upcast not in ("auto", "none") and not decision.upcast_kept:
        raise InvalidArgumentError(
            f"upcast={upcast!r} cannot be combined with distributed={distributed!r}: the "
            f"distributed mode keeps every floating parameter in one dtype ({decision.shard_dtype}). "
            "Leave upcast at 'auto'."
        )
    return DistributedPlan(
        distributed=decision.mode, shard_dtype=decision.shard_dtype, decision=decision, warnings=found
    )
