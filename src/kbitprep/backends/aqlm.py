"""AQLM: additive quantization (``aqlm.QuantizedLinear``, aqlm 1.1.7).

An AQLM layer stores its weight as ``codes`` (int16 for 16-bit codebooks, int8 for 8-bit;
shape ``(out/out_group, in/in_group, num_codebooks)``), ``codebooks`` (float,
``(num_codebooks, 2**nbits, out_group, in_group)``) and ``scales`` (float, ``(out/out_group, 1, 1, 1)``).
All three are ``nn.Parameter``; codebooks and scales load with ``requires_grad=True`` through
transformers 5.24, so a dtype rule would both cast and train them. They are storage here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from kbitprep._errors import NotTrainableError
from kbitprep.backends.base import (
    MethodFacts,
    QuantBackend,
    loaded_module,
    modules_of_type,
)

__all__ = ["AqlmBackend"]


def _layer_classes() -> tuple[type, ...]:
    for mod_name in ("aqlm.inference", "aqlm"):
        mod = loaded_module(mod_name)
        cls = getattr(mod, "QuantizedLinear", None) if mod is not None else None
        if isinstance(cls, type):
            return (cls,)
    return ()


def _layout(module: nn.Module) -> str:
    """``"2x8"`` style name: number of codebooks × bits per codebook."""
    return f"{getattr(module, 'num_codebooks', '?')}x{getattr(module, 'nbits_per_codebook', '?')}"


def _uses_cpu_numba_kernel(module: nn.Module) -> bool:
    """Whether aqlm 1.1.7 runs this layer with its numba kernel (forward-only).

    ``aqlm.inference_kernels.get_forward_pass_kernel`` picks ``numba_gemm_lut`` for codebooks
    on CPU with 256 entries and ``out_group_size == 1``; its first forward permutes ``codes`` in
    place and there is no working backward.
    """
    codebooks = getattr(module, "codebooks", None)
    if not isinstance(codebooks, torch.Tensor) or codebooks.dim() != 4:
        return False
    _k, size, out_group, _in_group = codebooks.shape
    return codebooks.device.type == "cpu" and size == 256 and out_group == 1


def _not_to_quantize(model: nn.Module) -> list[str] | None:
    """The config's ``linear_weights_not_to_quantize`` list (quantizer, config object or dict)."""
    candidates: list[Any] = []
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        candidates.append(getattr(quantizer, "quantization_config", None))
    candidates.append(getattr(getattr(model, "config", None), "quantization_config", None))
    for qc in candidates:
        value = (
            qc.get("linear_weights_not_to_quantize")
            if isinstance(qc, dict)
            else getattr(qc, "linear_weights_not_to_quantize", None)
        )
        if isinstance(value, Iterable) and not isinstance(value, str):
            return [str(v) for v in value]
    return None


class AqlmBackend(QuantBackend):
    """Strategy for AQLM models.

    Nothing is upcast under ``upcast="auto"``; the AQLM kernels compute in their codebooks'
    dtype, so their inputs are cast to it when the caller upcasts other parameters. What is
    quantized is read from the modules present, never from the config's
    ``linear_weights_not_to_quantize`` list: transformers 5.24 matches that list against module
    names, so the hub form ``"lm_head.weight"`` excludes nothing and ``lm_head`` becomes an
    AQLM layer whose codes were never loaded. The list is used only to warn.

    Trainability depends on the kernel path: 1x16 codebooks use the differentiable pure-torch
    dequantize-matmul on CPU; 8-bit codebooks (2x8, 1x8) use a forward-only numba kernel on CPU
    and raise :class:`~kbitprep.NotTrainableError` before anything changes.
    """

    name: ClassVar[str] = "aqlm"
    priority: ClassVar[int] = 0
    install_hint: ClassVar[str] = "pip install 'kbitprep[aqlm]'"
    requires: ClassVar[tuple[str, ...]] = ("aqlm",)
    quant_methods: ClassVar[frozenset[str]] = frozenset({"aqlm"})
    method_facts: ClassVar[Mapping[str, MethodFacts]] = {
        "aqlm": MethodFacts(
            "codes int16/int8, codebooks and scales in the load dtype",
            "yes (1x16 on CPU; 2x8 and 1x8 on CPU refused)",
            "kbitprep's tests quantize their own checkpoint (no hub download)",
        )
    }

    storage_names: ClassVar[frozenset[str]] = frozenset({"codes", "codebooks", "scales"})
    """A ``QuantizedLinear``'s quantized parameters (aqlm 1.1.7), whatever their dtype; its
    ``bias`` is not storage."""
    input_dtype_attr: ClassVar[str] = "codebooks"
    """The codebooks' dtype is the dtype the AQLM kernels compute in."""
    layer_label: ClassVar[str] = "AQLM QuantizedLinear"

    def find_layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """aqlm's ``QuantizedLinear``."""
        return modules_of_type(model, _layer_classes())

    def check_trainable(self, model: nn.Module) -> None:
        """Refuse AQLM layers whose kernel on their device has no backward.

        Raises:
            NotTrainableError: Some layers have 256-entry codebooks (2x8 or 1x8) on CPU, where
                aqlm 1.1.7 runs a forward-only numba kernel (and needs fp32); the message names
                the layout and counts the layers. Also when the transformers quantizer reports
                ``is_trainable`` False.
        """
        super().check_trainable(model)
        blocked = [(n, m) for n, m in self.find_layers(model) if _uses_cpu_numba_kernel(m)]
        if blocked:
            layouts = sorted({_layout(m) for _n, m in blocked})
            raise NotTrainableError(
                f"{len(blocked)} AQLM layers (first: {blocked[0][0]!r}) use the "
                f"{'/'.join(layouts)} codebook layout (256-entry codebooks) on CPU. aqlm runs them "
                "with a numba kernel that has no backward (and permutes `codes` in place on the "
                "first forward), so adapters cannot train on CPU. Use a 1x16 AQLM checkpoint on "
                "CPU, or train this one on a CUDA device."
            )

    def plan_warnings(self, model: nn.Module) -> list[str]:
        out: list[str] = []
        layers = dict(self.find_layers(model))
        evidence = self.flagged_without_layers(model)
        if evidence is not None:
            out.append(
                f"The model is flagged AQLM ({evidence}) but holds no AQLM QuantizedLinear: "
                "its linears are probably plain and randomly initialised."
            )
        listed = _not_to_quantize(model)
        if listed:
            for entry in listed:
                module_name = entry.removesuffix(".weight")
                if module_name in layers:
                    out.append(
                        f"quantization_config.linear_weights_not_to_quantize lists {entry!r}, but "
                        f"{module_name!r} is an AQLM QuantizedLinear: transformers matches that list "
                        f"against module names, so {entry!r} excluded nothing and the layer's codes, "
                        "codebooks and scales were probably never loaded (NaN logits). Write the "
                        f"module name {module_name!r} in the list and reload."
                    )
        return out
