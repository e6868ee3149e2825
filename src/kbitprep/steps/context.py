"""What every step planner reads (the model, the resolved strategy and one inventory of
parameters, taken once per :func:`kbitprep.plan` call) and what each returns (a
:class:`StepPlan`). The options are not here: each planner takes those it reads as arguments."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
from torch import nn

from kbitprep._errors import PlanWarning
from kbitprep._hf import adapter_param_ids
from kbitprep._storage import is_storage_dtype

if TYPE_CHECKING:
    from kbitprep.backends.base import QuantBackend

__all__ = ["Context", "ParamEntry", "StepPlan", "bits", "nbytes_as", "prefix_of", "take_inventory"]


@dataclass(slots=True)
class ParamEntry:
    """One parameter (tied names folded into one entry).

    Attributes:
        names: Every name it has, first one first.
        param: The parameter.
        module: The module that owns it under its first name.
        storage: Quantized storage (the strategy's ``is_quantized_param``): never cast or trained.
        adapter: A parameter of an adapter already attached (PEFT tuner layers).
    """

    names: list[str]
    param: nn.Parameter
    module: nn.Module
    storage: bool = False
    adapter: bool = False

    @property
    def plain_float(self) -> bool:
        """A floating base parameter that is not storage: what casts and compute dtypes are about."""
        p = self.param
        return not self.storage and not self.adapter and p.is_floating_point() and not is_storage_dtype(p.dtype)

    @property
    def castable(self) -> bool:
        """A floating parameter that is not storage, base or adapter: what the upcast policy and
        the compute dtype apply to. An adapter already attached (a ``modules_to_save`` copy, LoRA
        weights) is cast as peft 0.21 casts it, so it never computes in another dtype than the
        base it copies and never trains below the upcast dtype; keep patterns never hold it low."""
        p = self.param
        return not self.storage and p.is_floating_point() and not is_storage_dtype(p.dtype)


@dataclass(frozen=True, slots=True)
class Context:
    """The inputs shared by the step planners; built once by ``plan``.

    Attributes:
        model: What the caller passed (maybe a ``peft.PeftModel``).
        base: The transformers model inside it.
        prefix: ``base``'s name inside ``model`` plus a dot, or ``""``.
        strategy: The resolved backend strategy.
        reason: Why that backend was chosen.
        inventory: Every parameter of ``model``, in model order.
    """

    model: nn.Module
    base: nn.Module
    prefix: str
    strategy: QuantBackend
    reason: str
    inventory: tuple[ParamEntry, ...]


@dataclass(frozen=True, kw_only=True)
class StepPlan:
    """What one step planner returns: a frozen dataclass whose fields (other than ``warnings``)
    are fields of :class:`~kbitprep.PreparationPlan`, each owned by exactly one step, and the
    step's warnings."""

    warnings: tuple[PlanWarning, ...] = ()

    def plan_fields(self) -> dict[str, object]:
        """The step's fields of the plan, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "warnings"}


def take_inventory(model: nn.Module, strategy: QuantBackend) -> tuple[ParamEntry, ...]:
    """Every parameter of ``model`` once, marked as storage or adapter."""
    modules = dict(model.named_modules(remove_duplicate=False))
    by_id: dict[int, ParamEntry] = {}
    adapters = adapter_param_ids(model)
    for name, param in model.named_parameters(remove_duplicate=False):
        entry = by_id.get(id(param))
        if entry is not None:
            entry.names.append(name)
            continue
        owner = modules.get(name.rpartition(".")[0], model)
        entry = ParamEntry([name], param, owner)
        entry.adapter = id(param) in adapters
        entry.storage = not entry.adapter and strategy.is_quantized_param(name, param, owner)
        by_id[id(param)] = entry
    return tuple(by_id.values())


def prefix_of(model: nn.Module, base: nn.Module) -> str:
    """``base``'s qualified name inside ``model`` plus a dot (``""`` when they are one)."""
    if model is base:
        return ""
    for name, module in model.named_modules():
        if module is base:
            return f"{name}."
    return ""


def nbytes_as(param: torch.Tensor, dtype: torch.dtype) -> int:
    """Bytes ``param`` would take in ``dtype``."""
    return param.numel() * torch.empty((), dtype=dtype).element_size()


def bits(dtype: torch.dtype) -> int:
    """Width of a floating dtype in bits."""
    return torch.finfo(dtype).bits
