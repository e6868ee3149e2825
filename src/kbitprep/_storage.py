"""Quantized storage and byte counts: which tensors are quantized storage (never cast, never
trained), and how many bytes a tensor, a quantized tensor subclass or a model really holds.

Used by the strategies (through :mod:`kbitprep.backends.base`, which re-exports these names for
plugins), the planner steps, the demo and the conformance kit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "STORAGE_LEAF_NAMES",
    "STORAGE_LEAF_SUFFIXES",
    "dominant_float_dtype",
    "find_storage",
    "is_storage_dtype",
    "is_storage_tensor",
    "is_wrapper_subclass",
    "model_param_bytes",
    "tensor_nbytes",
]


def _storage_float_dtypes() -> frozenset[torch.dtype]:
    names = (
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
    )
    return frozenset(d for n in names if isinstance(d := getattr(torch, n, None), torch.dtype))


_STORAGE_FLOAT_DTYPES = _storage_float_dtypes()


def is_storage_dtype(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` only ever holds quantized storage: integers, booleans, and the
    float8 (e4m3/e5m2), e8m0 and float4 formats torch 2.13 defines. No module computes in
    these, so they are never cast, trained or read as a compute dtype."""
    return dtype in _STORAGE_FLOAT_DTYPES or not (dtype.is_floating_point or dtype.is_complex)


STORAGE_LEAF_NAMES = frozenset(
    {
        "activation_scale",
        "input_global_scale",
        "input_scale",
        "input_zero_point",
        "output_scale",
        "packed_weight",
        "qzeros",
        "scale",
        "scales",
        "weight_global_scale",
        "weight_packed",
        "weight_scale",
        "weight_scale_2",
        "weight_scale_inv",
        "weight_zero_point",
        "zero_point",
        "zeros",
    }
)
"""Leaf names of quantization metadata that layers keep in a float dtype: transformers 5.24
``FP8Linear.weight_scale_inv`` / ``activation_scale`` and ``FbgemmFp8Linear.weight_scale``,
compressed-tensors 0.20 ``weight_scale`` / ``weight_zero_point`` / ``weight_global_scale`` /
``input_scale`` / ``weight_packed``, GPTQ/AWQ ``scales`` / ``qzeros``, ModelOpt ``weight_scale_2``."""

STORAGE_LEAF_SUFFIXES = ("_scale", "_scale_inv", "_scales", "_zero_point", "_global_scale", "_packed")
"""Suffixes of the same metadata on fused layers, e.g. transformers 5.24
``FbgemmFp8Llama4TextExperts.gate_up_proj_scale``."""


_INDEX_DTYPES = (torch.int64, torch.bool)  # position_ids, token_type_ids, causal masks: not storage


def _holds_primary_storage(module: nn.Module) -> bool:
    """Whether ``module`` itself (not its children) holds a storage-dtype or subclass tensor."""
    own = [
        *module._parameters.values(),
        *(b for b in module._buffers.values() if b is not None and b.dtype not in _INDEX_DTYPES),
    ]
    return any(t is not None and (is_storage_dtype(t.dtype) or is_wrapper_subclass(t)) for t in own)


def is_storage_tensor(name: str, tensor: torch.Tensor, module: nn.Module) -> bool:
    """Whether ``tensor`` (a parameter or buffer named ``name``, owned by ``module``) is
    quantized storage under the rule every backend shares.

    Storage is:

    * a tensor whose dtype only holds quantized data (:func:`is_storage_dtype`): integers,
      booleans, float8 ``e4m3fn``/``e4m3fnuz``/``e5m2``/``e5m2fnuz``, ``float8_e8m0fnu`` and
      ``float4_e2m1fn_x2``;
    * a tensor subclass (:func:`is_wrapper_subclass`: torchao, bitsandbytes ``Params4bit``);
    * a float tensor holding quantization metadata, named like a scale, zero point, global
      scale or packed tensor (:data:`STORAGE_LEAF_NAMES`, :data:`STORAGE_LEAF_SUFFIXES`),
      but only when ``module`` itself also holds a tensor of the first two kinds. A plain
      module's ``layer_scale`` therefore stays an ordinary parameter.

    Args:
        name: The tensor's name, qualified (``"model.layers.0.q_proj.weight_scale"``) or leaf.
        tensor: The parameter or buffer.
        module: The module that owns it directly.

    Returns:
        ``True`` when the tensor must never be cast, trained, or read as a compute dtype.
    """
    if is_storage_dtype(tensor.dtype) or is_wrapper_subclass(tensor):
        return True
    leaf = name.rpartition(".")[2]
    named_like = leaf in STORAGE_LEAF_NAMES or leaf.endswith(STORAGE_LEAF_SUFFIXES)
    return named_like and _holds_primary_storage(module)


