"""toyquant: a toy int8 weight-only quantization, and the kbitprep backend that prepares it."""

from __future__ import annotations

from toyquant.layer import ToyQuantLinear, quantize

__all__ = ["ToyQuantLinear", "quantize"]
