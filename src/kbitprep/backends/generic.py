"""Fallback for a model quantized by a method no strategy claims: freeze and checkpoint only."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from torch import nn

from kbitprep.backends.base import MethodFacts, QuantBackend, config_quant_method, legacy_quant_method

__all__ = ["REFUSED_BY_TRANSFORMERS", "UNDECLARED", "UNKNOWN_TRAINING", "GenericBackend"]

REFUSED_BY_TRANSFORMERS = "no: refused, because transformers marks it not trainable (quantizer is_trainable False)"
"""What the inherited :meth:`QuantBackend.check_trainable` does with a quantizer whose
``is_trainable`` is False, for the coverage table."""

UNKNOWN_TRAINING = "unknown: generic freezes, wires checkpointing and warns"
"""What :class:`GenericBackend` does with a method whose quantizer does not refuse training."""

UNDECLARED = MethodFacts("unknown", UNKNOWN_TRAINING, "no strategy declares it yet")
"""The coverage row of a transformers method that no strategy claims or declares."""


def _method(model: nn.Module) -> tuple[str, str] | None:
    evidence = config_quant_method(model) or legacy_quant_method(model)
    if evidence is not None:
        return evidence
    if getattr(model, "is_quantized", False) is True:
        return "unknown", "model.is_quantized is True"
    return None


class GenericBackend(QuantBackend):
    """Strategy for a quantization method kbitprep has no strategy for (e.g. vptq, sinq).

    Parameters are frozen and checkpointing is wired, but nothing is cast: an unknown kernel may
    own its compute dtype, and an upcast could break it. A plan warning names the method.
    """

    name: ClassVar[str] = "generic"
    priority: ClassVar[int] = -100
    fallback: ClassVar[bool] = True
    method_facts: ClassVar[Mapping[str, MethodFacts]] = {
        "vptq": MethodFacts(
            "VQuantLinear indices and centroids",
            REFUSED_BY_TRANSFORMERS,
            "not tested: kbitprep's test environment lacks the vptq library",
        ),
        "higgs": MethodFacts(
            "FLUTE-packed weights", REFUSED_BY_TRANSFORMERS, "transformers refuses HIGGS without a GPU"
        ),
        "spqr": MethodFacts(
            "SpQR sparse outliers and 3-bit groups", REFUSED_BY_TRANSFORMERS, "transformers refuses SpQR without a GPU"
        ),
        "quark": MethodFacts(
            "AMD Quark quantized layers",
            REFUSED_BY_TRANSFORMERS,
            "not tested: kbitprep's test environment lacks the quark library",
        ),
        "fp_quant": MethodFacts(
            "FP-Quant (MXFP4/NVFP4 with Hadamard rotations)",
            "refused unless FPQuantConfig(store_master_weights=True) (quantizer is_trainable); then "
            + UNKNOWN_TRAINING,
            "transformers refuses FP-Quant without a CUDA or XPU device",
        ),
        "auto-round": MethodFacts(
            "auto_round-format packed weights",
            "no: refused (transformers 5.24 AutoRoundQuantizer.is_trainable is False)",
            "the auto_gptq and auto_awq exports load as gptq and awq and train (see those rows)",
        ),
        "nvfp4": MethodFacts(
            "NVFP4 packed weights", REFUSED_BY_TRANSFORMERS, "transformers requires a CUDA GPU and the hub kernels"
        ),
        "metal": MethodFacts(
            "Apple Metal quantized weights", REFUSED_BY_TRANSFORMERS, "needs an Apple Silicon GPU (MPS)"
        ),
        "fouroversix": MethodFacts(
            "four-over-six FP4 weights",
            "refused unless keep_master_weights=True (quantizer is_trainable); then " + UNKNOWN_TRAINING,
            "not tested: kbitprep's test environment lacks the fouroversix library",
        ),
        "sinq": MethodFacts(
            "SINQ quantized weights", UNKNOWN_TRAINING, "not tested: kbitprep's test environment lacks the sinq library"
        ),
        "gemma": MethodFacts(
            "Gemma quantized checkpoints",
            REFUSED_BY_TRANSFORMERS,
            "not tested: kbitprep's tests load no such checkpoint",
        ),
    }
    """transformers 5.24 methods no strategy claims. ``trains`` is what the inherited
    :meth:`~QuantBackend.check_trainable` makes of each quantizer's ``is_trainable``."""

    def detect(self, model: nn.Module) -> str | None:
        evidence = _method(model)
        if evidence is None:
            return None
        return f"{evidence[1]}, a quantization method no kbitprep strategy claims"

    def plan_warnings(self, model: nn.Module) -> list[str]:
        evidence = _method(model)
        method = evidence[0] if evidence else "unknown"
        return [
            f"The model is quantized by {method!r}, which no kbitprep backend knows: parameters are "
            "frozen and checkpointing is wired, but nothing is upcast. If adapters do not train, "
            "write a backend plugin for it (see 'Writing a backend plugin')."
        ]
