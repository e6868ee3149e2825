"""Predict the peak memory of a QLoRA training step from a config.

:func:`estimate` traces one training step of a meta-device copy of the model with a live-storage
tracker; :func:`measure_step` measures a real step the same way (used by the tests and the
benchmark to check the prediction).
"""

from __future__ import annotations

from kbitprep._estimate._api import estimate, measure_step
from kbitprep._estimate._result import MemoryEstimate, format_bytes

__all__ = ["MemoryEstimate", "estimate", "format_bytes", "measure_step"]
