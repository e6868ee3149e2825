"""Model builders for the regression cases (../../shared/cases): one per backend that runs on CPU.

Each builder returns a fresh model, loaded from the session's saved tiny Llama (README of the
cases): bf16, hidden 64, 2 layers, vocab 1000, untied. Builders skip (naming the package) when a
backend's library is not installed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from _models import bnb4_config, load, saved_tiny

NORM_NAMES = (
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.1.input_layernorm.weight",
    "model.layers.1.post_attention_layernorm.weight",
    "model.norm.weight",
)
PLAIN_NAMES = ("model.embed_tokens.weight", *NORM_NAMES, "lm_head.weight")


def need(module: str, package: str | None = None) -> None:
    """Skip when ``module`` is not installed (the reason names the package)."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{package or module} is not installed")


def need_strategy(name: str) -> None:
    """Skip when the kbitprep strategy module for ``name`` does not exist in this checkout."""
    if importlib.util.find_spec(f"kbitprep.backends.{name}") is None:
        pytest.skip(f"kbitprep.backends.{name} is not in this checkout yet")


def plain(root: str) -> Any:
    return load(saved_tiny(root))


def generic(root: str) -> Any:
    """A bf16 model flagged as quantized by a method kbitprep has no strategy for ("vptq"), with
    an int8 buffer standing in for that method's storage: a label with no storage behind it is
    an unquantized model (issue 12), so the storage is what makes this "generic"."""
    model = plain(root)
    model.is_quantized = True
    model.quantization_method = "vptq"
    model.model.layers[0].mlp.register_buffer("codes", torch.zeros(64, 8, dtype=torch.int8))
    return model


def bnb4(root: str, **kw: Any) -> Any:
    need("bitsandbytes")
    return load(saved_tiny(root), quantization_config=bnb4_config(**kw))


def bnb4_bf16_storage(root: str) -> Any:
    return bnb4(root, bnb_4bit_quant_storage=torch.bfloat16)


def bnb8(root: str) -> Any:
    need("bitsandbytes")
    from transformers import BitsAndBytesConfig

    return load(saved_tiny(root), quantization_config=BitsAndBytesConfig(load_in_8bit=True))  # type: ignore[no-untyped-call]


def torchao_hf(root: str, config: Any = None) -> Any:
    """(C07a) loaded through transformers with ``TorchAoConfig``; lm_head stays bf16."""
    need("torchao")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return load(saved_tiny(root), quantization_config=TorchAoConfig(config or Int8WeightOnlyConfig()))


def torchao_direct(root: str, config: Any = None) -> Any:
    """(C07b) ``quantize_`` applied directly: no transformers attributes; lm_head quantized too."""
    need("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = plain(root)
    quantize_(model, config or Int8WeightOnlyConfig())
    return model


def intx_config() -> Any:
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))  # type: ignore[attr-defined]


def torchao_direct_intx(root: str) -> Any:
    """(C07c) ``quantize_`` with intx int4 weight-only."""
    need("torchao")
    return torchao_direct(root, intx_config())


def hqq_direct(root: str) -> Any:
    """Decoder linears swapped for ``HQQLinear`` (backend PYTORCH), no transformers attributes."""
    need("hqq")
    need_strategy("hqq")
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

    HQQLinear.set_backend(HQQBackend.PYTORCH)
    model = plain(root)
    cfg = BaseQuantizeConfig(nbits=4, group_size=64)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    q = HQQLinear(child, cfg, compute_dtype=torch.bfloat16, device="cpu")
                    setattr(parent, child_name, q)
    return model


