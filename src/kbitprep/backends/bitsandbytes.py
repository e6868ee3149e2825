"""bitsandbytes 4-bit (``Linear4bit`` / ``Params4bit``) and 8-bit (``Linear8bitLt`` / ``Int8Params``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from kbitprep.backends.base import (
    MethodFacts,
    QuantBackend,
    UndoFn,
    loaded_module,
    modules_of_type,
)

__all__ = ["BitsAndBytesBackend"]

logger = logging.getLogger(__name__)


def _layer_classes() -> tuple[type, ...]:
    bnb_nn = loaded_module("bitsandbytes.nn")
    if bnb_nn is None:
        return ()
    return tuple(c for c in (getattr(bnb_nn, "Linear4bit", None), getattr(bnb_nn, "Linear8bitLt", None)) if c)


def _storage_classes() -> tuple[type, ...]:
    bnb_nn = loaded_module("bitsandbytes.nn")
    if bnb_nn is None:
        return ()
    return tuple(c for c in (getattr(bnb_nn, "Params4bit", None), getattr(bnb_nn, "Int8Params", None)) if c)


def _config_compute_dtype(model: nn.Module) -> torch.dtype | None:
    """``bnb_4bit_compute_dtype`` of a 4-bit ``quantization_config`` (object or dict), else None."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)

    def read(key: str) -> Any:
        return qc.get(key) if isinstance(qc, dict) else getattr(qc, key, None)

    if not read("load_in_4bit"):
        return None
    value = read("bnb_4bit_compute_dtype")
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) else None


