"""Test fixture: a well-behaved kbitprep backend plugin (entry point group ``kbitprep.backends``).

It claims a model whose ``config.quantization_config`` is the dict ``{"quant_method": "goodquant"}``
or that carries ``goodquant_marker = True``; it imports nothing but kbitprep and torch.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from kbitprep import QuantBackend

__all__ = ["GoodQuantBackend"]


class GoodQuantBackend(QuantBackend):
    """Claims 'goodquant' models; upcasts nothing, wants checkpointing (the defaults)."""

    name: ClassVar[str] = "goodquant"
    priority: ClassVar[int] = 5

    def detect(self, model: nn.Module) -> str | None:
        if getattr(model, "goodquant_marker", False) is True:
            return "model.goodquant_marker is True"
        qc = getattr(getattr(model, "config", None), "quantization_config", None)
        if isinstance(qc, dict) and qc.get("quant_method") == "goodquant":
            return "config.quantization_config['quant_method'] is 'goodquant'"
        return None
