"""The demo's errors: a setup problem (exit code 2) and a failed training check (exit code 1)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kbitprep._errors import KbitPrepError

if TYPE_CHECKING:
    from kbitprep.demo._result import DemoResult

__all__ = ["DemoSetupError", "TrainingCheckError"]


class DemoSetupError(KbitPrepError):
    """The demo cannot start: the model is missing, or an option does not fit the data."""


class TrainingCheckError(KbitPrepError):
    """Training ran but failed a check: a LoRA parameter got no gradient, or a loss is not finite.

    Attributes:
        result: What was measured up to the failure (``loss_after`` may be None).
    """

    def __init__(self, message: str, result: DemoResult) -> None:
        super().__init__(message)
        self.result = result
