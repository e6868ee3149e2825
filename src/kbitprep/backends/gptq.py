"""GPTQ: gptqmodel's quantized linears (transformers 5) and auto-gptq's (transformers 4).

A GPTQ layer keeps its quantized weight in buffers, not parameters: ``qweight`` int32
``(in·bits/32, out)``, ``qzeros`` int32 ``(in/group, out·bits/32)``, ``scales`` fp16/bf16
``(in/group, out)`` and ``g_idx`` int32 ``(in,)`` (gptqmodel 7.6.0; the same names in auto-gptq
0.7). Buffers are never frozen or cast by the orchestrator, so the only parameters left are the
model's plain float ones (embeddings, norms, ``lm_head``), which stay in the load dtype.
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
)

__all__ = ["GptqBackend"]


def _supports_gptq(cls: type) -> bool:
    methods = getattr(cls, "SUPPORTS_METHODS", None)
    if methods is None:
        return True
    return any(str(getattr(m, "value", m)).lower() == "gptq" for m in methods)


def _layer_classes() -> tuple[type, ...]:
    """GPTQ layer classes of the libraries already imported (nothing is imported here).

    gptqmodel: ``gptqmodel.nn_modules.qlinear.BaseQuantLinear`` (its AWQ kernels share that
    base, so instances are further filtered by ``SUPPORTS_METHODS`` in
    :meth:`GptqBackend.find_layers`).
    auto-gptq: the ``QuantLinear`` class of each ``auto_gptq.nn_modules.qlinear.qlinear_*`` module.
    """
    classes: list[type] = list(base_classes())
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("auto_gptq.nn_modules.qlinear.") and mod is not None:
            cls = getattr(mod, "QuantLinear", None)
            if isinstance(cls, type):
                classes.append(cls)
    return tuple(classes)


def _has_packed_storage(module: nn.Module) -> bool:
    """A layer holding a packed int32 ``qweight`` and a float ``scales`` tensor (own, not nested)."""
    tensors = {**dict(module.named_buffers(recurse=False)), **dict(module.named_parameters(recurse=False))}
    qweight, scales = tensors.get("qweight"), tensors.get("scales")
    return (
        isinstance(qweight, torch.Tensor)
        and not qweight.is_floating_point()
        and isinstance(scales, torch.Tensor)
        and scales.is_floating_point()
    )


class GptqBackend(QuantBackend):
    """Strategy for GPTQ models (gptqmodel on transformers 5, auto-gptq on transformers 4).

    Nothing is upcast under ``upcast="auto"``: the GPTQ kernels compute in the dtype of their
    ``scales`` (fp16 or bf16), and fp32 activations from upcast norms break them (peft PR
    #771). The quantized tensors are buffers and are never touched.

    gptqmodel's CPU kernels (``TorchAtenLinear``, ``TorchFusedLinear``) choose their mode on the
    first forward and keep it: an eval-mode forward whose input does not require grad repacks
    the weight for an int4 CPU matmul that runs under ``torch.no_grad`` and sets
    ``linear_mode="inference"``; any other first forward sets ``"train"`` (gptqmodel 7.6.0
    ``TorchAtenLinear.forward``). An inference-mode layer drops every gradient through it, so
    adapters before it silently stop training. :meth:`before_training` pins every layer
    that has not chosen yet to ``"train"``; :meth:`check_trainable` refuses layers already latched.
    """

    name: ClassVar[str] = "gptq"
    priority: ClassVar[int] = 0
    install_hint: ClassVar[str] = "pip install 'kbitprep[gptq]'"
    requires: ClassVar[tuple[str, ...]] = ("gptqmodel",)
    quant_methods: ClassVar[frozenset[str]] = frozenset({"gptq"})
    method_facts: ClassVar[Mapping[str, MethodFacts]] = {
        "gptq": MethodFacts(
            "qweight/qzeros/g_idx int32 and scales fp16/bf16 buffers",
            "yes",
            "auto-round's auto_gptq export loads as gptq",
        )
    }

    storage_names: ClassVar[frozenset[str]] = frozenset({"qweight", "qzeros", "scales", "g_idx"})
    """A GPTQ layer's quantized tensors (buffers in gptqmodel 7.6.0 and auto-gptq 0.7), should a
    layer register them as parameters; of any module holding packed storage too (see
    :meth:`is_quantized_param`)."""
    input_dtype_attr: ClassVar[str] = "scales"
    """fp16 or bf16: the dtype a GPTQ kernel computes in."""
    layer_label: ClassVar[str] = "GPTQ {cls}"

    def find_layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """gptqmodel's kernels that serve GPTQ (``SUPPORTS_METHODS``) and auto-gptq's ``QuantLinear``."""
        return ((n, m) for n, m in modules_of_type(model, _layer_classes()) if _supports_gptq(type(m)))

    def is_quantized_param(self, name: str, param: nn.Parameter, module: nn.Module) -> bool:
        """:attr:`storage_names` also on a module of another class that holds a packed int32
        ``qweight`` beside float ``scales``; otherwise the default."""
        if name.rpartition(".")[2] in self.storage_names and _has_packed_storage(module):
            return True
        return super().is_quantized_param(name, param, module)

    def input_dtype(self, module: nn.Module) -> torch.dtype | None:
        """The ``scales`` dtype (:attr:`input_dtype_attr`), also of a module of another class
        that holds packed storage."""
        if _has_packed_storage(module):
            scales = getattr(module, "scales", None)
            return scales.dtype if isinstance(scales, torch.Tensor) and scales.is_floating_point() else None
        return super().input_dtype(module)

    def check_trainable(self, model: nn.Module) -> None:
        """Refuse a model whose gptqmodel CPU layers already latched into inference mode.

        Reads ``linear_mode`` from the modules; never runs a forward.

        Raises:
            NotTrainableError: At least one layer has ``linear_mode == "inference"`` (set by an
                eval-mode no-grad forward on CPU, gptqmodel 7.6.0); the message counts them.
                Also when the transformers quantizer reports ``is_trainable`` False.
        """
        super().check_trainable(model)
        latched, total = latched_layers(self.find_layers(model))
        if latched:
            raise NotTrainableError(
                f"{len(latched)} of {total} GPTQ layers (first: {latched[0]!r}) have "
                "linear_mode='inference': an eval-mode forward under torch.no_grad already ran "
                "and gptqmodel repacked their weights for an int4 CPU matmul that has no backward, "
                "so adapters would silently get no gradient. Reload the model and call prepare "
                'before any forward, or load it with GPTQConfig(bits=4, backend="gptq_torch") '
                "(TorchLinear has no such mode)."
            )

    def before_training(self, model: nn.Module) -> UndoFn | None:
        """Pin every gptqmodel layer whose ``linear_mode`` is still None to ``"train"``.

        gptqmodel 7.6.0 latches the inference mode only while ``linear_mode is None``, so a
        later eval no-grad forward (a smoke test, ``Trainer``'s evaluation) keeps the layer
        differentiable. Returns an undo that sets the pinned layers back to None.
        """
        return pin_train_mode((m for _n, m in self.find_layers(model)), "GPTQ")

    def plan_warnings(self, model: nn.Module) -> list[str]:
        out: list[str] = []
        evidence = self.flagged_without_layers(model)
        if evidence is not None and not any(_has_packed_storage(m) for m in model.modules()):
            out.append(
                f"The model is flagged GPTQ ({evidence}) but holds no GPTQ layer: its linears "
                "are probably plain and randomly initialised (the checkpoint's qweight/scales were "
                "not loaded). Check the load report for UNEXPECTED qweight keys."
            )
        return out
