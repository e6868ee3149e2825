"""AWQ: activation-aware 4-bit weights, served by gptqmodel on transformers 5 and by autoawq
(``WQLinear_*``) on transformers 4.

An AWQ GEMM layer keeps its weight in buffers: ``qweight`` int32 ``(in, out·bits/32)`` (eight
4-bit codes per int32, AWQ's interleaved order), ``qzeros`` int32 ``(in/group, out·bits/32)`` and
``scales`` fp16/bf16 ``(in/group, out)`` (gptqmodel 7.6.0 ``AWQuantLinear``; the same names in
autoawq 0.2). The layer dequantizes into its input's dtype (``TorchAtenAwqLinear``) or the
``scales`` dtype, so nothing is upcast under ``upcast="auto"``, as for GPTQ.

gptqmodel's CPU kernels ``TorchAtenAwqLinear`` and ``TorchFusedAwqLinear`` choose a mode on their
first forward, exactly like the GPTQ kernels: an eval-mode forward whose input does
not require grad repacks the weight for ``aten._weight_int4pack_mm_for_cpu`` under
``torch.no_grad`` and sets ``linear_mode="inference"`` for good; any other first forward sets
``"train"``. ``AwqTorchLinear`` (``AwqConfig(backend="torch_awq")``) has no such mode.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from typing import ClassVar

import torch
from torch import nn

from kbitprep._errors import NotTrainableError
from kbitprep.backends._gptqmodel import base_classes, latched_layers, pin_train_mode
from kbitprep.backends.base import (
    MethodFacts,
    QuantBackend,
    UndoFn,
    modules_of_type,
    most_common_dtype,
)

__all__ = ["AwqBackend"]


def _supports_awq(cls: type) -> bool:
    methods = getattr(cls, "SUPPORTS_METHODS", None) or ()
    return any(str(getattr(m, "value", m)).lower() == "awq" for m in methods)


def _autoawq_classes() -> tuple[type, ...]:
    """autoawq's ``WQLinear*`` classes of the ``awq.modules.linear.*`` modules already imported."""
    classes: list[type] = []
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("awq.modules.linear") and mod is not None:
            classes.extend(v for k, v in vars(mod).items() if k.startswith("WQLinear") and isinstance(v, type))
    return tuple(classes)


class AwqBackend(QuantBackend):
    """Strategy for AWQ models (transformers ``AwqConfig``: gptqmodel on transformers 5,
    autoawq on transformers 4; auto-round's ``auto_awq`` export is one of them).

    Nothing is upcast under ``upcast="auto"`` and the quantized buffers are never touched. The
    kernel-mode latch of gptqmodel's CPU AWQ kernels is guarded as for GPTQ:
    :meth:`before_training` pins every layer that has not chosen a mode to ``"train"``, and
    :meth:`check_trainable` refuses layers an earlier eval forward already latched.
    """

    name: ClassVar[str] = "awq"
    priority: ClassVar[int] = 0
    install_hint: ClassVar[str] = "pip install 'kbitprep[gptq]'"
    requires: ClassVar[tuple[str, ...]] = ("gptqmodel",)
    quant_methods: ClassVar[frozenset[str]] = frozenset({"awq"})
    method_facts: ClassVar[Mapping[str, MethodFacts]] = {
        "awq": MethodFacts(
            "qweight/qzeros int32 and scales fp16/bf16 buffers (gptqmodel AWQ kernels, autoawq WQLinear)",
            "yes; layers latched by an eval no-grad forward are refused",
            "checkpoint: auto-round 0.16.1 round-to-nearest, exported as auto_awq",
        )
    }

    storage_names: ClassVar[frozenset[str]] = frozenset({"qweight", "qzeros", "scales"})
    """An AWQ layer's quantized tensors (gptqmodel 7.6.0, autoawq 0.2), should a layer register
    them as parameters rather than buffers."""
    input_dtype_attr: ClassVar[str] = "scales"
    """fp16 or bf16: the dtype an AWQ kernel computes in."""
    layer_label: ClassVar[str] = "AWQ {cls}"

    def find_layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """gptqmodel's kernels that serve AWQ (``SUPPORTS_METHODS``) and autoawq's ``WQLinear*``."""
        base, autoawq = base_classes(), _autoawq_classes()
        for name, module in modules_of_type(model, base + autoawq):
            gptqmodel = bool(base) and isinstance(module, base)
            if not gptqmodel or _supports_awq(type(module)):  # an autoawq layer is AWQ by its class
                yield name, module

    def compute_dtype(self, model: nn.Module) -> torch.dtype | None:
        """The ``scales`` dtype most AWQ layers hold (the load dtype), or ``None`` without layers."""
        return most_common_dtype(self.input_dtype(m) for _n, m in self.find_layers(model))

    def check_trainable(self, model: nn.Module) -> None:
        """Refuse a model whose gptqmodel CPU AWQ layers already latched into inference mode.

        Reads ``linear_mode`` from the modules; never runs a forward.

        Raises:
            NotTrainableError: At least one layer has ``linear_mode == "inference"`` (set by an
                eval-mode forward under ``torch.no_grad`` on CPU, gptqmodel 7.6.0); the message
                counts them. Also when the transformers quantizer reports ``is_trainable`` False
                (transformers 5.24 ``AwqQuantizer``: gptqmodel older than 5.0).
        """
        super().check_trainable(model)
        latched, total = latched_layers(self.find_layers(model))
        if latched:
            raise NotTrainableError(
                f"{len(latched)} of {total} AWQ layers (first: {latched[0]!r}) have "
                "linear_mode='inference': an eval-mode forward under torch.no_grad already ran and "
                "gptqmodel repacked their weights for an int4 CPU matmul that has no backward, so "
                "adapters would silently get no gradient. Reload the model and call prepare before "
                'any forward, or load it with AwqConfig(bits=4, backend="torch_awq") '
                "(AwqTorchLinear has no such mode)."
            )

    def before_training(self, model: nn.Module) -> UndoFn | None:
        """Pin every AWQ layer whose ``linear_mode`` is still None to ``"train"``.

        gptqmodel 7.6.0 latches the inference mode only while ``linear_mode is None``, so a later
        eval no-grad forward keeps the layer differentiable. Returns an undo that sets the pinned
        layers back to None.
        """
        return pin_train_mode((m for _n, m in self.find_layers(model)), "AWQ")

    def plan_warnings(self, model: nn.Module) -> list[str]:
        evidence = self.flagged_without_layers(model)
        if evidence is not None:
            return [
                f"The model is flagged AWQ ({evidence}) but holds no AWQ layer: its linears are "
                "probably plain and randomly initialised (the checkpoint's qweight/scales were not "
                "loaded). Check the load report for UNEXPECTED qweight keys."
            ]
        return []
