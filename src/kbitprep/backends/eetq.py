"""EETQ: int8 weight-only quantization with fp16 activations (``w8_a16_gemm``).

transformers 5.24 no longer uses the ``eetq`` pip package: it swaps in its own
``transformers.integrations.eetq.EetqLinear`` and runs it with the hub kernel
``kernels-community/quantization-eetq`` (CUDA only). That layer holds ``weight``, an int8
``nn.Parameter`` of shape ``(in, out)``, and ``weight_scales``, an fp16 ``nn.Parameter`` of shape
``(out,)`` that loads with ``requires_grad=True``. Both are storage here. The older ``eetq``
package's own ``EetqLinear`` (transformers 4) is recognised too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import ClassVar

from torch import nn

from kbitprep.backends.base import MethodFacts, QuantBackend, loaded_module, modules_of_type

__all__ = ["EetqBackend"]


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

    storage_names: ClassVar[frozenset[str]] = frozenset({"weight", "weight_scales"})
    """An ``EetqLinear``'s int8 ``weight`` and its per-column fp16 ``weight_scales``; its ``bias``
    is not storage."""
    input_dtype_attr: ClassVar[str] = "weight_scales"
    """fp16: the activation dtype of ``w8_a16_gemm``."""
    layer_label: ClassVar[str] = "EetqLinear"

    def find_layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """transformers' ``EetqLinear`` and the older ``eetq`` package's."""
        return modules_of_type(model, _layer_classes())
