"""The resolve step: the backend strategy (detected, or the one ``backend=`` names), why it
was chosen, and the one inventory of parameters every later step reads."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from kbitprep._errors import PlanWarning
from kbitprep._hf import unwrap_model
from kbitprep._registry import detect_backend, get_backend
from kbitprep.backends.base import QuantBackend
from kbitprep.steps.context import Context, StepPlan, prefix_of, take_inventory

__all__ = ["ResolvePlan", "plan_backend"]


@dataclass(frozen=True, kw_only=True)
class ResolvePlan(StepPlan):
    """The resolve step's decisions (fields of :class:`~kbitprep.PreparationPlan`)."""

    backend: str
    reason: str


def _strategy(base: nn.Module, name: str) -> tuple[QuantBackend, str, list[str]]:
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


def plan_backend(model: nn.Module, backend: str) -> tuple[ResolvePlan, Context]:
    """The strategy and the context every later step reads (its distributed decision is the
    distributed step's to fill in).

    Raises:
        UnknownBackendError: ``backend=`` names no registered backend.
    """
    base = unwrap_model(model)
    strategy, reason, notes = _strategy(base, backend)
    inventory = take_inventory(model, strategy)
    ctx = Context(model, base, prefix_of(model, base), strategy, reason, inventory)
    found = tuple(PlanWarning("detection", n) for n in notes)
    return ResolvePlan(backend=strategy.name, reason=reason, warnings=found), ctx
