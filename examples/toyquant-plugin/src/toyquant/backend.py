"""The kbitprep strategy for toyquant models, registered through the ``kbitprep.backends``
entry point in pyproject.toml."""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

from torch import nn

from kbitprep import QuantBackend
from kbitprep.backends.base import modules_of_type
from toyquant.layer import ToyQuantLinear

__all__ = ["ToyQuantBackend"]


class ToyQuantBackend(QuantBackend):
    """Strategy for models quantized with :func:`toyquant.quantize`.

    - detection: ``model.quantization_method == "toyquant"`` (:attr:`quant_methods`), else the
      ``ToyQuantLinear`` layers themselves (:meth:`find_layers`), by the default ``detect``;
    - storage: ``ToyQuantLinear.weight`` (int8) and ``ToyQuantLinear.scale`` (floating, but part
      of the quantized weight), never cast and never trainable (:attr:`storage_names`);
    - upcast under ``upcast="auto"``: nothing, because the layer computes in its own
      ``compute_dtype`` (norms and embeddings stay as loaded);
    - input dtype: the layer casts its input itself, so no input casts are needed (no
      ``input_dtype_attr``);
    - checkpointing: wanted (the default).
    """

    name: ClassVar[str] = "toyquant"
    priority: ClassVar[int] = 0
    install_hint: ClassVar[str] = "pip install kbitprep-toyquant"
    quant_methods: ClassVar[frozenset[str]] = frozenset({"toyquant"})
    storage_names: ClassVar[frozenset[str]] = frozenset({"weight", "scale"})

    def find_layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        return modules_of_type(model, (ToyQuantLinear,))

    def should_upcast(self, name: str, param: nn.Parameter, module: nn.Module) -> bool:
        return False

    def shardable(self, model: nn.Module) -> tuple[bool, str]:
        return False, "toyquant stores int8 weights, which FSDP cannot flatten with float parameters"
