"""The step order: compose the plan from the step planners, apply it step by step."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from kbitprep._errors import PlanWarning
from kbitprep._hf import unwrap_model
from kbitprep._options import Options
from kbitprep._plan import PreparationPlan, UndoLog
from kbitprep.steps import cast, checkpoint, compute, distributed, freeze, resolve, trainability
from kbitprep.steps.context import StepPlan

__all__ = ["apply_steps", "plan_steps"]

# the apply steps, in order; resolve and distributed only decide
APPLY_ORDER = (trainability, freeze, cast, compute, checkpoint)


def plan_steps(model: nn.Module, opts: Options) -> PreparationPlan:
    """Run every step planner and compose the plan; changes nothing."""
    resolved, ctx = resolve.plan(model, opts)
    engine = distributed.plan(ctx)
    ctx = replace(ctx, distributed=engine.decision)
    able = trainability.plan(ctx)
    steps: list[StepPlan] = [resolved, engine, able, freeze.plan(ctx)]
    casts = cast.plan(ctx, able.fixup_bytes)
    steps += [casts, compute.plan(ctx, casts.casts), checkpoint.plan(ctx)]
    fields: dict[str, object] = {}
    found: list[PlanWarning] = []
    for step in steps:
        for name, value in step.plan_fields().items():
            assert name not in fields, f"plan field {name!r} is set by two steps"
            fields[name] = value
        found.extend(w for w in step.warnings if w not in found)
    return PreparationPlan(**fields, warnings=tuple(found))  # type: ignore[arg-type]


def apply_steps(model: nn.Module, p: PreparationPlan) -> UndoLog:
    """Apply ``p`` step by step; should one fail, what was already done is undone first."""
    log = UndoLog(unwrap_model(model))
    try:
        for step in APPLY_ORDER:
            step.apply(model, p, log)
    except BaseException:
        log.undo()
        raise
    return log
