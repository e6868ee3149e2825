"""BitNet: ternary weights {-1, 0, 1} with one scale per layer (transformers 5.24
``BitNetQuantConfig``; ``transformers.integrations.bitnet``).

Two layer classes, three storages (measured on this CPU with pre-quantized tiny checkpoints):

* ``BitLinear`` (``linear_class="bitlinear"``): ``weight`` is a uint8 *buffer* of shape
  ``(out/4, in)``, four 2-bit codes per byte, and ``weight_scale`` a ``(1,)`` buffer in the load
  dtype. Its forward quantizes the input per token with ``round()`` and a cast to int8, with no
  straight-through estimator, and divides by the per-token scale ``127 / max|x|``; the only
  gradient that reaches its input flows through that max, one element per token. Adapters
  before such a layer get a gradient that is not the layer's: refused.
* ``AutoBitLinear`` offline (``linear_class="autobitlinear"``, ``quantization_mode="offline"``):
  an ``nn.Linear`` whose ``weight`` holds the unpacked ternary values in the load dtype, and a
  ``weight_scale`` buffer. Its activations pass ``ActQuant``, a straight-through estimator, so
  adapters train, although transformers' ``BitNetHfQuantizer.is_trainable`` says False. The
  ternary ``weight`` and ``weight_scale`` are storage: never cast, never trained.
* ``AutoBitLinear`` online (quantization-aware training): a float master ``weight`` quantized at
  every forward. Nothing is stored quantized, so :func:`kbitprep.detect_backend` calls the model
  unquantized (``none``), as for any label without storage.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import ClassVar

import torch
from torch import nn

from kbitprep._errors import NotTrainableError
from kbitprep.backends.base import MethodFacts, QuantBackend, loaded_module, modules_of_type, most_common_dtype

__all__ = ["BitNetBackend"]

STORAGE_NAMES = frozenset({"weight", "weight_scale"})
"""An offline ``AutoBitLinear``'s ternary weight and its scale (transformers 5.24); an online one's
float master weight is not storage, so :attr:`QuantBackend.storage_names` (every found layer)
does not fit."""


def _classes(name: str) -> tuple[type, ...]:
    mod = loaded_module("transformers.integrations.bitnet")
    cls = getattr(mod, name, None) if mod is not None else None
    return (cls,) if isinstance(cls, type) else ()


def _is_offline_auto(module: nn.Module) -> bool:
    auto = _classes("AutoBitLinear")
    return bool(auto) and isinstance(module, auto) and not getattr(module, "online_quant", False)


class BitNetBackend(QuantBackend):
    """Strategy for BitNet models: packed ``BitLinear`` is refused with the reason, offline
    ``AutoBitLinear`` is prepared with its ternary weights kept as stored.

    Nothing is upcast under ``upcast="auto"``: ``AutoBitLinear`` multiplies its input by its
    ternary ``weight`` with ``F.linear`` and needs the input in the weight's dtype.
    """

    name: ClassVar[str] = "bitnet"
    priority: ClassVar[int] = 0
    install_hint: ClassVar[str] = "pip install 'kbitprep[transformers]'"
    requires: ClassVar[tuple[str, ...]] = ("transformers",)
    quant_methods: ClassVar[frozenset[str]] = frozenset({"bitnet"})
    method_facts: ClassVar[Mapping[str, MethodFacts]] = {
        "bitnet": MethodFacts(
            "BitLinear: packed uint8 buffer; offline AutoBitLinear: ternary weight and weight_scale",
            "BitLinear no (refused); offline AutoBitLinear yes; online AutoBitLinear stores nothing (none)",
            "checkpoints synthesized with transformers' pack_weights",
        )
    }

    layer_label: ClassVar[str] = "BitNet {cls}"

    def find_layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """transformers' ``BitLinear`` and ``AutoBitLinear`` (online ones too: they hold no storage,
        so :func:`kbitprep.detect_backend` then calls the model ``none``)."""
        return modules_of_type(model, _classes("BitLinear") + _classes("AutoBitLinear"))

    def is_quantized_param(self, name: str, param: nn.Parameter, module: nn.Module) -> bool:
        """An offline ``AutoBitLinear``'s ternary ``weight`` and ``weight_scale`` (float dtype,
        quantized values); elsewhere the base rule (``BitLinear``'s uint8 buffer is covered by it)."""
        if name.rpartition(".")[2] in STORAGE_NAMES and _is_offline_auto(module):
            return True
        return super().is_quantized_param(name, param, module)

    def input_dtype(self, module: nn.Module) -> torch.dtype | None:
        """``AutoBitLinear``: its weight's dtype (``F.linear`` needs the input in it);
        ``BitLinear``: the ``dtype`` it was built with."""
        if _classes("AutoBitLinear") and isinstance(module, _classes("AutoBitLinear")):
            weight = module._parameters.get("weight")
            return weight.dtype if weight is not None and weight.is_floating_point() else None
        if _classes("BitLinear") and isinstance(module, _classes("BitLinear")):
            dtype = vars(module).get("dtype")
            return dtype if isinstance(dtype, torch.dtype) else None
        return None

    def check_trainable(self, model: nn.Module) -> None:
        """Refuse packed ``BitLinear`` layers; accept offline ``AutoBitLinear`` whatever the
        quantizer says (its ``ActQuant`` straight-through estimator carries the gradient).

        Raises:
            NotTrainableError: The model holds ``BitLinear`` layers; the message counts them.
        """
        packed = [n for n, _m in modules_of_type(model, _classes("BitLinear"))]
        if packed:
            raise NotTrainableError(
                f"{len(packed)} BitNet BitLinear layers (first: {packed[0]!r}) hold packed 2-bit weights "
                "and quantize their input with round() and a cast to int8 and no straight-through "
                "estimator (transformers 5.24 BitLinear.activation_quant): the only gradient reaching "
                "the adapters before them flows through each token's max-abs scale, which is not the "
                "layer's gradient. Load the checkpoint with BitNetQuantConfig(linear_class="
                "'autobitlinear', quantization_mode='offline'), whose AutoBitLinear passes gradients "
                "through a straight-through estimator."
            )

    def compute_dtype(self, model: nn.Module) -> torch.dtype | None:
        """The dtype most BitNet layers compute in (:meth:`input_dtype`), else ``None``."""
        return most_common_dtype(self.input_dtype(m) for _n, m in self.find_layers(model))

    def plan_warnings(self, model: nn.Module) -> list[str]:
        quantizer = getattr(model, "hf_quantizer", None)
        offline = [n for n, m in self.find_layers(model) if _is_offline_auto(m)]
        if offline and quantizer is not None and getattr(quantizer, "is_trainable", True) is False:
            return [
                f"transformers marks this BitNet model not trainable ({type(quantizer).__name__}.is_trainable "
                f"is False), but its {len(offline)} offline AutoBitLinear layers pass gradients through a "
                "straight-through estimator, so adapters train. Trainer refuses the model until you call "
                "kbitprep.mark_trainable(model)."
            ]
        return []
