"""What the gptq and awq strategies share about gptqmodel's layers (7.6.0): the common base class
and the pinning of ``linear_mode`` to training. Nothing here imports gptqmodel."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from torch import nn

from kbitprep.backends.base import UndoFn, loaded_module

__all__ = ["INFERENCE", "TRAIN", "base_classes", "latched_layers", "pin_train_mode"]

logger = logging.getLogger(__name__)

TRAIN = "train"
INFERENCE = "inference"  # gptqmodel's LinearMode is a str Enum: LinearMode.INFERENCE == "inference"


def base_classes() -> tuple[type, ...]:
    """gptqmodel's ``BaseQuantLinear`` if gptqmodel is imported: the base of its GPTQ and AWQ
    kernels alike (each lists the methods it serves in ``SUPPORTS_METHODS``)."""
    qlinear = loaded_module("gptqmodel.nn_modules.qlinear")
    base = getattr(qlinear, "BaseQuantLinear", None) if qlinear is not None else None
    return (base,) if isinstance(base, type) else ()


def latched_layers(layers: Iterable[tuple[str, nn.Module]]) -> tuple[list[str], int]:
    """The names of the layers an eval-mode no-grad forward already latched into
    ``linear_mode="inference"``, and how many of ``layers`` have a ``linear_mode`` at all."""
    found = list(layers)
    latched = [n for n, m in found if getattr(m, "linear_mode", None) == INFERENCE]
    return latched, sum(1 for _n, m in found if hasattr(m, "linear_mode"))


def pin_train_mode(layers: Iterable[nn.Module], label: str) -> UndoFn | None:
    """Pin every layer whose ``linear_mode`` is still None to ``"train"``.

    gptqmodel 7.6.0 latches the inference mode (a repacked layout with no backward) on the first
    eval-mode no-grad forward, and only while ``linear_mode is None``; pinned, a later such
    forward (a smoke test, ``Trainer``'s evaluation) keeps the layer differentiable.

    Returns:
        An undo that sets the pinned layers back to None, or None when none was pinned.
    """
    pinned = [m for m in layers if hasattr(m, "linear_mode") and m.linear_mode is None]
    for module in pinned:
        setattr(module, "linear_mode", TRAIN)  # noqa: B010 (nn.Module's setattr typing)
    if not pinned:
        return None
    logger.info("Pinned %d %s layers to linear_mode='train'", len(pinned), label)

    def undo() -> None:
        for module in pinned:
            if getattr(module, "linear_mode", None) == TRAIN:
                setattr(module, "linear_mode", None)  # noqa: B010 (nn.Module's setattr typing)

    return undo
