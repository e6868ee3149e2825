"""Compose the plan from the step plans; apply it step by step, in the step order."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from kbitprep._errors import PlanWarning
from kbitprep._hf import unwrap_model
from kbitprep._plan import PreparationPlan, UndoLog
from kbitprep.steps import cast, checkpoint, compute, freeze, trainability
from kbitprep.steps.context import StepPlan

__all__ = ["APPLY_ORDER", "apply_steps", "compose"]

# the apply steps, in order; resolve and distributed only decide (kbitprep.plan runs the planners)
APPLY_ORDER = (trainability, freeze, cast, compute, checkpoint)


def compose(steps: Sequence[StepPlan]) -> PreparationPlan:
    """The plan whose fields are the step plans' fields (each owned by exactly one step) and
    whose warnings are theirs, in step order, each once."""
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