def find_storage(
    model: nn.Module, is_storage: Callable[[str, nn.Parameter, nn.Module], bool] | None = None
) -> str | None:
    """Count the quantized storage ``model`` holds; ``None`` when it holds none.

    Parameters count when ``is_storage(name, param, owner)`` says so (default
    :func:`is_storage_tensor`). Buffers count under :func:`is_storage_tensor`, except int64 and
    bool buffers, which plain models use for indices and masks (``position_ids``, causal masks).

    Returns:
        ``"N tensors of quantized storage (dtype, ...)"`` or ``None``.
    """
    check = is_storage or is_storage_tensor
    modules = dict(model.named_modules(remove_duplicate=False))
    found: list[torch.dtype] = []
    for name, param in model.named_parameters():
        if check(name, param, modules.get(name.rpartition(".")[0], model)):
            found.append(param.dtype)
    for name, buf in model.named_buffers():
        owner = modules.get(name.rpartition(".")[0], model)
        if buf.dtype not in _INDEX_DTYPES and is_storage_tensor(name, buf, owner):
            found.append(buf.dtype)
    if not found:
        return None
    kinds = ", ".join(sorted({str(d).removeprefix("torch.") for d in found}))
    return f"{len(found)} tensor{'s' if len(found) != 1 else ''} of quantized storage ({kinds})"


def is_wrapper_subclass(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a tensor subclass other than plain ``Tensor`` / ``nn.Parameter``.

    torchao's quantized tensors report a float dtype and bitsandbytes' ``Params4bit`` may
    be stored as bf16; neither may be treated as an ordinary float parameter.
    """
    return type(tensor) not in (torch.Tensor, nn.Parameter) or hasattr(tensor, "__tensor_flatten__")


def tensor_nbytes(tensor: torch.Tensor) -> int:
    """Bytes of the real storage of ``tensor``: numel × element size, or for a wrapper subclass
    (``__tensor_flatten__``, e.g. torchao ``Int8Tensor``) the sum over its inner tensors."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, nn.Parameter):
        try:
            names, _ctx = flatten()
            inner = [getattr(tensor, n) for n in names]
            return sum(tensor_nbytes(t) for t in inner if isinstance(t, torch.Tensor))
        except Exception:  # a subclass whose flatten misbehaves: fall back to the outer view
            pass
    return tensor.numel() * tensor.element_size()


def dominant_float_dtype(
    model: nn.Module, is_storage: Callable[[str, nn.Parameter, nn.Module], bool]
) -> torch.dtype | None:
    """The floating dtype holding most bytes of ``model``'s parameters that are not storage by
    ``is_storage(name, param, owner)`` (the dtype the model was loaded in); ``None`` without any."""
    modules = dict(model.named_modules())
    by_bytes: Counter[torch.dtype] = Counter()
    for name, param in model.named_parameters():
        owner = modules.get(name.rpartition(".")[0], model)
        if param.is_floating_point() and not is_storage(name, param, owner):
            by_bytes[param.dtype] += tensor_nbytes(param)
    return by_bytes.most_common(1)[0][0] if by_bytes else None


def model_param_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters, each tensor once (tied weights counted once), by
    :func:`tensor_nbytes` (the real storage of quantized subclasses)."""
    return sum(tensor_nbytes(p) for p in model.parameters())  # parameters() yields each tensor once
