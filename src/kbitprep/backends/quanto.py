"""quanto: optimum-quanto's quantized modules (``QLinear``, ``QConv2d``, ``QLayerNorm``).

A frozen quanto layer keeps its weight as a tensor subclass registered as the ``weight``
parameter: ``WeightQBytesTensor`` for 8-bit codes (``_data`` int8 or float8_e4m3fn
``(out, in)``, ``_scale`` ``(out, 1)``) and ``WeightQBitsTensor`` for 2/4-bit codes (``_data``
a uint8 ``PackedTensor`` holding two or four codes per byte, ``_scale`` and ``_shift``
``(out, groups)``). Both *report* the dtype of their scale (bf16 or fp32, the dtype the model was
loaded in), which is the dtype the layer computes in; the layer fails on an input of any other
dtype (``expected m1 and m2 to have the same dtype``, optimum-quanto 0.2.7 on CPU). Each layer
also has float ``input_scale`` / ``output_scale`` buffers (1.0 until calibrated).

Before ``optimum.quanto.freeze`` the same layers hold a plain float ``weight`` and quantize it at
every forward (quantization-aware training); that weight is an ordinary parameter.

Gradients reach the input through quanto's quantized matmul and, with activation quantization,
through its straight-through rounding (measured here: LoRA on ``q_proj``/``v_proj`` gets 8/8
gradients for int8/int4/int2/float8 weights, with and without int8/float8 activations).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import ClassVar

import torch
from torch import nn

from kbitprep.backends.base import (
    MethodFacts,
    QuantBackend,
    is_wrapper_subclass,
    loaded_module,
    modules_of_type,
    most_common_dtype,
)

__all__ = ["QuantoBackend"]


def _module_classes() -> tuple[type, ...]:
    """quanto's layer mixin ``optimum.quanto.nn.qmodule.QModuleMixin`` (shared by ``QLinear``,
    ``QConv2d``, ``QLayerNorm``), if quanto has been imported; nothing is imported here."""
    mod = loaded_module("optimum.quanto.nn.qmodule")
    cls = getattr(mod, "QModuleMixin", None) if mod is not None else None
    return (cls,) if isinstance(cls, type) else ()


def _qtensor_classes() -> tuple[type, ...]:
    """quanto's tensor base ``optimum.quanto.tensor.qtensor.QTensor``, if imported."""
    mod = loaded_module("optimum.quanto.tensor.qtensor")
    cls = getattr(mod, "QTensor", None) if mod is not None else None
    return (cls,) if isinstance(cls, type) else ()


def _weight(module: nn.Module) -> torch.Tensor | None:
    weight = module._parameters.get("weight")
    return weight if isinstance(weight, torch.Tensor) else None


def _is_frozen(module: nn.Module) -> bool:
    """Whether a quanto layer's weight is stored quantized (``freeze`` ran), read from its type."""
    weight = _weight(module)
    classes = _qtensor_classes()
    return weight is not None and ((bool(classes) and isinstance(weight, classes)) or is_wrapper_subclass(weight))


class QuantoBackend(QuantBackend):
    """Strategy for optimum-quanto models, loaded through transformers (``QuantoConfig``,
    weights int2/int4/int8/float8) or quantized with quanto's own ``quantize`` / ``freeze``.

    Nothing is upcast under ``upcast="auto"``: a quanto layer computes in the dtype its weight
    reports and refuses fp32 activations in a bf16 model, so peft's fp32 upcast of the norms
    breaks the forward (and peft's cast of the weight itself fails in quanto with "The dtype of
    a weights Tensor cannot be changed", peft 0.21.2 on bf16). The quantized weights are tensor
    subclasses and therefore storage under the base rule; they are never cast or trained. When
    the caller upcasts anyway, each quanto layer's inputs are cast to its weight's dtype.
    """

    name: ClassVar[str] = "quanto"
    priority: ClassVar[int] = 0
    install_hint: ClassVar[str] = "pip install optimum-quanto"
    requires: ClassVar[tuple[str, ...]] = ("optimum.quanto",)
    quant_methods: ClassVar[frozenset[str]] = frozenset({"quanto"})
    method_facts: ClassVar[Mapping[str, MethodFacts]] = {
        "quanto": MethodFacts(
            "WeightQBytesTensor (int8/float8) and WeightQBitsTensor (packed int2/int4) weight subclasses",
            "yes (int2/int4/int8/float8, bf16 and fp32, with or without quantized activations)",
        )
    }

    input_dtype_attr: ClassVar[str] = "weight"
    """A quanto layer's weight reports its scale's dtype (bf16 or fp32), which its input must have."""
    layer_label: ClassVar[str] = "quanto {cls}"

    def find_layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """quanto's layers (``QModuleMixin``: ``QLinear``, ``QConv2d``, ``QLayerNorm``), frozen or not."""
        return modules_of_type(model, _module_classes())

    def compute_dtype(self, model: nn.Module) -> torch.dtype | None:
        """The dtype most quanto layers compute in (see :attr:`input_dtype_attr`; transformers
        ``QuantoConfig`` loads give every layer the load dtype), or ``None`` without layers."""
        return most_common_dtype(self.input_dtype(m) for _n, m in self.find_layers(model))

    def plan_warnings(self, model: nn.Module) -> list[str]:
        layers = list(self.find_layers(model))
        out: list[str] = []
        unfrozen = [n for n, m in layers if not _is_frozen(m)]
        if unfrozen:
            out.append(
                f"{len(unfrozen)} of {len(layers)} quanto layers (first: {unfrozen[0]!r}) are not frozen: "
                "their weights are ordinary floats that quanto quantizes at every forward, so they "
                "use the memory of the unquantized model. Call optimum.quanto.freeze(model) before "
                "prepare to store them quantized."
            )
        evidence = self.flagged_without_layers(model)
        if evidence is not None:
            out.append(
                f"The model is flagged quanto ({evidence}) but holds no quanto layer: its "
                "linears are plain. Check that optimum-quanto is installed and the load report."
            )
        return out
