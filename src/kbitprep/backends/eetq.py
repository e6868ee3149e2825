"""EETQ: int8 weight-only quantization with fp16 activations (``w8_a16_gemm``).

transformers 5.24 no longer uses the ``eetq`` pip package: it swaps in its own
``transformers.integrations.eetq.EetqLinear`` and runs it with the hub kernel
``kernels-community/quantization-eetq`` (CUDA only). That layer holds ``weight``, an int8
``nn.Parameter`` of shape ``(in, out)``, and ``weight_scales``, an fp16 ``nn.Parameter`` of shape
``(out,)`` that loads with ``requires_grad=True``. Both are storage here. The older ``eetq``
package's own ``EetqLinear`` (transformers 4) is recognised too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from kbitprep.backends.base import MethodFacts, QuantBackend, detect_in_tiers, layer_counter, loaded_module

__all__ = ["EetqBackend"]

STORAGE_NAMES = frozenset({"weight", "weight_scales"})
"""Names of an EETQ layer's quantized tensors (int8 weight and its per-column fp16 scales)."""


def _layer_classes() -> tuple[type, ...]:
    classes: list[type] = []
    for mod_name in ("transformers.integrations.eetq", "eetq"):
        mod = loaded_module(mod_name)
        cls = getattr(mod, "EetqLinear", None) if mod is not None else None
        if isinstance(cls, type) and issubclass(cls, nn.Module) and cls not in classes:
            classes.append(cls)
    return tuple(classes)


class EetqBackend(QuantBackend):
    """Strategy for EETQ int8 models (transformers' ``EetqLinear``).

    Nothing is upcast under ``upcast="auto"``: the kernel multiplies fp16 activations by the
    int8 weight (``w8_a16_gemm``), so an fp32 upcast of the norms would feed it the wrong dtype.
    When the caller upcasts anyway, the layer's inputs are cast back to its scales' dtype.
    """

    name: ClassVar[str] = "eetq"
    priority: ClassVar[int] = 0
    install_hint: ClassVar[str] = "pip install 'kbitprep[eetq]'"
    requires: ClassVar[tuple[str, ...]] = ("transformers",)
    quant_methods: ClassVar[frozenset[str]] = frozenset({"eetq"})
    method_facts: ClassVar[Mapping[str, MethodFacts]] = {
        "eetq": MethodFacts(
            "weight int8 and weight_scales fp16",
            "yes",
            "the CPU test stands in a pure-torch kernel: transformers fetches the real one from the hub and needs CUDA",
        )
    }

    def detect(self, model: nn.Module) -> str | None:
        return detect_in_tiers(model, self.quant_methods, layer_counter(_layer_classes, "EetqLinear"))

    def is_quantized_param(self, name: str, param: nn.Parameter, module: nn.Module) -> bool:
        """``weight`` (int8) and ``weight_scales`` (fp16) of an ``EetqLinear``; a layer's ``bias``
        is not storage. Elsewhere the default (integer dtype or tensor subclass)."""
        classes = _layer_classes()
        if classes and isinstance(module, classes) and name.rpartition(".")[2] in STORAGE_NAMES:
            return True
        return super().is_quantized_param(name, param, module)

    def input_dtype(self, module: nn.Module) -> torch.dtype | None:
        """The dtype of an ``EetqLinear``'s ``weight_scales`` (fp16): its activation dtype."""
        classes = _layer_classes()
        if classes and isinstance(module, classes):
            scales = getattr(module, "weight_scales", None)
            if isinstance(scales, torch.Tensor) and scales.is_floating_point():
                return scales.dtype
        return None
