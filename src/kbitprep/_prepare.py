"""The orchestrator: ``plan`` decides, ``prepare`` applies, ``PreparationReport.undo`` reverts.

``plan`` assembles small step planners, each returning its plan fields and its warnings:
resolve (backend, distributed engine) → trainability → freeze → casts → compute dtype →
checkpointing → distributed. ``prepare`` applies the plan and nothing else: backend fix-ups,
freeze, casts, compute-dtype rules, checkpointing. Backend differences are capabilities the
strategy declares (``QuantBackend``); no backend name is compared here.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from kbitprep import _distributed
from kbitprep._checkpoint_step import apply_checkpointing, plan_checkpointing
from kbitprep._compute import apply_precision
from kbitprep._context import Context, ParamEntry, Step, prefix_of, take_inventory
from kbitprep._errors import InvalidArgumentError, InvalidModelError, PlanWarning, as_plan_warning
from kbitprep._hf import unwrap_model
from kbitprep._options import Options, PrepareOptions, UpcastPolicy, parse_options
from kbitprep._plan import CastItem, ModelInput, ModulePrecision, PreparationPlan, PreparationReport, UndoLog
from kbitprep._precision import apply_casts, plan_casts, plan_compute
from kbitprep._registry import detect_backend, get_backend
from kbitprep._storage import tensor_nbytes
from kbitprep.backends.base import QuantBackend

__all__ = [
    "CastItem",
    "ModelInput",
    "ModulePrecision",
    "PreparationPlan",
    "PreparationReport",
    "UpcastPolicy",
    "plan",
    "prepare",
    "prepare_model_for_kbit_training",
]

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


def _resolve_backend(base: nn.Module, name: str) -> tuple[QuantBackend, str, list[str]]:
    detection = detect_backend(base)
    notes = [
        f"backend {other!r} also claims this model ({why}); {detection.backend!r} has the higher priority"
        for other, why in detection.others
    ]
    if name == "auto":
        return get_backend(detection.backend), detection.reason, notes
    backend = get_backend(name)
    if type(get_backend(detection.backend)) is not type(backend):
        notes = [
            f"backend={name!r} was passed, but the model looks like {detection.backend!r} ({detection.reason}); "
            f"the {name!r} policy is applied as asked. Pass backend='auto' to use the detected one."
        ]
    else:
        notes = []
    return backend, f"backend={name!r} was passed", notes


def _resolve(model: nn.Module, opts: Options) -> tuple[Context, Step]:
    """The resolve step: the strategy, the inventory and the distributed engine's decision."""
    base = unwrap_model(model)
    strategy, reason, notes = _resolve_backend(base, opts.backend)
    inventory = take_inventory(model, strategy)
    engine_notes: list[str] = []
    decision = _distributed.resolve(
        opts.distributed,
        strategy,
        base,
        [e.param for e in inventory if e.storage],
        [e.param for e in inventory if e.plain_float],
        engine_notes,
    )
    found = [PlanWarning("detection", n) for n in notes] + [as_plan_warning(n, "distributed") for n in engine_notes]
    ctx = Context(model, base, prefix_of(model, base), strategy, reason, opts, inventory, decision)
    return ctx, Step({"backend": strategy.name, "reason": reason}, found)


def _output_embeddings(base: nn.Module) -> nn.Module | None:
    getter = getattr(type(base), "get_output_embeddings", None)
    if getter is None:
        return None
    try:
        found = getter(base)
    except Exception:  # custom-code models raise NotImplementedError and worse
        return None
    return found if isinstance(found, nn.Module) else None


def _unquantized_matrices(ctx: Context) -> list[ParamEntry]:
    """Plain floating weight matrices (2-D and more, fused 3-D experts included) outside the
    embeddings and the output head, which are left unquantized on purpose by every method."""
    head = _output_embeddings(ctx.base)
    return [
        e
        for e in ctx.inventory
        if e.plain_float and e.param.dim() >= 2 and not isinstance(e.module, nn.Embedding) and e.module is not head
    ]


def _plan_trainability(ctx: Context) -> Step:
    """Refuse before anything changes when adapters cannot train; the backend's findings; the
    bytes in quantized storage and in plain floating parameters, and a warning when the weight
    matrices left in floating point outweigh the quantized storage (fused MoE experts that
    transformers 5's 4-bit loader leaves in 16-bit)."""
    ctx.strategy.check_trainable(ctx.base)
    step = Step(warnings=[as_plan_warning(w, "backend") for w in ctx.strategy.plan_warnings(ctx.base)])
    storage = sum(tensor_nbytes(e.param) for e in ctx.inventory if e.storage)
    floating = sum(tensor_nbytes(e.param) for e in ctx.inventory if e.plain_float)
    step.fields.update(storage_bytes=storage, float_bytes=floating)
    matrices = _unquantized_matrices(ctx)
    left = sum(tensor_nbytes(e.param) for e in matrices)
    if storage and left > storage:
        # the largest matrix, first in model order among equals: the experts rather than a router
        top = max(matrices, key=lambda e: tensor_nbytes(e.param))
        shape = "x".join(str(s) for s in top.param.shape)
        owner = top.names[0].rpartition(".")[0].rpartition(".")[2] or top.names[0]
        step.warn(
            "memory",
            f"Most weight bytes are not quantized: {left:,} bytes in {len(matrices)} weight matrices stay in "
            f"floating point beside {storage:,} bytes of quantized storage ({storage / (storage + floating):.0%} "
            f"of the parameter bytes are quantized). Largest: {top.names[0]!r} ({shape}, {top.param.dtype}); "
            "fused MoE experts are the usual case, since the loader quantizes linear layers only. Memory is far "
            "above what the quantization method suggests: quantize those weights too, budget for them, or keep "
            f"them at their stored dtype rather than upcast with keep_in_low_precision=({owner!r},).",
        )
    return step


