"""The cast step: which plain floating parameters are upcast (the backend's policy, the
``upcast`` option, ``keep_in_low_precision``), the bytes it costs, the dtype a parameter that
becomes trainable later is stored in, and the apply step that casts them."""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kbitprep._errors import InvalidArgumentError, PlanWarning
from kbitprep._names import KeepPatterns, covering, match_keep
from kbitprep._plan import CastItem, PreparationPlan, UndoLog
from kbitprep._storage import tensor_nbytes
from kbitprep.steps.context import Context, ParamEntry, StepPlan, bits, nbytes_as
from kbitprep.steps.distributed import DistributedDecision

__all__ = ["CastPlan", "apply", "plan_casts", "target_dtype"]

# casts from these to a wider float are exact, so undo casts back instead of keeping copies
_WIDENING = {
    torch.float16: (torch.float32, torch.float64),
    torch.bfloat16: (torch.float32, torch.float64),
    torch.float32: (torch.float64,),
}


@dataclass(frozen=True, kw_only=True)
class CastPlan(StepPlan):
    """The cast step's decisions (fields of :class:`~kbitprep.PreparationPlan`)."""

    casts: tuple[CastItem, ...] = ()
    bytes_delta: int = 0
    trainable_dtype: torch.dtype | None = None


def target_dtype(
    ctx: Context, e: ParamEntry, engine: DistributedDecision, upcast: object, upcast_dtype: torch.dtype
) -> torch.dtype | None:
    """The dtype the plan casts ``e`` to, or None (kept patterns already excluded): the
    engine's one dtype in a distributed mode that keeps one, else ``upcast_dtype`` where the
    ``upcast`` option (``"auto"``: the strategy's ``should_upcast``) says so."""
    p = e.param
    if engine.mode is not None and not engine.upcast_kept:  # one dtype for the engine; never an upcast
        wanted = engine.shard_dtype if engine.cast_to_shard_dtype else None
        return wanted if wanted is not None and p.dtype != wanted else None
    name = e.names[0]
    if upcast == "auto":
        wanted_cast = ctx.strategy.should_upcast(name, p, e.module)
    elif upcast in ("all", "none"):
        wanted_cast = upcast == "all"
    else:
        assert callable(upcast)
        wanted_cast = _ask_policy(upcast, name, p, e.module)
    return upcast_dtype if wanted_cast and p.dtype != upcast_dtype else None


def _ask_policy(
    policy: Callable[[str, nn.Parameter, nn.Module], object], name: str, p: nn.Parameter, m: nn.Module
) -> bool:
    """The answer of a callable ``upcast`` for one parameter: ``True`` or ``False`` (a 0-d bool
    tensor counts), asked while planning, so a bad policy changes nothing.

    Raises:
        InvalidArgumentError: The callable raised, or returned something else than a bool
            (``"no"`` would otherwise read as True and cast everything).
    """
    where = f"for parameter {name!r} ({p.dtype}, shape {tuple(p.shape)})"
    try:
        answer = policy(name, p, m)
    except Exception as exc:
        raise InvalidArgumentError(
            f"The upcast callable raised {type(exc).__name__}: {exc} {where}. It is called as "
            "upcast(name, param, module) for every floating parameter that is not quantized storage and must "
            "return True (cast) or False; nothing was changed."
        ) from exc
    if isinstance(answer, torch.Tensor) and answer.dtype == torch.bool and answer.numel() == 1:
        return bool(answer)
    if not isinstance(answer, bool):
        raise InvalidArgumentError(
            f"The upcast callable returned {answer!r} ({type(answer).__name__}) {where}; it must return True "
            "(cast) or False. Nothing was changed."
        )
    return answer


