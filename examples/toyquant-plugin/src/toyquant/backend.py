"""The kbitprep strategy for toyquant models, registered through the ``kbitprep.backends``
entry point in pyproject.toml."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from kbitprep import QuantBackend
from kbitprep.backends.base import count_reason, detect_in_tiers, modules_of_type
from toyquant.layer import ToyQuantLinear

__all__ = ["ToyQuantBackend"]


class ToyQuantBackend(QuantBackend):
    """Strategy for models quantized with :func:`toyquant.quantize`.

    - storage: ``ToyQuantLinear.weight`` (int8) and ``ToyQuantLinear.scale`` (floating, but part
      of the quantized weight), never cast and never trainable;
    - upcast under ``upcast="auto"``: nothing, because the layer computes in its own
      ``compute_dtype`` (norms and embeddings stay as loaded);
    - input dtype: the layer casts its input itself, so no input casts are needed;
    - checkpointing: wanted (the default).
    """

    name: ClassVar[str] = "toyquant"
    priority: ClassVar[int] = 0
    install_hint: ClassVar[str] = "pip install kbitprep-toyquant"

    def detect(self, model: nn.Module) -> str | None:
        def layers(m: nn.Module) -> str | None:
            n = sum(1 for _ in modules_of_type(m, (ToyQuantLinear,)))
            return count_reason(n, "ToyQuantLinear") if n else None

        return detect_in_tiers(model, frozenset({"toyquant"}), layers)

    def is_quantized_param(self, name: str, param: nn.Parameter, module: nn.Module) -> bool:
        if isinstance(module, ToyQuantLinear) and name.rsplit(".", 1)[-1] in ("weight", "scale"):
            return True
        return super().is_quantized_param(name, param, module)

    def should_upcast(self, name: str, param: nn.Parameter, module: nn.Module) -> bool:
        return False

    def input_dtype(self, module: nn.Module) -> torch.dtype | None:
        return None  # ToyQuantLinear casts its input to compute_dtype itself

    def shardable(self, model: nn.Module) -> tuple[bool, str]:
        return False, "toyquant stores int8 weights, which FSDP cannot flatten with float parameters"