def _plan_freeze(ctx: Context) -> Step:
    """Every base parameter is frozen; adapters already attached stay trainable."""
    adapters = [e for e in ctx.inventory if e.adapter]
    kept = tuple(n for e in adapters for n in e.names)
    step = Step(
        {
            "frozen": sum(1 for e in ctx.inventory if not e.adapter),
            "kept_trainable": kept,
            "freeze_names": tuple(e.names[0] for e in ctx.inventory if not e.adapter and e.param.requires_grad),
        }
    )
    if adapters:
        step.warn(
            "adapters",
            f"{len(kept)} adapter parameter(s) are already attached (first: {kept[0]!r}) and stay trainable. "
            "The usual order is prepare, then attach adapters (get_peft_model).",
        )
    return step


def _plan_distributed(ctx: Context) -> Step:
    """The engine and its one dtype, checked against the options."""
    decision, opts = ctx.distributed, ctx.options
    if decision.mode is None:
        return Step()
    if opts.upcast not in ("auto", "none") and not decision.upcast_kept:
        raise InvalidArgumentError(
            f"upcast={opts.upcast!r} cannot be combined with distributed={opts.distributed!r}: the "
            f"distributed mode keeps every floating parameter in one dtype ({decision.shard_dtype}). "
            "Leave upcast at 'auto'."
        )
    shard = None if decision.shard_dtype is None else str(decision.shard_dtype)
    return Step({"distributed": decision.mode, "shard_dtype": shard})


def _plan_trainable_dtype(ctx: Context) -> Step:
    """The dtype a parameter that becomes trainable after ``prepare`` (a peft ``modules_to_save``
    copy of a kept module) is stored in: the upcast dtype, unless the options keep storage as it
    is (``upcast="none"``, or a distributed engine that holds every parameter in one dtype)."""
    opts, dist = ctx.options, ctx.distributed
    if opts.upcast == "none" or (dist.mode is not None and not dist.upcast_kept):
        return Step()
    return Step({"trainable_dtype": str(opts.upcast_dtype)})


def _assemble(model: nn.Module, opts: Options) -> PreparationPlan:
    ctx, resolved = _resolve(model, opts)
    steps = [resolved, _plan_trainability(ctx), _plan_freeze(ctx), _plan_distributed(ctx), _plan_trainable_dtype(ctx)]
    casts = plan_casts(ctx)
    steps += [casts, plan_compute(ctx, casts.fields["casts"]), plan_checkpointing(ctx)]
    fields: dict[str, Any] = {}
    found: list[PlanWarning] = []
    for step in steps:
        fields.update(step.fields)
        found.extend(w for w in step.warnings if w not in found)
    return PreparationPlan(**fields, warnings=tuple(found))


def plan(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Mapping[str, Any] | None = None,
    **options: Unpack[PrepareOptions],
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
            sequence of names, each matching a module by its exact name or a dotted suffix
            (``("lm_head", "embed_tokens")``, ``("vision_tower",)``, ``("model.layers.0",)``)
            and covering everything under it, or a parameter the same way
            (``"model.norm.weight"``); a name with ``*``, ``?`` or ``[`` is an fnmatch glob over
            whole names. A single string is a regular expression full-matched against module
            names (``r".*\.mlp"``), not a name. Inside a ``peft.PeftModel`` names are those of
            the model it wraps. Kept modules compute in the dtype the upcast policy would have
            given them without keep (as peft 0.21 for bitsandbytes: ``upcast_dtype``), their
            weight brought up at use and never stored, so logits, losses and gradients are
            those of the call without keep.
        distributed: ``None`` (single process, as peft), an engine (``"fsdp"``, see
            docs/distributed.md) or ``"auto"`` (on when a sharded run is detected). Every
            floating parameter ends in one dtype (``shard_dtype``) and nothing is upcast.
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
    unknown = sorted(set(options) - set(PrepareOptions.__annotations__))
    if unknown:
        raise InvalidArgumentError(
            f"Unknown option(s) {unknown}; plan/prepare take {sorted(PrepareOptions.__annotations__)}."
        )
    opts = parse_options(use_gradient_checkpointing, gradient_checkpointing_kwargs, **options)
    return _assemble(_validate_model(model), opts)


def _apply_freeze(model: nn.Module, p: PreparationPlan, log: UndoLog) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in p.freeze_names:
        param = params[name]
        if param.requires_grad:
            param.requires_grad_(False)
            log.add(functools.partial(param.requires_grad_, True))


def _apply(model: nn.Module, p: PreparationPlan) -> UndoLog:
    base = unwrap_model(model)
    log = UndoLog(base)
    try:
        undo = get_backend(p.backend).before_training(base)
        if undo is not None:
            log.add(undo)
        _apply_freeze(model, p, log)
        apply_casts(model, p, log)
        apply_precision(model, p, log)
        apply_checkpointing(model, base, p, log)
    except BaseException:
        log.undo()
        raise
    return log


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
    log = _apply(model, p)
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
