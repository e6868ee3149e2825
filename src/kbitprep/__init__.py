"""kbitprep: prepare a quantized model for k-bit adapter training (QLoRA and friends).

A drop-in for ``peft.prepare_model_for_kbit_training`` built as one strategy per quantization
method, with a plan you can read before anything changes and a report you can undo.
"""

from __future__ import annotations

import kbitprep._render  # noqa: F401  (registers how str(plan) draws a plan)
from kbitprep._errors import (
    AdapterWarning,
    BackendUnavailableError,
    BackendWarning,
    CheckpointingWarning,
    DetectionWarning,
    DistributedWarning,
    DuplicateBackendError,
    InvalidArgumentError,
    InvalidModelError,
    KbitPrepError,
    KbitPrepWarning,
    MemoryWarning,
    NotShardableError,
    NotTrainableError,
    PlanWarning,
    PrecisionWarning,
    UnknownBackendError,
)
from kbitprep._estimate import MemoryEstimate, estimate
from kbitprep._plan import CastItem, ModelInput, ModulePrecision, PreparationPlan, PreparationReport
from kbitprep._prepare import plan, prepare, prepare_model_for_kbit_training
from kbitprep._registry import (
    BackendInfo,
    Detection,
    available_backends,
    detect_backend,
    get_backend,
    register_backend,
)
from kbitprep._trainable import TrainabilityOverride, mark_trainable
from kbitprep.backends.base import QuantBackend
from kbitprep.steps.distributed import cast_adapters

__version__ = "0.1.0"

__all__ = [
    "AdapterWarning",
    "BackendInfo",
    "BackendUnavailableError",
    "BackendWarning",
    "CastItem",
    "CheckpointingWarning",
    "Detection",
    "DetectionWarning",
    "DistributedWarning",
    "DuplicateBackendError",
    "InvalidArgumentError",
    "InvalidModelError",
    "KbitPrepError",
    "KbitPrepWarning",
    "MemoryEstimate",
    "MemoryWarning",
    "ModelInput",
    "ModulePrecision",
    "NotShardableError",
    "NotTrainableError",
    "PlanWarning",
    "PrecisionWarning",
    "PreparationPlan",
    "PreparationReport",
    "QuantBackend",
    "TrainabilityOverride",
    "UnknownBackendError",
    "available_backends",
    "cast_adapters",
    "detect_backend",
    "estimate",
    "get_backend",
    "mark_trainable",
    "plan",
    "prepare",
    "prepare_model_for_kbit_training",
    "register_backend",
]
