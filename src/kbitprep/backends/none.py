"""The unquantized model: peft's behaviour, with its memory cost shown up front."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from kbitprep.backends.base import MethodFacts, QuantBackend

__all__ = ["NoQuantBackend"]


class NoQuantBackend(QuantBackend):
    """Strategy for a model no quantization method touched.

    As in peft 0.21: fp16/bf16 parameters are upcast (the plan and a warning state the bytes
    added), and gradient checkpointing is left as the model has it (PEFT documents that it
    enables checkpointing only for quantized models).
    """

    name: ClassVar[str] = "none"
    priority: ClassVar[int] = -1000
    fallback: ClassVar[bool] = True
    holds_storage: ClassVar[bool] = False
    keeps_checkpointing_as_found: ClassVar[bool] = True
    method_facts: ClassVar[Mapping[str, MethodFacts]] = {
        # the dequantized load; transformers 5.24's GgufHfQuantizer can also keep the blocks packed
        # (with the `kernels` package and a ggml kernel for the device), which this row leaves out
        "gguf": MethodFacts(
            "nothing: transformers dequantizes GGUF files while loading",
            "yes, as an unquantized model",
            "the demo converts a real GGUF file; no test checks the verdict by itself",
        )
    }
    """Methods no strategy claims whose models reach kbitprep with no quantized storage."""

    def detect(self, model: nn.Module) -> str | None:
        return "no quantizer, quantization attributes or quantized layers found"

    upcast_rule: ClassVar[str] = "peft's (unquantized model)"
    """What :meth:`should_upcast` casts, for the coverage table."""

    def should_upcast(self, name: str, param: nn.Parameter, module: nn.Module) -> bool:
        return param.dtype in (torch.float16, torch.bfloat16)  # peft 0.21 casts plain models too

    def check_trainable(self, model: nn.Module) -> None:
        return None

    def shardable(self, model: nn.Module) -> tuple[bool, str]:
        return True, "the model is not quantized: every parameter is an ordinary tensor"
