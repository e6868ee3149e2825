"""The freeze step: every base parameter ends with ``requires_grad=False``; adapters already
attached stay trainable (a warning says the call order is unusual)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from torch import nn

from kbitprep._errors import PlanWarning
from kbitprep._plan import PreparationPlan, UndoLog
from kbitprep.steps.context import Context, StepPlan

__all__ = ["FreezePlan", "apply", "plan_freeze"]


@dataclass(frozen=True, kw_only=True)
class FreezePlan(StepPlan):
    """The freeze step's decisions (fields of :class:`~kbitprep.PreparationPlan`)."""

    frozen: int = 0
    kept_trainable: tuple[str, ...] = ()
    freeze_names: tuple[str, ...] = ()


def plan_freeze(ctx: Context) -> FreezePlan:
    """Every base parameter is frozen; adapters already attached stay trainable."""
    adapters = [e for e in ctx.inventory if e.adapter]
    kept = tuple(n for e in adapters for n in e.names)
    found: list[PlanWarning] = []
    if adapters:
        found.append(
            PlanWarning(
                "adapters",
                f"{len(kept)} adapter parameter(s) are already attached (first: {kept[0]!r}) and stay trainable. "
                "The usual order is prepare, then attach adapters (get_peft_model).",
            )
        )
    return FreezePlan(
        frozen=sum(1 for e in ctx.inventory if not e.adapter),
        kept_trainable=kept,
        freeze_names=tuple(e.names[0] for e in ctx.inventory if not e.adapter and e.param.requires_grad),
        warnings=tuple(found),
    )


def apply(model: nn.Module, p: PreparationPlan, log: UndoLog) -> None:
    """Freeze what the plan lists, recorded for undo."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in p.freeze_names:
        param = params[name]
        if param.requires_grad:
            param.requires_grad_(False)
            log.add(functools.partial(param.requires_grad_, True))