# every backend whose real layers run on CPU; gptq / aqlm / eetq are covered by their own cases
CPU_KINDS: dict[str, Callable[[str], Any]] = {
    "none": plain,
    "generic": generic,
    "bnb4": bnb4,
    "bnb4_bf16_storage": bnb4_bf16_storage,
    "bnb8": bnb8,
    "torchao_hf": torchao_hf,
    "torchao_direct": torchao_direct,
    "torchao_direct_intx": torchao_direct_intx,
    "hqq": hqq_direct,
}
EXPECTED_BACKEND = {
    "none": "none",
    "generic": "generic",
    "bnb4": "bitsandbytes",
    "bnb4_bf16_storage": "bitsandbytes",
    "bnb8": "bitsandbytes",
    "torchao_hf": "torchao",
    "torchao_direct": "torchao",
    "torchao_direct_intx": "torchao",
    "hqq": "hqq",
}
QUANTIZED_KINDS = [k for k in CPU_KINDS if k not in ("none",)]


def quantized_tensors(model: Any) -> dict[str, torch.Tensor]:
    """Quantized storage by the test's own ground truth (layer and tensor classes), not by any
    kbitprep strategy: bitsandbytes Params4bit / Int8Params, torchao subclasses, HQQ ``W_q``, and
    integer buffers."""
    classes: list[type] = []
    try:
        import bitsandbytes as bnb

        classes += [bnb.nn.Params4bit, bnb.nn.Int8Params]  # type: ignore[attr-defined]
    except ImportError:
        pass
    try:
        from torchao.utils import TorchAOBaseTensor

        classes.append(TorchAOBaseTensor)
    except ImportError:
        pass
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if isinstance(p, tuple(classes)) or name.endswith("W_q") or not p.is_floating_point():
            out[name] = p
    for name, b in model.named_buffers():
        if not b.is_floating_point():
            out[name] = b
    return out


def storage_record(t: torch.Tensor) -> tuple[Any, ...]:
    """(class, dtype, shape, bytes, requires_grad, content) of one quantized tensor."""
    from _models import _digest
    from kbitprep.backends.base import tensor_nbytes

    return (type(t).__name__, t.dtype, tuple(t.shape), tensor_nbytes(t), t.requires_grad, _digest(t))


def floating_params(model: Any) -> dict[str, nn.Parameter]:
    """Plain floating parameters (not quantized storage by the test's ground truth)."""
    q = quantized_tensors(model)
    return {n: p for n, p in model.named_parameters() if n not in q}


def model_state(model: Any) -> dict[str, Any]:
    """Everything prepare may touch: parameter class/dtype/shape/device/requires_grad/bytes, hooks
    (forward, pre-forward) per module, checkpointing flags, use_cache and train mode."""
    from _models import _digest

    params = {
        n: (
            type(p).__name__,
            p.dtype,
            tuple(p.shape),
            p.device.type,
            p.requires_grad,
            p.data_ptr() if p.device.type != "meta" else 0,
            _digest(p) if p.device.type != "meta" else "",
        )
        for n, p in model.named_parameters(remove_duplicate=False)
    }
    hooks = {
        n: (len(m._forward_hooks), len(m._forward_pre_hooks), getattr(m, "gradient_checkpointing", None), m.training)
        for n, m in model.named_modules()
    }
    config = getattr(model, "config", None)
    return {
        "params": params,
        "hooks": hooks,
        "use_cache": getattr(config, "use_cache", None),
        "require_grads_hooks": len(getattr(model, "_require_grads_hooks", []) or []),
    }


def forward_hook_total(model: Any) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def plan_dtype(p: Any, model: Any, name: str) -> torch.dtype:
    """The dtype the plan gives parameter ``name``: its cast target, else its current dtype."""
    for c in p.casts:
        if c.name == name or name in c.tied:
            return getattr(torch, c.to_dtype.removeprefix("torch."))  # type: ignore[no-any-return]
    return dict(model.named_parameters(remove_duplicate=False))[name].dtype  # type: ignore[no-any-return]


def plan_compute_dtype(p: Any, model: Any, module: str) -> torch.dtype:
    """The dtype module ``module`` computes in after the plan: its ``precision`` row's when the
    plan lists it (a weight stored narrower is brought up at use), else its weight's plan dtype."""
    for row in p.precision:
        if row.name == module:
            return getattr(torch, row.computes.removeprefix("torch."))  # type: ignore[no-any-return]
    return plan_dtype(p, model, f"{module}.weight")
