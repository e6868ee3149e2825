"""Backend classes that import fine but break the QuantBackend contract.

Each is named by an entry point of this distribution; the registry must list every one as
``broken: <reason>`` and never let detection skip it silently.
"""

from __future__ import annotations

import abc
from typing import ClassVar

from torch import nn

from kbitprep import QuantBackend

__all__ = [
    "AbstractBackend",
    "DetectNotCallableBackend",
    "InitRaisesBackend",
    "NoDetectBackend",
    "WrongDetectSignatureBackend",
]


class NoDetectBackend(QuantBackend):
    """Never defines ``detect``."""

    name: ClassVar[str] = "nodetectquant"


class AbstractBackend(QuantBackend):
    """Defines ``detect`` but adds an abstract method of its own, so it cannot be instantiated."""

    name: ClassVar[str] = "abstractquant"

    def detect(self, model: nn.Module) -> str | None:
        return None

    @abc.abstractmethod
    def kernel(self) -> str:
        """Left to a subclass that this distribution never registers."""


class InitRaisesBackend(QuantBackend):
    """Its ``__init__`` fails, as one that probes for a GPU at construction does."""

    name: ClassVar[str] = "initraisesquant"

    def __init__(self) -> None:
        raise RuntimeError("initraisesquant needs a CUDA device to start")

    def detect(self, model: nn.Module) -> str | None:
        return None


class DetectNotCallableBackend(QuantBackend):
    """``detect`` is an attribute, not a method."""

    name: ClassVar[str] = "detectnotcallablequant"
    detect = None  # type: ignore[assignment]


class WrongDetectSignatureBackend(QuantBackend):
    """``detect`` takes no model, so kbitprep's ``detect(model)`` call would fail."""

    name: ClassVar[str] = "wrongsignaturequant"

    def detect(self) -> str | None:  # type: ignore[override]
        return None