class BitsAndBytesBackend(QuantBackend):
    """Strategy for bitsandbytes 4-bit (NF4/FP4) and 8-bit (LLM.int8()) models.

    Upcast policy (``upcast="auto"``) is peft 0.21's: every fp16/bf16 parameter that is not
    quantized storage goes to ``upcast_dtype``. ``Params4bit`` and ``Int8Params`` are storage
    whatever their dtype: a 4-bit weight stored as bf16 for FSDP (``bnb_4bit_quant_storage``)
    holds packed bytes, not numbers. The layers cast their inputs to the compute dtype
    themselves, so no input casts are needed around them.
    """

    name: ClassVar[str] = "bitsandbytes"
    priority: ClassVar[int] = 0
    install_hint: ClassVar[str] = "pip install 'kbitprep[bnb]'"
    requires: ClassVar[tuple[str, ...]] = ("bitsandbytes",)
    quant_methods: ClassVar[frozenset[str]] = frozenset({"bitsandbytes", "bitsandbytes_4bit", "bitsandbytes_8bit"})
    method_facts: ClassVar[Mapping[str, MethodFacts]] = {
        "bitsandbytes": MethodFacts(
            "Params4bit uint8 (or bnb_4bit_quant_storage) / Int8Params int8", "yes (4-bit and 8-bit)"
        )
    }

    storage_names: ClassVar[frozenset[str]] = frozenset({"weight"})
    """The packed weight of a ``Linear4bit`` / ``Linear8bitLt``, whatever class a wrapper gave it."""

    def find_layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """bitsandbytes' ``Linear4bit`` and ``Linear8bitLt``."""
        return modules_of_type(model, _layer_classes())

    def is_quantized_param(self, name: str, param: nn.Parameter, module: nn.Module) -> bool:
        """``Params4bit`` and ``Int8Params`` wherever they are; otherwise the default."""
        storage = _storage_classes()
        if storage and isinstance(param, storage):
            return True
        return super().is_quantized_param(name, param, module)  # the layers' weight, the shared rule

    def compute_dtype(self, model: nn.Module) -> torch.dtype | None:
        """The dtype the bitsandbytes layers present compute in, read from those layers only
        (DESIGN "The orchestrator": never from a config default of another layer kind).

        - 4-bit (``Linear4bit``): the layers' ``compute_dtype`` (``bnb_4bit_compute_dtype``;
          bitsandbytes 0.50 ``Linear4bit.forward`` casts its input to it and returns the input's
          dtype). A layer built without one (it adopts its first input's dtype) falls back to
          the config's ``bnb_4bit_compute_dtype`` when the config says ``load_in_4bit``.
        - 8-bit only (``Linear8bitLt``): the layers dequantize to, and return, their input's
          dtype (bitsandbytes 0.50 ``MatMul8bitLt``: ``dtype=A.dtype``), so they compute in the
          model's dtype: the dtype of their own floating parameters that are not storage (the
          bias), else the model's dtype as transformers 5.24 defines it (``PreTrainedModel.dtype``:
          its first floating parameter; here the first that is not storage): an fp16 LLM.int8
          checkpoint computes in fp16, T5 too although transformers keeps its ``wo`` in fp32.
          ``BitsAndBytesConfig(load_in_8bit=True)`` still carries
          ``bnb_4bit_compute_dtype=float32`` (transformers' default for the 4-bit option),
          which no layer of an 8-bit model uses (issue 16: it brought every fp16 module up to
          fp32 under ``upcast="none"``).
        - no bitsandbytes layer: ``None``.
        """
        bnb_nn = loaded_module("bitsandbytes.nn")
        linear4 = getattr(bnb_nn, "Linear4bit", None)
        linear8 = getattr(bnb_nn, "Linear8bitLt", None)
        layers4 = [m for _n, m in modules_of_type(model, (linear4,) if linear4 is not None else ())]
        for module in layers4:
            dtype = getattr(module, "compute_dtype", None)
            if isinstance(dtype, torch.dtype):
                return dtype
        if layers4:
            return _config_compute_dtype(model)
        layers8 = [m for _n, m in modules_of_type(model, (linear8,) if linear8 is not None else ())]
        if not layers8:
            return None
        for module in layers8:
            for name, param in module.named_parameters(recurse=False):
                if param.is_floating_point() and not self.is_quantized_param(name, param, module):
                    return param.dtype
        modules = dict(model.named_modules())
        for name, param in model.named_parameters():
            owner = modules.get(name.rpartition(".")[0], model)
            if param.is_floating_point() and not self.is_quantized_param(name, param, owner):
                return param.dtype
        return None

    upcast_rule: ClassVar[str] = "peft's: fp16/bf16 parameters to upcast_dtype"
    """What :meth:`should_upcast` casts, for the coverage table."""

    def should_upcast(self, name: str, param: nn.Parameter, module: nn.Module) -> bool:
        # peft 0.21 prepare_model_for_kbit_training: fp16/bf16 non-storage params go to fp32
        return param.dtype in (torch.float16, torch.bfloat16)

    def before_training(self, model: nn.Module) -> UndoFn | None:
        """Undo and disable bitsandbytes' CPU inference repack of 4-bit weights.

        On a CPU with AVX512-BF16, one eval-mode no-grad forward of ``Linear4bit`` (bitsandbytes
        0.50) converts its weight for good into a packed CPU layout whose matmul has no autograd
        formula, so adapter gradients through the layer are silently lost. Here every such weight
        is converted back to the standard layout (bytes as before the repack) and the layer's
        ``support_avx512bf16_for_cpu`` flag is turned off so the repack cannot happen again.
        ``undo`` restores the flags.
        """
        bnb_nn = loaded_module("bitsandbytes.nn")
        linear4 = getattr(bnb_nn, "Linear4bit", None) if bnb_nn is not None else None
        if linear4 is None:
            return None
        flags: list[tuple[nn.Module, Any]] = []
        repacked = 0
        for _name, module in modules_of_type(model, (linear4,)):
            weight = getattr(module, "weight", None)
            state = getattr(weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                assert weight is not None
                weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
                if getattr(module, "quant_state", None) is not None:
                    module.quant_state = weight.quant_state
                repacked += 1
            layer: Any = module
            if hasattr(layer, "support_avx512bf16_for_cpu"):
                flags.append((layer, layer.support_avx512bf16_for_cpu))
                layer.support_avx512bf16_for_cpu = False
        if repacked:
            logger.info("Restored %d 4-bit weights from bitsandbytes' CPU inference layout", repacked)

        def undo() -> None:
            for module, value in flags:
                module.support_avx512bf16_for_cpu = value

        return undo

    def shardable(self, model: nn.Module) -> tuple[bool, str]:
        """4-bit: yes. ``Linear4bit`` keeps a copy of the weight's ``quant_state`` on the module,
        and bitsandbytes 0.50 re-attaches it when FSDP hands the layer a plain tensor
        (``fix_4bit_weight_quant_state_from_module``). With a float ``quant_storage`` FSDP1 and
        FSDP2 both shard the packed bytes (tests/test_distributed.py, CPU, gloo); with uint8 only
        FSDP2 does (FSDP1 refuses integer tensors: "Cannot flatten integer dtype tensors").
        8-bit: no, its scale state (``Int8Params.SCB``) lives on the parameter, which FSDP
        replaces."""
        dtypes = set()
        eight_bit = 0
        linear8 = getattr(loaded_module("bitsandbytes.nn"), "Linear8bitLt", None)
        for _name, module in self.find_layers(model):
            if linear8 is not None and isinstance(module, linear8):
                eight_bit += 1
                continue
            weight = getattr(module, "weight", None)
            if weight is not None:
                dtypes.add(weight.dtype)
        stored = ", ".join(sorted(str(d) for d in dtypes))
        if eight_bit:
            return False, (
                f"{eight_bit} 8-bit Linear8bitLt layer(s): their scale state (Int8Params.SCB) is kept on "
                "the parameter, which FSDP replaces with its own; bitsandbytes supports FSDP for 4-bit only"
            )
        if not dtypes:
            return False, "no bitsandbytes layers found"
        if all(d.is_floating_point for d in dtypes):
            return True, f"4-bit weights are stored as {stored}"
        return True, (
            f"4-bit weights are stored as {stored}; FSDP2 shards them, FSDP1 only with "
            "bnb_4bit_quant_storage set to the model's float dtype"
        )
