"""Fallback for a model quantized by a method no strategy claims: freeze and checkpoint only."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from kbitprep.backends.base import QuantBackend, config_quant_method, legacy_quant_method

__all__ = ["GenericBackend"]


def _method(model: nn.Module) -> tuple[str, str] | None:
    evidence = config_quant_method(model) or legacy_quant_method(model)
    if evidence is not None:
        return evidence
    if getattr(model, "is_quantized", False) is True:
        return "unknown", "model.is_quantized is True"
    return None


class GenericBackend(QuantBackend):
    """Strategy for a quantization method kbitprep has no strategy for (e.g. quanto).

    Parameters are frozen and checkpointing is wired, but nothing is cast: an unknown kernel may
    own its compute dtype, and an upcast could break it. A plan warning names the method.
    """

    name: ClassVar[str] = "generic"
    priority: ClassVar[int] = -100
    fallback: ClassVar[bool] = True

    def detect(self, model: nn.Module) -> str | None:
        evidence = _method(model)
        if evidence is None:
            return None
        return f"{evidence[1]}, a quantization method no kbitprep strategy claims"

    def plan_warnings(self, model: nn.Module) -> list[str]:
        evidence = _method(model)
        method = evidence[0] if evidence else "unknown"
        return [
            f"The model is quantized by {method!r}, which no kbitprep backend knows: parameters are "
            "frozen and checkpointing is wired, but nothing is upcast. If adapters do not train, "
            "write a backend plugin for it (see 'Writing a backend plugin')."
        ]