def plan_casts(
    ctx: Context,
    engine: DistributedDecision,
    keep_in_low_precision: KeepPatterns,
    upcast: object,
    upcast_dtype: torch.dtype,
    backend: str,
    fixup_bytes: int = 0,
) -> CastPlan:
    """Which plain floating parameters are cast, the bytes it costs, and the dtype a parameter
    that becomes trainable later is stored in.

    Args:
        ctx: The shared planning context.
        engine: The distributed step's decision.
        keep_in_low_precision: The ``keep_in_low_precision`` option: what it covers is never cast.
        upcast: The ``upcast`` option.
        upcast_dtype: The ``upcast_dtype`` option.
        backend: The ``backend`` option (only its wording in a warning).
        fixup_bytes: The trainability step's bytes of the backend's fix-ups, added to
            ``bytes_delta``.

    Raises:
        InvalidArgumentError: A ``keep_in_low_precision`` pattern matches nothing, or a callable
            ``upcast`` raises or answers something else than a bool.
    """
    notes: list[PlanWarning] = []
    casts: list[CastItem] = []
    matched: set[str] = set()
    lowered: set[str] = set()  # patterns that hold at least one parameter below the upcast dtype
    # raises InvalidArgumentError for a pattern that matches nothing, before anything changes
    keep = match_keep(ctx.model, ctx.prefix, keep_in_low_precision)
    # a quantized layer's own floating parameters (a bitsandbytes bias) follow the policy: the
    # layer converts them to its compute dtype at first use (bitsandbytes 0.50 re-stores
    # Linear4bit's bias at the compute dtype), so holding them low would save nothing
    quantized_layers = {id(e.module) for e in ctx.inventory if e.storage}
    for e in ctx.inventory:
        if not e.castable:
            continue
        hits = [] if e.adapter or id(e.module) in quantized_layers else covering(keep, e.names)
        matched.update(hits)
        if bits(e.param.dtype) < bits(upcast_dtype):
            lowered.update(hits)
        to = None if hits else target_dtype(ctx, e, engine, upcast, upcast_dtype)
        if to is not None:
            p = e.param
            item = CastItem(
                e.names[0],
                tuple(p.shape),
                p.dtype,
                to,
                tensor_nbytes(p),
                nbytes_as(p, to),
                tuple(e.names[1:]),
            )
            casts.append(item)
    for found in keep:
        pattern = found.pattern
        if pattern not in matched:
            notes.append(
                PlanWarning(
                    "precision",
                    f"keep_in_low_precision pattern {pattern!r} matches {len(found.modules) + len(found.params)} "
                    f"module(s) or parameter(s) (first: {found.first!r}), but nothing under them is a floating parameter the "
                    "plan could cast (quantized storage and attached adapters are never held low), so it changes nothing.",
                )
            )
        elif pattern not in lowered:
            notes.append(
                PlanWarning(
                    "precision",
                    f"keep_in_low_precision pattern {pattern!r} matches only parameters already in "
                    f"{upcast_dtype} or wider (an earlier prepare may have upcast them); kbitprep never "
                    "casts down, so they stay as they are. Undo the earlier preparation (report.undo()) first to keep "
                    "them low.",
                )
            )
    delta = sum(c.bytes_after - c.bytes_before for c in casts)
    notes.extend(_cast_warnings(ctx, engine, casts, delta, backend, upcast, upcast_dtype))
    return CastPlan(
        casts=tuple(casts),
        bytes_delta=delta + fixup_bytes,
        trainable_dtype=_trainable_dtype(engine, upcast, upcast_dtype),
        warnings=tuple(notes),
    )


def _trainable_dtype(engine: DistributedDecision, upcast: object, upcast_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype a parameter that becomes trainable after ``prepare`` (a peft ``modules_to_save``
    copy of a kept module) is stored in: the upcast dtype, unless the options keep storage as it
    is (``upcast="none"``, or a distributed engine that holds every parameter in one dtype)."""
    if upcast == "none" or (engine.mode is not None and not engine.upcast_kept):
        return None
    return upcast_dtype


def _cast_warnings(
    ctx: Context,
    engine: DistributedDecision,
    casts: list[CastItem],
    delta: int,
    backend: str,
    upcast: object,
    upcast_dtype: torch.dtype,
) -> list[PlanWarning]:
    strategy = ctx.strategy
    found: list[PlanWarning] = []
    if not casts or (engine.mode is not None and not engine.upcast_kept):
        return found
    if upcast == "all" and strategy.holds_storage:
        auto = any(strategy.should_upcast(e.names[0], e.param, e.module) for e in ctx.inventory if e.plain_float)
        if not auto:
            found.append(
                PlanWarning(
                    "memory",
                    f"upcast='all' on a {strategy.name} model: its quantized kernels expect their own compute dtype; "
                    f"kbitprep casts the inputs of those layers to it, but the upcast costs {delta:,} bytes for no "
                    "accuracy the kernels can use.",
                )
            )
    if not strategy.holds_storage and delta > 0:
        what = "The model is not quantized" if backend == "auto" else "backend=none treats the model as unquantized"
        found.append(
            PlanWarning(
                "memory",
                f"{what}; upcasting {len(casts)} parameter(s) to {upcast_dtype} adds {delta:,} bytes "
                f"({delta / 2**20:.1f} MiB), as peft does. Pass upcast='none' to keep the model's dtype.",
            )
        )
    return found


# -- compute dtype ----------------------------------------------------------------------------

# -- apply ------------------------------------------------------------------------------------


def _cast_data(param: nn.Parameter, dtype: torch.dtype) -> None:
    param.data = param.data.to(dtype)


def apply(model: nn.Module, p: PreparationPlan, log: UndoLog) -> None:
    """Cast what ``p.casts`` lists; a widening cast is undone by casting back (exact), any
    other keeps the original storage to restore."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for c in p.casts:
        param = params[c.name]
        to = c.to_dtype
        if param.dtype == to:
            continue
        old = param.dtype
        if to in _WIDENING.get(old, ()):
            param.data = param.data.to(to)
            log.add(functools.partial(_cast_data, param, old))
        else:
            original = param.data
            param.data = param.data.to(to)
            log.add(functools.partial(setattr, param, "data", original))
