"""The opt-in for a model transformers marks non-trainable although it trains.

:func:`mark_trainable` is the explicit opt-in for a model that transformers marks
non-trainable (``HfQuantizer.is_trainable`` False) although kbitprep's strategy has checked that
its quantized layers pass gradients (torchao ``IntxWeightOnlyConfig`` int4).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from kbitprep._hf import unwrap_model
from kbitprep._registry import detect_backend, get_backend

__all__ = ["TrainabilityOverride", "mark_trainable"]

logger = logging.getLogger(__name__)


_TRAINABLE_CLASSES: dict[type, type] = {}


def _trainable_subclass(cls: type) -> type:
    sub = _TRAINABLE_CLASSES.get(cls)
    if sub is None:
        sub = type(
            cls.__name__,
            (cls,),
            {
                "is_trainable": property(lambda self: True),
                "_kbitprep_original_class": cls,
                "__doc__": f"{cls.__name__} with is_trainable True (kbitprep.mark_trainable).",
                "__module__": __name__,
                "__qualname__": f"_TRAINABLE_CLASSES[{cls.__name__}]",
            },
        )
        _TRAINABLE_CLASSES[cls] = sub
    return sub


@dataclass
class TrainabilityOverride:
    """What :func:`mark_trainable` changed; :meth:`undo` (or leaving the ``with`` block) reverts it.

    Attributes:
        quantizer: The ``model.hf_quantizer`` whose ``is_trainable`` now reads True, or None when
            nothing needed changing.
        reason: Why the override was (or was not) needed, for logs.
    """

    quantizer: Any
    reason: str

    @property
    def active(self) -> bool:
        """Whether the override is in place."""
        q = self.quantizer
        return q is not None and getattr(type(q), "_kbitprep_original_class", None) is not None

    def undo(self) -> None:
        """Give the quantizer its own class back, so ``is_trainable`` is transformers' answer
        again. Calling it twice does nothing."""
        q = self.quantizer
        if q is not None:
            original = getattr(type(q), "_kbitprep_original_class", None)
            if original is not None:
                q.__class__ = original

    def __enter__(self) -> TrainabilityOverride:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()


def mark_trainable(model: nn.Module) -> TrainabilityOverride:
    """Let transformers' ``Trainer`` accept a model it marks non-trainable but that trains.

    transformers 5.24 ``Trainer.__init__`` calls ``trainer_utils.validate_quantization_for_training``,
    which refuses any model whose ``hf_quantizer.is_trainable`` is False. For torchao that flag is
    decided by the config's bit width (``TorchAoHfQuantizer.is_trainable`` is True only for 8-bit
    configs), so ``IntxWeightOnlyConfig(weight_dtype=torch.int4)`` is refused although LoRA on it
    receives gradients. This function asks kbitprep's strategy first: only when its
    ``check_trainable`` passes (for torchao, a train-mode probe of every quantized layer with a
    grad-requiring input) does it make ``model.hf_quantizer.is_trainable`` read True, by giving
    that quantizer object a subclass of its own class that overrides only ``is_trainable``.
    Nothing else about the model changes.

    Args:
        model: A transformers model or a ``peft.PeftModel`` around one, on any device.

    Returns:
        The override; call ``undo()`` after training, or use it as a context manager around
        building and running the trainer. When the quantizer already says trainable, or there is
        none, the override changes nothing (``active`` is False).

    Raises:
        NotTrainableError: kbitprep's strategy for this backend says adapters cannot train
            (e.g. torchao ``Int8DynamicActivationInt8WeightConfig``, or a backend that defers to
            transformers' flag), so the flag is left as it is.
    """
    base = unwrap_model(model)
    quantizer = getattr(base, "hf_quantizer", None)
    if quantizer is None:
        return TrainabilityOverride(None, "the model has no transformers quantizer; Trainer does not check it")
    if getattr(type(quantizer), "_kbitprep_original_class", None) is not None:
        return TrainabilityOverride(quantizer, "already marked trainable")
    if getattr(quantizer, "is_trainable", False) is True:
        return TrainabilityOverride(None, f"{type(quantizer).__name__}.is_trainable is already True")
    detection = detect_backend(base)
    get_backend(detection.backend).check_trainable(base)  # raises NotTrainableError
    quantizer.__class__ = _trainable_subclass(type(quantizer))
    reason = (
        f"{type(quantizer).__name__}.is_trainable is False, but the {detection.backend} strategy found "
        "that every quantized layer passes gradients"
    )
    logger.info("Marked %s trainable for transformers' Trainer: %s", type(base).__name__, reason)
    return TrainabilityOverride(quantizer, reason)
