"""The trainability step: the backend's refusal (before anything changes) and findings, the
bytes in quantized storage and in plain floating parameters, and the bytes the backend's fix-ups
will add (``fixup_bytes``); applied as those fix-ups (``before_training``)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from kbitprep._errors import PlanWarning, as_plan_warning
from kbitprep._hf import unwrap_model
from kbitprep._plan import PreparationPlan, UndoLog
from kbitprep._registry import get_backend
from kbitprep._storage import tensor_nbytes
from kbitprep.steps.context import Context, ParamEntry, StepPlan

__all__ = ["TrainabilityPlan", "apply", "plan_trainability"]


@dataclass(frozen=True, kw_only=True)
class TrainabilityPlan(StepPlan):
    """The trainability step's decisions (fields of :class:`~kbitprep.PreparationPlan`)."""

    storage_bytes: int = 0
    float_bytes: int = 0
    fixup_bytes: int = 0


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


def plan_trainability(ctx: Context) -> TrainabilityPlan:
    """Refuse before anything changes when adapters cannot train; the backend's findings; the
    bytes in quantized storage and in plain floating parameters, and a warning when the weight
    matrices left in floating point outweigh the quantized storage (fused MoE experts that
    transformers 5's 4-bit loader leaves in 16-bit)."""
    ctx.strategy.check_trainable(ctx.base)
    found = [as_plan_warning(w, "backend") for w in ctx.strategy.plan_warnings(ctx.base)]
    storage = sum(tensor_nbytes(e.param) for e in ctx.inventory if e.storage)
    floating = sum(tensor_nbytes(e.param) for e in ctx.inventory if e.plain_float)
    matrices = _unquantized_matrices(ctx)
    left = sum(tensor_nbytes(e.param) for e in matrices)
    if storage and left > storage:
        # the largest matrix, first in model order among equals: the experts rather than a router
        top = max(matrices, key=lambda e: tensor_nbytes(e.param))
        shape = "x".join(str(s) for s in top.param.shape)
        owner = top.names[0].rpartition(".")[0].rpartition(".")[2] or top.names[0]
        found.append(
            PlanWarning(
                "memory",
                f"Most weight bytes are not quantized: {left:,} bytes in {len(matrices)} weight matrices stay in "
                f"floating point beside {storage:,} bytes of quantized storage ({storage / (storage + floating):.0%} "
                f"of the parameter bytes are quantized). Largest: {top.names[0]!r} ({shape}, {top.param.dtype}); "
                "fused MoE experts are the usual case, since the loader quantizes linear layers only. Memory is far "
                "above what the quantization method suggests: quantize those weights too, budget for them, or keep "
                f"them at their stored dtype rather than upcast with keep_in_low_precision=({owner!r},).",
            )
        )
    fixups = ctx.strategy.fixup_bytes(ctx.base)
    return TrainabilityPlan(storage_bytes=storage, float_bytes=floating, fixup_bytes=fixups, warnings=tuple(found))


def apply(model: nn.Module, p: PreparationPlan, log: UndoLog) -> None:
    """The backend's fix-ups that training needs (kernel modes, packed layouts), recorded for undo."""
    undo = get_backend(p.backend).before_training(unwrap_model(model))
    if undo is not None:
        log.add(undo)
