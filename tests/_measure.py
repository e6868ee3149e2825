"""Measuring a model: parameter bytes, storage digests and records, hook counts, the full state
prepare may touch, the dtypes a plan gives, and the dtype each layer's kernel receives."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from kbitprep.backends.base import model_param_bytes as param_bytes  # noqa: F401  (re-exported for the tests)


def storage_digest(model: nn.Module, backend: Any) -> dict[str, str]:
    """sha256 of every quantized storage tensor (parameters and buffers), by name."""
    out: dict[str, str] = {}
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        mod = modules.get(name.rpartition(".")[0], model)
        if backend.is_quantized_param(name, p, mod):
            out[name] = digest(p)
    for name, b in model.named_buffers():
        if not b.is_floating_point() or "scales" in name or "W_q" in name:
            out[name] = digest(b)
    return out


def digest(t: torch.Tensor) -> str:
    """sha256 of the bytes ``t`` stores (of each inner tensor of a wrapper subclass such as
    torchao's), with its dtype and shape."""
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = inner()
        return "|".join(digest(getattr(t, n)) for n in names)
    data = t.detach().contiguous().reshape(-1)
    raw = data.to(torch.uint8) if data.dtype == torch.bool else data.view(torch.uint8)
    return hashlib.sha256(raw.cpu().numpy().tobytes()).hexdigest() + f":{t.dtype}:{tuple(t.shape)}"


def storage_by_base_name(model: nn.Module, backend: Any) -> dict[str, str]:
    """:func:`storage_digest` keyed by the name in the unwrapped model, so digests taken
    before and after attaching LoRA (``base_model.model.`` prefix, ``.base_layer``) compare."""

    out = {}
    for name, d in storage_digest(model, backend).items():
        out[name.removeprefix("base_model.model.").replace(".base_layer.", ".")] = d
    return out


def storage_state(model: nn.Module, backend: Any) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, bool, str]]:
    """(dtype, shape, bytes, requires_grad, sha256) of every quantized storage parameter, by name
    in the unwrapped model."""
    from kbitprep.backends.base import tensor_nbytes

    modules = dict(model.named_modules())
    out = {}
    for name, p in model.named_parameters():
        owner = modules.get(name.rpartition(".")[0], model)
        if backend.is_quantized_param(name, p, owner):
            key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            out[key] = (p.dtype, tuple(p.shape), tensor_nbytes(p), p.requires_grad, digest(p))
    return out


def snapshot(model: nn.Module) -> dict[str, tuple[torch.dtype, bool, torch.Tensor]]:
    return {n: (p.dtype, p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}


def hook_count(module: nn.Module) -> int:
    return len(module._forward_hooks)


def embed_hooks(model: Any) -> tuple[int, int]:
    """(forward hooks, forward pre-hooks) on the model's input embedding."""
    embed = model.get_input_embeddings()
    return len(embed._forward_hooks), len(embed._forward_pre_hooks)


def forward_hook_total(model: Any) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


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
    from kbitprep.backends.base import tensor_nbytes

    return (type(t).__name__, t.dtype, tuple(t.shape), tensor_nbytes(t), t.requires_grad, digest(t))


def floating_params(model: Any) -> dict[str, nn.Parameter]:
    """Plain floating parameters (not quantized storage by the test's ground truth)."""
    q = quantized_tensors(model)
    return {n: p for n, p in model.named_parameters() if n not in q}


def model_state(model: Any) -> dict[str, Any]:
    """Everything prepare may touch: parameter class/dtype/shape/device/requires_grad/bytes, hooks
    (forward, pre-forward) per module, checkpointing flags, use_cache and train mode."""

    params = {
        n: (
            type(p).__name__,
            p.dtype,
            tuple(p.shape),
            p.device.type,
            p.requires_grad,
            p.data_ptr() if p.device.type != "meta" else 0,
            digest(p) if p.device.type != "meta" else "",
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


def plan_dtype(p: Any, model: Any, name: str) -> torch.dtype:
    """The dtype the plan gives parameter ``name``: its cast target, else its current dtype."""
    for c in p.casts:
        if c.name == name or name in c.tied:
            return c.to_dtype
    return dict(model.named_parameters(remove_duplicate=False))[name].dtype  # type: ignore[no-any-return]


def plan_compute_dtype(p: Any, model: Any, module: str) -> torch.dtype:
    """The dtype module ``module`` computes in after the plan: its ``precision`` row's when the
    plan lists it (a weight stored narrower is brought up at use), else its weight's plan dtype."""
    for row in p.precision:
        if row.name == module:
            return row.computes
    return plan_dtype(p, model, f"{module}.weight")


@contextlib.contextmanager
def kernel_inputs(layers: Sequence[nn.Module]) -> Iterator[list[torch.dtype]]:
    """Record the dtype of the first argument each layer's own ``forward`` receives.

    The layer class's ``forward`` is wrapped, not a forward pre-hook registered: a module
    ``prepare`` gave a compute-dtype rule casts its inputs inside its (sub)class's forward, after
    the pre-hooks run, so only the class's own forward sees what the kernel computes with.
    """
    seen: list[torch.dtype] = []
    classes = {getattr(type(m), "_kbitprep_original_class", type(m)) for m in layers}
    saved = {cls: cls.__dict__.get("forward") for cls in classes}

    def wrap(forward: Any) -> Any:
        def recorded(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if any(self is m for m in layers):
                seen.append(x.dtype)
            return forward(self, x, *args, **kwargs)

        return recorded

    for cls in classes:
        cls.forward = wrap(cls.forward)  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        for cls, forward in saved.items():
            if forward is None:
                del cls.forward
            else:
                cls.forward = forward  # type: ignore[method-assign]
