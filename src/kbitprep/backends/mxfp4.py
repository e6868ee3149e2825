"""MXFP4: gpt-oss's packed FP4 experts (transformers 5.24 ``Mxfp4Config``,
``transformers.integrations.mxfp4.Mxfp4GptOssExperts``).

Only the MoE experts are quantized. Built, an ``Mxfp4GptOssExperts`` registers ``gate_up_proj``
``(experts, 2·intermediate, hidden/2)`` and ``down_proj`` ``(experts, hidden, intermediate/2)``
as uint8 parameters (two FP4 values per byte) next to fp32 biases. Loaded on a GPU, transformers
swizzles them for triton_kernels: each is removed from ``_parameters`` and set as a
``triton_kernels`` ``Tensor`` (not a ``torch.Tensor``), and its e8m0 block scales move into
``<proj>_precision_config``. That storage is invisible to ``named_parameters``, so the default
storage count would call such a model unquantized; :meth:`Mxfp4Backend.find_storage` reads the
experts themselves.

The experts compute with triton_kernels ``matmul_ogs``, a plain function that launches Triton
kernels into ``torch.empty`` outputs (no ``torch.autograd.Function``): nothing that passes
through the experts carries a gradient, and transformers' ``Mxfp4HfQuantizer.is_trainable`` is
False. Without CUDA, triton and the hub kernels, transformers loads an MXFP4 checkpoint
dequantized to bf16 (plain ``GptOssExperts``), which is an unquantized model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import ClassVar

import torch
from torch import nn

from kbitprep._errors import NotTrainableError
from kbitprep.backends.base import (
    MethodFacts,
    QuantBackend,
    is_storage_dtype,
    loaded_module,
    modules_of_type,
)

__all__ = ["Mxfp4Backend"]

PROJECTIONS = ("gate_up_proj", "down_proj")
"""The packed expert weights of ``Mxfp4GptOssExperts`` (transformers 5.24)."""


def _expert_classes() -> tuple[type, ...]:
    mod = loaded_module("transformers.integrations.mxfp4")
    cls = getattr(mod, "Mxfp4GptOssExperts", None) if mod is not None else None
    return (cls,) if isinstance(cls, type) else ()


def _packed_projections(module: nn.Module) -> list[str]:
    """The projections of an experts module held as MXFP4 storage: a uint8 (or other storage
    dtype) parameter, or a non-torch triton_kernels tensor with its precision config."""
    out = []
    for proj in PROJECTIONS:
        param = module._parameters.get(proj)
        if isinstance(param, torch.Tensor):
            if is_storage_dtype(param.dtype):
                out.append(proj)
            continue
        value = vars(module).get(proj)
        swizzled = value is not None and not isinstance(value, torch.Tensor)
        if swizzled or vars(module).get(f"{proj}_precision_config") is not None:
            out.append(proj)
    return out


def _packed_experts(model: nn.Module) -> list[str]:
    return [n for n, m in modules_of_type(model, _expert_classes()) if _packed_projections(m)]


class Mxfp4Backend(QuantBackend):
    """Strategy for gpt-oss MXFP4 models: packed FP4 experts are refused with the reason; a model
    loaded with ``Mxfp4Config(dequantize=True)`` holds no MXFP4 storage and is ``none``.
    """

    name: ClassVar[str] = "mxfp4"
    priority: ClassVar[int] = 0
    install_hint: ClassVar[str] = "pip install 'kbitprep[transformers]' triton kernels"
    requires: ClassVar[tuple[str, ...]] = ("transformers",)
    quant_methods: ClassVar[frozenset[str]] = frozenset({"mxfp4"})
    method_facts: ClassVar[Mapping[str, MethodFacts]] = {
        "mxfp4": MethodFacts(
            "gpt-oss experts: packed FP4 uint8 (triton_kernels tensors on a GPU)",
            "no: refused (matmul_ogs has no backward); Mxfp4Config(dequantize=True) is none and trains",
            "MXFP4 layers built directly: on a CPU without triton transformers loads MXFP4 dequantized",
        )
    }

    layer_label: ClassVar[str] = "Mxfp4GptOssExperts"

    def find_layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """transformers' ``Mxfp4GptOssExperts``, packed or not (see :meth:`find_storage`)."""
        return modules_of_type(model, _expert_classes())

    def find_storage(self, model: nn.Module) -> str | None:
        """Experts holding packed FP4 weights, whether still uint8 parameters or swizzled into
        triton_kernels tensors (which no parameter listing shows); else the base count."""
        packed = _packed_experts(model)
        if packed:
            return (
                f"{len(packed)} Mxfp4GptOssExperts module{'s' if len(packed) != 1 else ''} holding packed FP4 weights"
            )
        return super().find_storage(model)

    def check_trainable(self, model: nn.Module) -> None:
        """Refuse experts that hold MXFP4 storage.

        Raises:
            NotTrainableError: At least one ``Mxfp4GptOssExperts`` holds packed FP4 weights; its
                ``matmul_ogs`` forward records no autograd graph (triton_kernels), so every
                gradient through the MoE blocks is lost. The message counts them and names
                ``Mxfp4Config(dequantize=True)``.
        """
        packed = _packed_experts(model)
        if packed:
            raise NotTrainableError(
                f"{len(packed)} gpt-oss expert modules (first: {packed[0]!r}) hold packed MXFP4 weights. "
                "They compute with triton_kernels matmul_ogs, which records no autograd graph, so no "
                "gradient passes through the MoE blocks and adapters anywhere before them would train on "
                "a wrong gradient (transformers' Mxfp4HfQuantizer.is_trainable is False for the same "
                "reason). Load the checkpoint with quantization_config=Mxfp4Config(dequantize=True): "
                "the experts are then bf16 and kbitprep prepares the model as unquantized."
            )
        super().check_trainable(model)
