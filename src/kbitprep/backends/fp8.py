"""FP8: transformers' finegrained ``FP8Linear`` and fbgemm ``FbgemmFp8Linear``.

transformers 5.24 ``FineGrainedFP8HfQuantizer`` (``quant_method`` ``"fp8"``; ``"mxfp8"`` reuses
it) swaps each ``nn.Linear`` for ``transformers.integrations.finegrained_fp8.FP8Linear``:

* ``weight``: ``float8_e4m3fn`` ``(out, in)`` (or ``int8`` ``(out, in/2)`` holding packed FP4),
  an ``nn.Parameter`` created with ``requires_grad=True``;
* ``weight_scale_inv``: ``float32`` (or ``float8_e8m0fnu`` for ``scale_fmt="ue8m0"``),
  ``(ceil(out/block_n), ceil(in/block_k))`` per block, a 0-d tensor per tensor;
* ``activation_scale``: ``float32`` 0-d, only for ``activation_scheme="static"``;
* ``bias``: the model's float dtype, or ``None``.

Its forward runs ``FP8LinearFunction``, whose backward returns the input gradient through the
weight dequantized to the gradient's dtype and nothing for the weight, scales or bias: adapters
around it train, the FP8 weights stay frozen. ``FbgemmFp8Linear`` (``quant_method``
``"fbgemm_fp8"``) holds a ``float8_e4m3fn`` ``weight`` with a ``float32`` ``weight_scale``
``(out, 1)``, quantizes its input to float8 on every call and multiplies with
``torch.ops.fbgemm.f8f8bf16_rowwise``, which has no backward (its quantizer's ``is_trainable``
is False). Neither layer is built by transformers on a CPU: a pre-quantized FP8 checkpoint loads
dequantized to bf16 there (``validate_environment`` sets ``dequantize=True``), which kbitprep
treats as the unquantized model it then is.
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
    dominant_float_dtype,
    loaded_module,
)

__all__ = ["Fp8Backend"]

FINEGRAINED = "transformers.integrations.finegrained_fp8"
FBGEMM = "transformers.integrations.fbgemm_fp8"

STORAGE_NAMES = frozenset(
    {"weight", "weight_scale_inv", "weight_scale", "activation_scale", "input_scale_ub"}
    | {"gate_up_proj", "down_proj", "gate_up_proj_scale", "down_proj_scale", "gate_up_proj_scale_inv"}
    | {"down_proj_scale_inv"}
)
"""Names of an FP8 layer's quantized tensors (transformers 5.24 ``FP8Linear``, ``FP8Experts``,
``FP8Embedding``, ``FbgemmFp8Linear``, ``FbgemmFp8Llama4TextExperts``), whatever their dtype."""

_FLOAT8 = tuple(d for n in ("float8_e4m3fn", "float8_e5m2") if isinstance(d := getattr(torch, n, None), torch.dtype))


def _classes(module_name: str, *names: str) -> tuple[type, ...]:
    mod = loaded_module(module_name)
    found = (getattr(mod, n, None) for n in names) if mod is not None else ()
    return tuple(c for c in found if isinstance(c, type) and issubclass(c, nn.Module))


def _finegrained_classes() -> tuple[type, ...]:
    return _classes(FINEGRAINED, "FP8Linear", "FP8Experts", "FP8Embedding")


def _fbgemm_classes() -> tuple[type, ...]:
    return _classes(FBGEMM, "FbgemmFp8Linear", "FbgemmFp8Llama4TextExperts")


def _layer_classes() -> tuple[type, ...]:
    return _finegrained_classes() + _fbgemm_classes()


def _own_weight(module: nn.Module) -> torch.Tensor | None:
    weight = module._parameters.get("weight")
    return weight if weight is not None else module._buffers.get("weight")


def _is_raw_fp8_linear(module: nn.Module) -> bool:
    """A module of another class holding a float8 ``weight`` next to a ``weight_scale`` or
    ``weight_scale_inv`` (own tensors), and no compressed-tensors ``quantization_scheme``."""
    if hasattr(module, "quantization_scheme"):
        return False
    weight = _own_weight(module)
    own = {**module._parameters, **module._buffers}
    return (
        weight is not None
        and weight.dtype in _FLOAT8
        and any(own.get(n) is not None for n in ("weight_scale", "weight_scale_inv"))
    )


def _fp8_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    classes = _layer_classes()
    return [(n, m) for n, m in model.named_modules() if (classes and isinstance(m, classes)) or _is_raw_fp8_linear(m)]


def _is_quantized_now(module: nn.Module) -> bool:
    """Whether the layer still holds one-byte (or packed) weights: ``FP8Linear.forward`` falls
    back to ``F.linear`` when ``weight.element_size() > 1`` (transformers 5.24)."""
    tensors = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
    return any((t.element_size() == 1 and not t.is_floating_point()) or t.dtype in _FLOAT8 for t in tensors)


class Fp8Backend(QuantBackend):
    """Strategy for FP8 models (transformers finegrained ``FP8Linear``, ``FbgemmFp8Linear``).

    * Storage: every tensor of an FP8 layer except its ``bias`` (float8 weight, ``float32`` or
      ``float8_e8m0fnu`` scales, the static ``activation_scale``): never cast, never trained,
      never read as a compute dtype. A raw module holding a float8 ``weight`` beside a
      ``weight_scale``/``weight_scale_inv`` is recognised too.
    * ``upcast="auto"`` casts nothing: ``FP8Linear`` returns its input's dtype and the FP8
      kernels take bf16/fp16 activations (transformers 5.24 ``fp8_linear``). No layer has an
      input dtype (no :attr:`input_dtype_attr`): ``FP8Linear`` quantizes (or, in its reference
      path, dequantizes) on its own, so no input cast is planned, and never one to a float8 dtype.
    * Trainability: ``FP8Linear`` with float8 weights trains adapters through its input
      gradient (transformers >= 5.24 ``FP8LinearFunction``); FP4-packed ``int8`` weights
      (its backward raises ``NotImplementedError``), ``FbgemmFp8Linear`` (activation
      quantization, no backward) and ``FP8Linear`` of a transformers without
      ``FP8LinearFunction`` are refused.
    """

    name: ClassVar[str] = "fp8"
    priority: ClassVar[int] = 0
    install_hint: ClassVar[str] = "pip install 'kbitprep[transformers]'"
    requires: ClassVar[tuple[str, ...]] = ("transformers",)
    quant_methods: ClassVar[frozenset[str]] = frozenset({"fp8", "fbgemm_fp8", "mxfp8"})
    method_facts: ClassVar[Mapping[str, MethodFacts]] = {
        "fp8": MethodFacts(
            "float8_e4m3fn weight and weight_scale_inv",
            "yes (float8 weights; FP4-packed int8 weights refused)",
            "FP8Linear built directly with a CPU reference kernel: transformers dequantizes FP8 on a CPU",
        ),
        "fbgemm_fp8": MethodFacts(
            "float8_e4m3fn weight and weight_scale", "no: refused (f8f8bf16_rowwise has no backward)"
        ),
        "mxfp8": MethodFacts(
            "float8 weight and e8m0 block scales",
            "as fp8",
            "kbitprep's tests build only the finegrained fp8 layers, on a CPU",
        ),
    }

    def find_layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """FP8 layers (and raw float8 linears) that still hold one-byte or packed weights: one
        transformers dequantized in place runs a plain ``F.linear``."""
        return ((n, m) for n, m in _fp8_layers(model) if _is_quantized_now(m))

    def is_quantized_param(self, name: str, param: nn.Parameter, module: nn.Module) -> bool:
        """Every tensor of an FP8 layer named in :data:`STORAGE_NAMES` (``bias`` is not), whatever
        its dtype; elsewhere the shared rule (:func:`~kbitprep.backends.base.is_storage_tensor`)."""
        leaf = name.rpartition(".")[2]
        classes = _layer_classes()
        if leaf in STORAGE_NAMES and ((classes and isinstance(module, classes)) or _is_raw_fp8_linear(module)):
            return True
        return super().is_quantized_param(name, param, module)

    def compute_dtype(self, model: nn.Module) -> torch.dtype | None:
        """The floating dtype holding most bytes of the model's non-storage parameters (the dtype
        it was loaded in, bf16 for every FP8 checkpoint transformers 5.24 loads): ``FP8Linear``
        returns its input's dtype (``fp8_linear`` ``output_dtype`` defaults to ``input.dtype``).
        Never a float8 dtype; ``None`` when the model has no such parameter."""
        return dominant_float_dtype(model, self.is_quantized_param)

    def check_trainable(self, model: nn.Module) -> None:
        """Refuse FP8 layers whose forward has no backward to the input.

        Raises:
            NotTrainableError: ``FbgemmFp8Linear`` layers hold float8 weights (activation
                quantization with ``f8f8bf16_rowwise``: no backward); ``FP8Linear`` layers hold
                FP4-packed ``int8`` weights (transformers 5.24 ``_dequantize_fp8_weight``
                raises ``NotImplementedError`` in the backward); or transformers' finegrained
                FP8 module has no ``FP8LinearFunction`` (before 5.24). Also when the
                transformers quantizer reports ``is_trainable`` False.
        """
        layers = list(self.find_layers(model))
        fbgemm = [n for n, m in layers if isinstance(m, _fbgemm_classes() or ())]
        if fbgemm:
            raise NotTrainableError(
                f"{len(fbgemm)} FbgemmFp8Linear layer(s) (first: {fbgemm[0]!r}) quantize their input to float8 "
                "and multiply with torch.ops.fbgemm.f8f8bf16_rowwise, which has no backward (transformers 5.24; "
                "FbgemmFp8HfQuantizer.is_trainable is False), so adapters before them would get no gradient. "
                "Load the checkpoint with FineGrainedFP8Config() instead (FP8Linear trains through its input "
                "gradient), or with dequantize=True to train in bf16."
            )
        fp4 = [n for n, m in layers if (w := _own_weight(m)) is not None and w.dtype == torch.int8]
        if fp4:
            raise NotTrainableError(
                f"{len(fp4)} FP8Linear layer(s) (first: {fp4[0]!r}) hold FP4-packed int8 weights; transformers "
                "5.24 FP8LinearFunction.backward raises NotImplementedError('Backward through FP4 weights is not "
                "supported'), so adapters cannot train. Reload the checkpoint with dequantize=True."
            )
        finegrained = loaded_module(FINEGRAINED)
        if any(isinstance(m, _finegrained_classes() or ()) for _n, m in layers) and not hasattr(
            finegrained, "FP8LinearFunction"
        ):
            raise NotTrainableError(
                "This transformers' FP8Linear has no backward (FP8LinearFunction arrived in transformers 5.24), "
                "so adapters before its layers would get no gradient. Upgrade with "
                "`pip install 'transformers>=5.24'`, or reload the checkpoint with dequantize=True."
            )
        if not layers:
            return None  # a label without FP8 storage: nothing of transformers' flag applies
        return super().check_trainable(model)
