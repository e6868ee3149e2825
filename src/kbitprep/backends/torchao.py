"""torchao weight-only quantization (``Int8WeightOnlyConfig``, ``IntxWeightOnlyConfig``, ...)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import ClassVar

import torch
from torch import nn

from kbitprep._errors import NotTrainableError
from kbitprep.backends.base import (
    MethodFacts,
    QuantBackend,
    detect_in_tiers,
    found_reason,
    is_wrapper_subclass,
    loaded_module,
)

__all__ = ["TorchAoBackend"]


def _quantized_weights(model: nn.Module) -> Iterator[tuple[str, nn.Module, torch.Tensor]]:
    torchao_utils = loaded_module("torchao.utils")
    base = getattr(torchao_utils, "TorchAOBaseTensor", None) if torchao_utils is not None else None
    if base is None:
        return
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if isinstance(param, base):
                yield f"{name}.{pname}" if name else pname, module, param


class TorchAoBackend(QuantBackend):
    """Strategy for torchao tensor-subclass quantization.

    The quantized weights are tensor subclasses (``Int8Tensor``, ``IntxUnpackedToInt8Tensor``)
    that report a float dtype but hold int8 ``qdata`` with scales: they are storage,
    never cast. Nothing is upcast under ``upcast="auto"``. Trainability is decided per layer
    from what carries a gradient: dynamic activation quantization cuts the autograd graph
    (``NotTrainableError``), while intx weight-only trains although transformers 5 marks it
    ``is_trainable=False``.
    """

    name: ClassVar[str] = "torchao"
    priority: ClassVar[int] = 0
    install_hint: ClassVar[str] = "pip install 'kbitprep[torchao]'"
    requires: ClassVar[tuple[str, ...]] = ("torchao",)
    quant_methods: ClassVar[frozenset[str]] = frozenset({"torchao"})
    method_facts: ClassVar[Mapping[str, MethodFacts]] = {
        "torchao": MethodFacts(
            "tensor subclasses reporting a float dtype (Int8Tensor, IntxUnpackedToInt8Tensor, ...)",
            "per config: int8 weight-only yes; intx int4 weight-only yes (prepared with a warning that "
            "transformers' Trainer refuses it unless kbitprep.mark_trainable is applied); dynamic activation no",
        )
    }

    def detect(self, model: nn.Module) -> str | None:
        """The quantizer, config or legacy attributes, else the torchao tensors the layers hold,
        counted by class (``"found 14 torchao Int8Tensor weights"``): ``quantize_`` swaps the
        weights, not the layers, so there is no layer class to find."""

        def weights(m: nn.Module) -> str | None:
            return found_reason((f"torchao {type(w).__name__}" for _n, _m, w in _quantized_weights(m)), noun="weight")

        return detect_in_tiers(model, self.quant_methods, weights)

    def check_trainable(self, model: nn.Module) -> None:
        """Probe each quantized linear functionally with a grad-requiring input (train semantics,
        never an eval or no-grad call) and refuse when its output carries no gradient.

        Raises:
            NotTrainableError: Some weight's matmul cuts the autograd graph, e.g.
                ``Int8DynamicActivationInt8WeightConfig`` (dynamic activation quantization).
        """
        cut: list[str] = []
        dynamic = False
        seen: dict[tuple[type, str], bool] = {}
        for name, _module, weight in _quantized_weights(model):
            if weight.dim() != 2 or not name.endswith("weight"):
                continue
            act = getattr(weight, "act_quant_kwargs", None) or getattr(weight, "activation_quantization", None)
            key = (type(weight), repr(act))
            if key not in seen:
                x = torch.zeros(1, weight.shape[1], dtype=weight.dtype, device=weight.device, requires_grad=True)
                with torch.enable_grad():
                    try:
                        y = torch.nn.functional.linear(x, weight)
                        seen[key] = y.grad_fn is not None
                    except Exception:  # a kernel that cannot run here is not our verdict to make
                        seen[key] = True
            if not seen[key]:
                cut.append(name)
                dynamic = dynamic or act is not None
        if cut:
            what = (
                "dynamic activation quantization (Int8DynamicActivationInt8WeightConfig or similar)"
                if dynamic
                else "its torchao quantized matmul"
            )
            raise NotTrainableError(
                f"{len(cut)} torchao layer(s) (first: {cut[0]!r}) cut the autograd graph through "
                f"{what}: their output has no grad_fn even when the input requires grad, so adapters "
                "before them would silently get no gradient. Quantize with a weight-only config "
                "instead, e.g. Int8WeightOnlyConfig() or IntxWeightOnlyConfig(weight_dtype=torch.int4)."
            )

    def input_dtype(self, module: nn.Module) -> torch.dtype | None:
        weight = getattr(module, "_parameters", {}).get("weight")
        if weight is not None and is_wrapper_subclass(weight):
            dtype: torch.dtype = weight.dtype
            return dtype
        return None

    def plan_warnings(self, model: nn.Module) -> list[str]:
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None and getattr(quantizer, "is_trainable", True) is False:
            return [
                f"transformers marks this torchao config non-trainable ({type(quantizer).__name__}."
                "is_trainable is False), but its layers pass gradients, so kbitprep prepares it; "
                "transformers' Trainer will still refuse it unless you opt in with "
                "kbitprep.mark_trainable(model) (docs/trainer.md)."
            ]
        return []
