"""HQQ: half-quadratic quantization (``hqq.core.quantize.HQQLinear``, hqq 0.2.8).

An ``HQQLinear`` holds one parameter, ``W_q``: the packed weight, uint8 of shape ``(out/2, in)``
for 4 bits with ``requires_grad=False``. Its scale and zero are neither parameters nor buffers;
they live in the ``module.meta`` dict. In hqq 0.2.8 the layer has no ``.weight`` at all (reading it
raises ``AttributeError``), so nothing here ever reads it. The layer computes in
``module.compute_dtype`` and requires its input in that dtype.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from typing import ClassVar

import torch
from torch import nn

from kbitprep.backends.base import (
    MethodFacts,
    QuantBackend,
    loaded_module,
    modules_of_type,
)

__all__ = ["HqqBackend"]


def _layer_classes() -> tuple[type, ...]:
    mod = loaded_module("hqq.core.quantize")
    cls = getattr(mod, "HQQLinear", None) if mod is not None else None
    return (cls,) if isinstance(cls, type) else ()


def _compute_dtype(module: nn.Module) -> torch.dtype | None:
    dtype = vars(module).get("compute_dtype")
    return dtype if isinstance(dtype, torch.dtype) else None


class HqqBackend(QuantBackend):
    """Strategy for HQQ models, however they were built (hqq's own wrapper, transformers 4.57's
    ``HqqConfig``, or ``HQQLinear`` swapped in by hand).

    Nothing is ever upcast under ``upcast="auto"``: ``HQQLinear`` multiplies its input by the
    dequantized weight in ``compute_dtype`` and fails on any other input dtype. When the
    caller upcasts anyway, each layer's inputs are cast to its compute dtype.

    Two mismatches are reported in ``plan.warnings`` before a forward can fail: a model flagged
    hqq that holds no ``HQQLinear`` (transformers 5.24 loads a 4.57 HQQ checkpoint as plain,
    randomly initialised ``nn.Linear`` while ``quantization_method`` still says hqq), and layers
    whose compute dtype differs from the model's other float parameters (transformers 4.57 built
    fp32 HQQ layers inside bf16 models).
    """

    name: ClassVar[str] = "hqq"
    priority: ClassVar[int] = 0
    install_hint: ClassVar[str] = "pip install 'kbitprep[hqq]'"
    requires: ClassVar[tuple[str, ...]] = ("hqq",)
    quant_methods: ClassVar[frozenset[str]] = frozenset({"hqq"})
    method_facts: ClassVar[Mapping[str, MethodFacts]] = {
        "hqq": MethodFacts(
            "W_q uint8 (scale and zero in module.meta)",
            "yes",
            "transformers 5.24 cannot load HqqConfig models; tested with HQQLinear built directly",
        )
    }

    storage_names: ClassVar[frozenset[str]] = frozenset({"W_q"})
    """An ``HQQLinear``'s one parameter, the packed weight (hqq 0.2.8), whatever its dtype."""
    input_dtype_attr: ClassVar[str] = "compute_dtype"
    """The ``torch.dtype`` an ``HQQLinear`` computes in, which its input must have."""
    layer_label: ClassVar[str] = "HQQLinear"

    def find_layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """hqq's ``HQQLinear``."""
        return modules_of_type(model, _layer_classes())

    def plan_warnings(self, model: nn.Module) -> list[str]:
        out: list[str] = []
        layers = list(self.find_layers(model))
        if not layers:
            evidence = self.flagged_without_layers(model)
            if evidence is not None:
                out.append(
                    f"The model is flagged HQQ ({evidence}) but holds no HQQLinear module: its "
                    "linears are plain nn.Linear, probably randomly initialised (transformers 5 "
                    "cannot load HQQ checkpoints and reports their W_q keys as UNEXPECTED). "
                    "Quantize with HQQLinear directly, or load with transformers<5."
                )
            return out
        layer_ids = {id(m) for _n, m in layers}
        modules = dict(model.named_modules())
        float_elems: Counter[torch.dtype] = Counter()
        for pname, param in model.named_parameters():
            owner = modules.get(pname.rpartition(".")[0])
            if id(owner) in layer_ids or not param.is_floating_point():
                continue
            float_elems[param.dtype] += param.numel()
        if not float_elems:
            return out
        surrounding = float_elems.most_common(1)[0][0]
        odd = Counter(str(dt) for _n, m in layers if (dt := _compute_dtype(m)) is not None and dt != surrounding)
        if odd:
            first = next(n for n, m in layers if _compute_dtype(m) not in (None, surrounding))
            dtypes = ", ".join(f"{n} with {d}" for d, n in sorted(odd.items()))
            out.append(
                f"HQQLinear layers compute in another dtype than the model's float parameters "
                f"({surrounding}): {dtypes} (first: {first!r}). kbitprep casts their inputs to their "
                "compute dtype, so activations change dtype at every such layer; re-quantize with "
                f"compute_dtype={surrounding} to avoid the extra casts."
            )
        return out
