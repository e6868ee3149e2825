"""A toy quantized linear layer: int8 weight, one floating scale per output row.

The matmul is a custom ``torch.autograd.Function`` whose backward returns the gradient of the
input only (the int8 weight and its scale are frozen storage), which is exactly what an adapter
placed before or after the layer needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["ToyQuantLinear", "quantize"]


class _DequantMatmul(torch.autograd.Function):
    """``y = x @ (qweight * scale).T`` computed in ``x``'s dtype; backward to ``x`` only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(qweight, scale)
        weight = qweight.to(x.dtype) * scale.to(x.dtype)[:, None]
        return x @ weight.T

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        qweight, scale = ctx.saved_tensors
        weight = qweight.to(grad_out.dtype) * scale.to(grad_out.dtype)[:, None]
        return grad_out @ weight, None, None


class ToyQuantLinear(nn.Module):
    """Weight-only int8 linear layer.

    Attributes:
        weight: ``int8`` parameter ``(out_features, in_features)``, ``requires_grad=False``.
        scale: Floating parameter ``(out_features,)`` in ``compute_dtype``: the absmax of each
            row / 127. Floating, yet quantized storage: it belongs to ``weight``.
        bias: Floating parameter ``(out_features,)`` or None; an ordinary parameter.
        compute_dtype: The dtype the matmul runs in; inputs are cast to it, and the output has it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False
        )
        self.scale = nn.Parameter(torch.ones(out_features, dtype=compute_dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None) -> ToyQuantLinear:
        """Quantize ``linear`` (round to nearest, symmetric, per output row)."""
        w = linear.weight.detach().float()
        dtype = compute_dtype or linear.weight.dtype
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype, w.device)
        absmax = w.abs().amax(dim=1).clamp(min=1e-8)
        layer.weight.data = torch.round(w / (absmax[:, None] / 127)).clamp(-127, 127).to(torch.int8)
        layer.scale.data = (absmax / 127).to(dtype)
        if linear.bias is not None and layer.bias is not None:
            layer.bias.data = linear.bias.detach().to(dtype)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = _DequantMatmul.apply(x.to(self.compute_dtype), self.weight, self.scale)  # type: ignore[no-untyped-call]
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, compute_dtype={self.compute_dtype}"


def quantize(model: nn.Module, skip: Iterable[str] = ("lm_head",)) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (except names ending in ``skip``) in place.

    Sets ``model.quantization_method = "toyquant"`` and ``model.is_quantized = True``, the
    attributes a transformers quantizer sets, so detection finds the method at its second tier.
    """
    skip = tuple(skip)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not any(full == s or full.endswith("." + s) for s in skip):
                setattr(module, child_name, ToyQuantLinear.from_linear(child))
    setattr(model, "quantization_method", "toyquant")  # noqa: B010 - not a declared nn.Module field
    setattr(model, "is_quantized", True)  # noqa: B010
    return model
