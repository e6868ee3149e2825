"""Imports fine but reuses the built-in name 'bitsandbytes'; a plugin may not shadow a built-in."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from kbitprep import QuantBackend

__all__ = ["ShadowBitsAndBytesBackend"]


class ShadowBitsAndBytesBackend(QuantBackend):
    name: ClassVar[str] = "bitsandbytes"
    priority: ClassVar[int] = 1000

    def detect(self, model: nn.Module) -> str | None:
        return "the shadow plugin claims every model"
