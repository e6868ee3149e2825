"""compressed-tensors: llm-compressor checkpoints (``quant_method`` ``"compressed-tensors"``).

transformers 5.24 ``CompressedTensorsHfQuantizer`` loads them with compressed-tensors' own
``apply_quantization_config`` and ``ModelCompressor.compress_model``: each quantized
``nn.Linear`` (or ``nn.Embedding``) keeps its class, gains a ``quantization_scheme`` and a
``quantization_status``, and has its ``forward`` replaced on the instance by compressed-tensors'
quantized forward. In compressed form (``quantization_status`` ``"compressed"``, the default)
its tensors are, per compressed-tensors 0.20.1 (all ``nn.Parameter``, created with
``requires_grad=False``, though transformers 5.24 loads ``weight_scale`` with
``requires_grad=True``):

* ``pack-quantized`` (W4A16, W8A16, W4A16_ASYM): ``weight_packed`` int32
  ``(out, in·bits/32)``, ``weight_scale`` in the model's dtype ``(out, in/group)``,
  ``weight_shape`` int64 ``(2,)``, ``weight_zero_point`` for asymmetric schemes; no ``weight``;
* ``nvfp4-pack-quantized`` (NVFP4A16): ``weight_packed`` uint8 ``(out, in/2)``,
  ``weight_scale`` float8_e4m3fn ``(out, in/16)``, ``weight_global_scale`` float32 ``(1,)``;
  no ``weight``;
* ``float-quantized`` / ``naive-quantized`` (FP8 schemes): ``weight`` float8_e4m3fn with a
  ``weight_scale`` in the model's dtype; the ``mx*`` formats: packed uint8 or float8 weights
  with uint8 (e8m0) scales.

peft 0.21.2 cannot wrap a layer with no ``weight`` (``get_peft_model`` raises
``AttributeError``), and no compressed layer can run its forward: compressed-tensors registers a
forward pre-hook on the model (``ModelCompressor.add_decompress_hook``, handle kept as
``model.ct_decompress_hook``) that decompresses every layer on the first forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from kbitprep._errors import NotTrainableError
from kbitprep.backends.base import (
    STORAGE_LEAF_SUFFIXES,
    MethodFacts,
    QuantBackend,
    UndoFn,
    count_reason,
    detect_in_tiers,
    dominant_float_dtype,
    is_storage_dtype,
    loaded_module,
    tensor_nbytes,
)

__all__ = ["CompressedTensorsBackend"]

logger = logging.getLogger(__name__)

STORAGE_NAMES = frozenset(
    {
        "weight_packed",
        "weight_shape",
        "weight_scale",
        "weight_zero_point",
        "weight_global_scale",
        "weight_g_idx",
        "input_scale",
        "input_zero_point",
        "input_global_scale",
        "output_scale",
        "output_zero_point",
        "output_global_scale",
    }
)
"""Quantization tensors compressed-tensors 0.20.1 registers on a quantized module
(``initialize_qparams`` and the compressors); storage whatever their dtype."""

BF16_FORMATS = frozenset({"nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp6-pack-quantized", "mxfp8-quantized"})
"""Formats whose decompression yields bfloat16 whatever the model's dtype, with a bfloat16 copy
of ``weight_scale`` (compressed-tensors 0.20.1: ``unpack_fp4_from_uint8`` defaults to
``dtype=torch.bfloat16`` and ``NVFP4PackedCompressor.decompress`` converts the scale to it; the
MX compressors do the same). Every other format decompresses to ``weight_scale``'s dtype
(``dequantize`` defaults to ``scale.dtype``) and keeps the scale tensor as it is."""

_HOOK_ATTR = "ct_decompress_hook"


# -- what a module holds -------------------------------------------------------------------------


def _value(x: Any) -> str | None:
    """The lower-case string of a str Enum (``QuantizationStatus``, ``CompressionFormat``)."""
    x = getattr(x, "value", x)
    return x.lower() if isinstance(x, str) else None


def _scheme(module: nn.Module) -> Any | None:
    """The ``quantization_scheme`` compressed-tensors put on ``module`` (any kind), else None."""
    return module.__dict__.get("quantization_scheme")


def _weight_scheme(module: nn.Module) -> Any | None:
    scheme = _scheme(module)
    return scheme if scheme is not None and getattr(scheme, "weights", None) is not None else None


def _status(module: nn.Module) -> str | None:
    return _value(module.__dict__.get("quantization_status"))


def _format(module: nn.Module) -> str | None:
    return _value(getattr(_scheme(module), "format", None))


def _quantizes_activations(module: nn.Module) -> bool:
    scheme = _scheme(module)
    return any(getattr(scheme, a, None) is not None for a in ("input_activations", "output_activations"))


def _holds_quantized_weight(module: nn.Module) -> bool:
    """Compressed or decompressed by compressed-tensors: ``weight`` (when present) holds the
    quantized values or their exact dequantization, never a master weight to train."""
    return _weight_scheme(module) is not None and _status(module) in ("compressed", "decompressed")


def _needs_decompression(module: nn.Module) -> bool:
    """Compressed with no floating ``weight`` peft could wrap and the forward could multiply
    (``weight_packed`` formats, or a float8 / int8 ``weight``)."""
    if _weight_scheme(module) is None or _status(module) != "compressed":
        return False
    weight = module._parameters.get("weight")
    return weight is None or is_storage_dtype(weight.dtype)


def _dense_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the layer's dense weight has (after decompression), see :data:`BF16_FORMATS`."""
    weight = module._parameters.get("weight")
    if weight is not None and weight.is_floating_point() and not is_storage_dtype(weight.dtype):
        return weight.dtype
    scale = module._parameters.get("weight_scale")
    if _format(module) not in BF16_FORMATS and scale is not None and not is_storage_dtype(scale.dtype):
        return scale.dtype
    return torch.bfloat16


