"""The orchestrator: ``plan`` decides, ``prepare`` applies, ``PreparationReport.undo`` reverts.

``plan`` checks the arguments and runs the step planners of :mod:`kbitprep.steps` (resolve →
distributed → trainability → freeze → cast → compute → checkpoint; each ``plan_<step>``), each given the options it
reads and returning its typed step plan; ``prepare`` applies the plan and nothing else, step by
step. Backend differences are
capabilities the strategy declares (``QuantBackend``); no backend name is compared here.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kbitprep._errors import InvalidArgumentError, InvalidModelError
from kbitprep._names import keep_patterns
from kbitprep._options import DistributedMode, PrepareOptions, UpcastPolicy, check_options
from kbitprep._plan import PreparationPlan, PreparationReport
from kbitprep.steps.cast import plan_casts
from kbitprep.steps.checkpoint import plan_checkpointing
from kbitprep.steps.compute import plan_compute
from kbitprep.steps.distributed import plan_distributed
from kbitprep.steps.freeze import plan_freeze
from kbitprep.steps.resolve import plan_backend
from kbitprep.steps.run import apply_steps, compose
from kbitprep.steps.trainability import plan_trainability

__all__ = ["UpcastPolicy", "plan", "prepare", "prepare_model_for_kbit_training"]

if TYPE_CHECKING:
    from typing_extensions import Unpack

logger = logging.getLogger(__name__)


def _validate_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise InvalidModelError(
            f"Expected a torch.nn.Module (e.g. the model from AutoModelForCausalLM.from_pretrained); "
            f"got {type(model).__name__}. Pass the model object, not its name or state dict."
        )
    return model


def _require_data(model: nn.Module) -> None:
    """``prepare`` changes parameters, so every one must hold data; ``plan`` reads shapes and
    dtypes only and accepts meta-device parameters."""
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise InvalidModelError(
            f"{len(meta)} parameter(s) are on the meta device (first: {meta[0]!r}), so they hold no "
            "data to freeze or cast. Load the weights first (from_pretrained without "
            "low_cpu_mem_usage tricks, or load_state_dict(..., assign=True)), or, for device_map "
            "offloading, keep the offloaded modules off the meta device. kbitprep.plan and "
            "kbitprep.estimate accept a meta-device model."
        )


def plan(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Mapping[str, Any] | None = None,
    *,
    backend: str = "auto",
    upcast: UpcastPolicy = "auto",
    upcast_dtype: torch.dtype = torch.float32,
    keep_in_low_precision: str | Iterable[str] = (),
    distributed: DistributedMode = None,
    activation_offload: bool = False,
    checkpoint_every_n_layers: int = 1,
    checkpoint_trainable_blocks_only: bool = False,
    **unknown: object,
) -> PreparationPlan:
    r"""Decide how to prepare ``model`` for k-bit adapter training; change nothing.

    No parameter, dtype, ``requires_grad``, hook, checkpointing flag or ``use_cache`` is
    touched, no forward is run, and no parameter storage is allocated.

    Args:
        model: Quantized model on any device; a ``peft.PeftModel`` is looked through. Its
            parameters may be on the meta device (a model built from a config with
            ``with torch.device("meta")``): the plan reads shapes and dtypes only, so its byte
            counts are those the loaded model will have. Only :func:`prepare` needs data.
        use_gradient_checkpointing: Turn gradient (activation) checkpointing on. Default True, as
            peft 0.21; the unquantized backend leaves it as the model has it, as peft does.
        gradient_checkpointing_kwargs: Passed to ``torch.utils.checkpoint.checkpoint``;
            ``use_reentrant`` is always explicit: yours, else ``False``.
        backend: ``"auto"`` (detect) or a registered backend name.
        upcast: ``"auto"`` (the backend's policy: peft's fp16/bf16 → fp32 for bitsandbytes and
            unquantized models, nothing for the others), ``"all"``, ``"none"``, or a callable
            ``(name, param, module) -> bool``.
        upcast_dtype: Floating dtype to upcast to. Default ``torch.float32``, as peft 0.21.
        keep_in_low_precision: Modules never cast, named as peft names ``target_modules``: a
            sequence (any iterable, read once) of names, each matching a module by its exact name or a dotted suffix
            (``("lm_head", "embed_tokens")``, ``("vision_tower",)``, ``("model.layers.0",)``)
            and covering everything under it, or a parameter the same way
            (``"model.norm.weight"``); a name with ``*``, ``?`` or ``[`` is an fnmatch glob over
            whole names. A single string is a regular expression full-matched against module
            names (``r".*\.mlp"``), not a name. Inside a ``peft.PeftModel`` names are those of
            the model it wraps. Kept modules compute in the dtype the upcast policy would have
            given them without keep (as peft 0.21 for bitsandbytes: ``upcast_dtype``), their
            weight brought up at use and never stored, so logits, losses and gradients are
            those of the call without keep.
        distributed: ``None`` (single process, as peft), an engine (``"fsdp"`` or
            ``"deepspeed"``, see docs/distributed.md) or ``"auto"`` (on when a sharded run is
            detected). Under FSDP, and DeepSpeed with bf16 or fp16, every floating parameter
            ends in one dtype (``shard_dtype``) and nothing is upcast; DeepSpeed without either
            keeps dtypes, so the backend's upcast applies (``shard_dtype`` is ``None``).
        activation_offload: Keep checkpointed activations in host memory (transformers 5.24
            ``activation_checkpointing_enable(offload=True)``).
        checkpoint_every_n_layers: Checkpoint every n-th block only (transformers 5.24); the
            others keep their activations. The blocks before the first block holding a
            trainable parameter build no graph (decided at each training forward).
        checkpoint_trainable_blocks_only: The blocks before the first block holding a
            trainable parameter build no graph and are not checkpointed; every block from it
            on is checkpointed (decided at each training forward). Never keeps more
            activations than checkpointing every block.

    Returns:
        The plan. Byte counts are in bytes; a tied parameter counts once.

    Raises:
        InvalidModelError: ``model`` is not an ``nn.Module``.
        InvalidArgumentError: An option has the wrong type or value, options conflict, or a
            ``keep_in_low_precision`` pattern matches nothing (the message names the closest
            names).
        UnknownBackendError: ``backend`` names no registered backend.
        BackendUnavailableError: A fix-up needs the backend's library, which is not installed.
        NotTrainableError: The backend says adapters cannot train.
        NotShardableError: The distributed engine cannot shard the quantized storage.
    """
    if unknown:
        known = ["use_gradient_checkpointing", "gradient_checkpointing_kwargs", *sorted(PrepareOptions.__annotations__)]
        hint = (
            " use_reentrant goes inside gradient_checkpointing_kwargs: gradient_checkpointing_kwargs="
            f"{{'use_reentrant': {unknown['use_reentrant']!r}}}."
            if "use_reentrant" in unknown
            else ""
        )
        raise InvalidArgumentError(f"Unknown option(s) {sorted(unknown)}; plan/prepare take {known}.{hint}")
    # positional, in the order of the signatures they fill: each option reaches the step that reads it
    check_options(
        use_gradient_checkpointing,
        gradient_checkpointing_kwargs,
        backend,
        upcast,
        upcast_dtype,
        distributed,
        activation_offload,
        checkpoint_every_n_layers,
        checkpoint_trainable_blocks_only,
    )
    keep = keep_patterns(keep_in_low_precision)  # read once: a generator is consumed here
    resolved, ctx = plan_backend(_validate_model(model), backend)
    engine = plan_distributed(ctx, distributed, upcast)
    able = plan_trainability(ctx)
    casts = plan_casts(ctx, engine.decision, keep, upcast, upcast_dtype, backend, able.fixup_bytes)
    precision = plan_compute(ctx, casts.casts, engine.decision, keep, upcast, upcast_dtype)
    checkpointing = plan_checkpointing(
        ctx,
        engine.decision,
        use_gradient_checkpointing,
        gradient_checkpointing_kwargs,
        activation_offload,
        checkpoint_every_n_layers,
        checkpoint_trainable_blocks_only,
    )
    return compose((resolved, engine, able, plan_freeze(ctx), casts, precision, checkpointing))


def prepare(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Mapping[str, Any] | None = None,
    **options: Unpack[PrepareOptions],
) -> PreparationReport:
    """Prepare ``model`` in place for k-bit adapter training and return what was done.

    Takes the arguments of :func:`plan`, plans, then applies the plan and nothing else: backend
    fix-ups (``before_training``), freeze, casts, compute-dtype rules, checkpointing (with the
    input-grad wiring it needs, once). Each plan warning is also emitted as a
    :class:`KbitPrepWarning` of its kind (``MemoryWarning``, ``PrecisionWarning``, ...; see
    :class:`PlanWarning`).

    Returns:
        The report (the plan as applied) with :meth:`PreparationReport.undo`.

    Raises:
        InvalidModelError: A parameter is on the meta device (it holds no data to change).
        KbitPrepError: Everything :func:`plan` raises, before anything is changed. Should an
            apply step fail unexpectedly, what was already done is undone before the error
            propagates.
    """
    _require_data(_validate_model(model))
    p = plan(model, use_gradient_checkpointing, gradient_checkpointing_kwargs, **options)
    log = apply_steps(model, p)
    for w in p.warnings:
        warnings.warn(w.message, w.category, stacklevel=2)
    if p.casts:
        logger.info("Upcast %d parameters (%+d bytes)", len(p.casts), p.bytes_delta)
    return PreparationReport.from_plan(p, log)


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Mapping[str, Any] | None = None,
    **options: Unpack[PrepareOptions],
) -> nn.Module:
    """Drop-in replacement for ``peft.prepare_model_for_kbit_training`` (peft 0.21).

    Same positional parameters (``use_gradient_checkpointing=True``,
    ``gradient_checkpointing_kwargs=None``) and the keywords of :func:`plan`; mutates ``model``
    in place and returns the same object. The report is kept on the model as
    ``model._kbitprep_report`` so it can be undone. Raises what :func:`plan` raises.
    """
    report = prepare(model, use_gradient_checkpointing, gradient_checkpointing_kwargs, **options)
    model._kbitprep_report = report  # type: ignore[assignment]
    return model