def _dense_numel(module: nn.Module) -> int:
    """Elements of the dense weight: ``out × in`` of the ``nn.Linear`` / ``nn.Embedding`` (the
    module types compressed-tensors 0.20.1 compresses), else ``weight_shape``."""
    if isinstance(module, nn.Linear):
        return int(module.out_features * module.in_features)
    if isinstance(module, nn.Embedding):
        return int(module.num_embeddings * module.embedding_dim)
    shape = module._parameters.get("weight_shape")
    return int(torch.Size(shape.tolist()).numel()) if shape is not None else 0


def _decompression_bytes(modules: list[nn.Module]) -> tuple[int, int, int]:
    """``(dense, scales, kept)`` bytes for decompressing ``modules``: the dense weights added,
    the bfloat16 scale copies added (:data:`BF16_FORMATS`), and the compressed tensors they
    replace, which are kept for ``undo``."""
    dense = scales = kept = 0
    for module in modules:
        element = torch.empty((), dtype=_dense_dtype(module)).element_size()
        dense += _dense_numel(module) * element
        replaced = [module._parameters.get("weight_packed"), module._parameters.get("weight")]
        if _format(module) in BF16_FORMATS and (scale := module._parameters.get("weight_scale")) is not None:
            scales += scale.numel() * torch.empty((), dtype=torch.bfloat16).element_size()
            replaced.append(scale)
        kept += sum(tensor_nbytes(t) for t in replaced if t is not None)
    return dense, scales, kept


def _describe(scheme: Any) -> str:
    """``"weights float8 channel, input_activations float8 token dynamic"`` from a scheme."""

    def args(a: Any) -> str:
        parts = (
            f"{_value(getattr(a, 'type', None))}{getattr(a, 'num_bits', '?')}",
            _value(getattr(a, "strategy", None)),
        )
        dynamic = "dynamic" if getattr(a, "dynamic", False) is True else ""
        return " ".join(p for p in (*parts, dynamic) if p)

    kinds = ("weights", "input_activations", "output_activations")
    return ", ".join(f"{k} {args(getattr(scheme, k))}" for k in kinds if getattr(scheme, k, None) is not None)


# -- the fix-up and its undo ---------------------------------------------------------------------


def _stash(module: nn.Module) -> Callable[[], None]:
    """Keep the module's own tensors, status and scheme format; the returned callable puts those
    very objects back (same dicts, same order), so ``state_dict`` is bit- and key-identical."""
    params, buffers = dict(module._parameters), dict(module._buffers)
    non_persistent = set(module._non_persistent_buffers_set)
    status = module.__dict__.get("quantization_status")
    scheme = _scheme(module)
    fmt = getattr(scheme, "format", None)

    def restore() -> None:
        module._parameters.clear()
        module._parameters.update(params)
        module._buffers.clear()
        module._buffers.update(buffers)
        module._non_persistent_buffers_set.clear()
        module._non_persistent_buffers_set.update(non_persistent)
        module.__dict__["quantization_status"] = status
        if scheme is not None:
            scheme.format = fmt

    return restore


def _detach_decompress_hooks(model: nn.Module) -> Callable[[], None]:
    """Take compressed-tensors' first-forward decompression hook off every module that has one
    (it would decompress the already dense layers again and fail on the missing
    ``weight_packed``); the returned callable puts the same hook back, at its place, with its
    handle attribute."""
    taken: list[tuple[nn.Module, Any, list[Any], Any]] = []
    for module in model.modules():
        handle = module.__dict__.get(_HOOK_ATTR)
        hooks = module._forward_pre_hooks
        key = getattr(handle, "id", None)
        if handle is None or key not in hooks:
            continue
        order = list(hooks)
        taken.append((module, handle, order, hooks.pop(key)))
        del module.__dict__[_HOOK_ATTR]

    def restore() -> None:
        for module, handle, order, fn in reversed(taken):
            hooks = module._forward_pre_hooks
            current = dict(hooks)
            hooks.clear()
            for key in order:
                if key == handle.id:
                    hooks[key] = fn
                elif key in current:
                    hooks[key] = current.pop(key)
            hooks.update(current)
            module.__dict__[_HOOK_ATTR] = handle

    return restore


def _decompress(layers: list[tuple[str, nn.Module]], model: nn.Module) -> UndoFn:
    """Decompress ``layers`` in place with compressed-tensors 0.20.1 ``decompress_module`` (what
    its first-forward hook runs on every layer); returns the undo."""
    from compressed_tensors.compressors import decompress_module

    undos = [_detach_decompress_hooks(model)]
    try:
        for _name, module in layers:
            undos.append(_stash(module))
            decompress_module(module)
            for param in module._parameters.values():
                if param is not None:
                    param.requires_grad_(False)
    except BaseException:
        for undo in reversed(undos):
            undo()
        raise

    def undo_all() -> None:
        for undo in reversed(undos):
            undo()

    return undo_all


# -- the strategy ----------------------------------------------------------------------------


class CompressedTensorsBackend(QuantBackend):
    """Strategy for compressed-tensors models (W4A16, W8A16, NVFP4A16, FP8 and the other schemes
    of compressed-tensors 0.20.1).

    * Storage: on a module with a ``quantization_scheme``, every tensor of
      :data:`STORAGE_NAMES` (``weight_packed``, scales, zero points, ``weight_shape``) whatever
      its dtype, and its ``weight`` once compressed-tensors compressed it (float8 / int8) or
      decompressed it (the exact dequantization of the stored values); elsewhere the shared
      rule. Nothing is cast under ``upcast="auto"``; storage never, under any policy.
    * Weight-only schemes in compressed form are decompressed in :meth:`before_training` with
      compressed-tensors' ``decompress_module`` (what its own first-forward hook does), so peft
      can wrap the layers; the plan warns with the bytes. The compressed tensors are kept, and
      ``undo`` puts those very tensors back (re-compressing is not bit-exact: W8A16 in bf16 and
      NVFP4 round differently on the way back).
    * Schemes that quantize activations (FP8, FP8_DYNAMIC, INT8_W8A8, NVFP4, KV-cache schemes)
      are refused: compressed-tensors 0.20.1 fake-quantizes them under ``torch.no_grad``.
    """

    name: ClassVar[str] = "compressed_tensors"
    priority: ClassVar[int] = 0
    install_hint: ClassVar[str] = "pip install compressed-tensors"
    requires: ClassVar[tuple[str, ...]] = ("compressed_tensors",)
    quant_methods: ClassVar[frozenset[str]] = frozenset({"compressed-tensors", "compressed_tensors"})
    method_facts: ClassVar[Mapping[str, MethodFacts]] = {
        "compressed-tensors": MethodFacts(
            "weight_packed int32/uint8 with weight_scale (float, float8) or float8 weight",
            "weight-only schemes yes (decompressed before training, the bytes in the plan); activation-quantized "
            "schemes refused (fake-quantized under no_grad)",
            "W4A16, W8A16, NVFP4A16 and FP8 layers built on CPU with compressed-tensors 0.20.1 itself",
        )
    }

    def detect(self, model: nn.Module) -> str | None:
        """The transformers quantizer or config (``quant_method`` ``"compressed-tensors"``),
        else the layers :meth:`find_layers` yields, counted with their formats and statuses."""

        def layers(m: nn.Module) -> str | None:
            found = list(self.find_layers(m))
            if not found:
                return None
            kinds = sorted({f"{_format(x) or 'format unknown'}, {_status(x) or 'status unknown'}" for _n, x in found})
            return f"{count_reason(len(found), 'compressed-tensors')} ({'; '.join(kinds)})"

        return detect_in_tiers(model, self.quant_methods, layers)

    def find_layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """Modules whose weights compressed-tensors quantized (a ``quantization_scheme`` with
        ``weights``), whatever their class (``nn.Linear``, ``nn.Embedding``)."""
        if loaded_module("compressed_tensors") is None:  # no module can hold a scheme without it
            return iter(())
        return ((n, m) for n, m in model.named_modules() if _weight_scheme(m) is not None)

    def is_quantized_param(self, name: str, param: nn.Parameter, module: nn.Module) -> bool:
        """:data:`STORAGE_NAMES` (and any ``*_scale`` / ``*_zero_point`` / ``*_packed``) on a
        module with a ``quantization_scheme``; ``weight`` of a compressed or decompressed
        layer; elsewhere the shared rule."""
        leaf = name.rpartition(".")[2]
        if _scheme(module) is not None and (leaf in STORAGE_NAMES or leaf.endswith(STORAGE_LEAF_SUFFIXES)):
            return True
        if leaf == "weight" and _holds_quantized_weight(module):
            return True
        return super().is_quantized_param(name, param, module)

    def compute_dtype(self, model: nn.Module) -> torch.dtype | None:
        """The floating dtype holding most bytes of the model's non-storage parameters (the
        dtype it was loaded in); ``None`` without compressed-tensors layers."""
        if not any(self.find_layers(model)):
            return None
        return dominant_float_dtype(model, self.is_quantized_param)

    def input_dtype(self, module: nn.Module) -> torch.dtype | None:
        """The dtype of a compressed or decompressed layer's dense weight, which its input must
        have (``F.linear``): ``weight_scale``'s dtype, or bfloat16 for :data:`BF16_FORMATS`
        (an NVFP4 layer of an fp32 model computes in bf16)."""
        return _dense_dtype(module) if _holds_quantized_weight(module) else None

    def check_trainable(self, model: nn.Module) -> None:
        """Refuse activation-quantized schemes; check the library is there to decompress.

        Raises:
            NotTrainableError: A module quantizes its input or output activations
                (compressed-tensors 0.20.1 ``forward_quantize`` runs ``fake_quantize``, decorated
                ``@torch.no_grad()``, so no gradient passes the layer), or the transformers
                quantizer says ``is_trainable`` is False (the FP8 kernel path).
            BackendUnavailableError: Layers must be decompressed and compressed-tensors is
                not installed.
        """
        quantized = [(n, m) for n, m in model.named_modules() if _quantizes_activations(m)]
        if quantized:
            first, module = quantized[0]
            raise NotTrainableError(
                f"{len(quantized)} compressed-tensors module(s) (first: {first!r}, scheme: "
                f"{_describe(_scheme(module))}) quantize activations. compressed-tensors 0.20.1 fake-quantizes "
                "them in forward_quantize under @torch.no_grad(), so no gradient flows through these layers to "
                "their input: LoRA adapters before them (e.g. on q_proj and v_proj, which feed o_proj) get no "
                "gradient at all. Nothing was changed. Use a weight-only scheme (W4A16, W8A16, NVFP4A16), or "
                "load the checkpoint with CompressedTensorsConfig(dequantize=True) to train in the model's dtype."
            )
        super().check_trainable(model)
        if any(_needs_decompression(m) for _n, m in self.find_layers(model)):
            self.require("decompressing compressed-tensors layers so that adapters can wrap them")

    def plan_warnings(self, model: nn.Module) -> list[str]:
        """The layers :meth:`before_training` will decompress, with the bytes it adds and keeps."""
        packed = [m for _n, m in self.find_layers(model) if _needs_decompression(m)]
        if not packed:
            return []
        dense, scales, kept = _decompression_bytes(packed)
        dtypes = ", ".join(sorted({str(_dense_dtype(m)) for m in packed}))
        formats = ", ".join(sorted({_format(m) or "format unknown" for m in packed}))
        extra = f" and {scales:,} bytes of bfloat16 copies of their scales" if scales else ""
        return [
            f"{len(packed)} compressed-tensors layer(s) are compressed ({formats}): peft cannot wrap a layer "
            "without a floating weight and the compressed forward cannot run. prepare decompresses them with "
            f"compressed-tensors (as its own first-forward hook would) to dense {dtypes} weights, adding "
            f"{dense + scales:,} bytes ({dense:,} bytes of dense weights{extra}), and keeps the {kept:,} bytes "
            "of compressed tensors they replace so that undo() restores them bit for bit. The dense weights "
            "are frozen storage."
        ]

    def fixup_bytes(self, model: nn.Module) -> int:
        """Dense weights and bfloat16 scale copies added, compressed tensors taken out of the
        model (kept aside for undo), by :meth:`before_training`."""
        packed = [m for _n, m in self.find_layers(model) if _needs_decompression(m)]
        if not packed:
            return 0
        dense, scales, kept = _decompression_bytes(packed)
        return dense + scales - kept

    def before_training(self, model: nn.Module) -> UndoFn | None:
        """Decompress the compressed layers (see :meth:`plan_warnings`) and take the library's
        first-forward hook off. Returns the undo: the very compressed tensors, status, format
        and hook put back."""
        layers = [(n, m) for n, m in self.find_layers(model) if _needs_decompression(m)]
        if not layers:
            return None
        self.require("decompressing compressed-tensors layers so that adapters can wrap them")
        undo = _decompress(layers, model)
        logger.info("Decompressed %d compressed-tensors layers so that adapters can wrap them", len(layers))
        return undo
