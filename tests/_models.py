"""Tiny models shared by the tests (the fixtures of ../shared/cases/README.md)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

# transformers 5.24 _activation_checkpointing_enable calls enable_input_require_grads for a model
# whose main_input_name is "input_ids"; transformers 4.57's gradient_checkpointing_enable does not
ENABLE_ADDS_INPUT_GRAD_HOOK = int(transformers.__version__.split(".")[0]) >= 5

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=1000,
)
LORA_TARGETS = ["q_proj", "v_proj"]


def tiny_config(**overrides: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY, **overrides})


def tiny_llama(dtype: torch.dtype = torch.bfloat16, seed: int = 0, **overrides: Any) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides)).to(dtype)  # type: ignore[arg-type]
    model.eval()
    return model  # type: ignore[no-any-return]


@functools.cache
def saved_tiny(root: str, dtype_name: str = "bfloat16", tie: bool = False) -> str:
    """Save the tiny model once per session under ``root``; returns the directory."""
    dtype = getattr(torch, dtype_name)
    path = Path(root) / f"tiny-{dtype_name}{'-tied' if tie else ''}"
    if not (path / "config.json").exists():
        tiny_llama(dtype, tie_word_embeddings=tie).save_pretrained(path)  # type: ignore[operator]
    return str(path)


def bnb4_config(**kw: Any) -> Any:
    from transformers import BitsAndBytesConfig

    args: dict[str, Any] = dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    args.update(kw)
    return BitsAndBytesConfig(**args)  # type: ignore[no-untyped-call]


def load(path: str, dtype: torch.dtype = torch.bfloat16, quantization_config: Any = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    # passing quantization_config=None explicitly would make transformers 5.24 reload a saved
    # pre-quantized checkpoint as plain nn.Linear with random weights, so pass it only when given
    extra: dict[str, Any] = {} if quantization_config is None else {"quantization_config": quantization_config}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu", **extra)


def add_lora(model: nn.Module, r: int = 8) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def standard_batch(batch: int = 2, seq: int = 32, vocab: int = 1000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def standard_step(model: nn.Module, lr: float = 1e-3) -> tuple[float, dict[str, torch.Tensor | None]]:
    """Train mode, one forward/backward on the standard batch, one AdamW step.

    Returns the loss and each LoRA parameter's gradient (cloned before the step)."""
    model.train()
    ids = standard_batch()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {
        n: (p.grad.detach().clone() if p.grad is not None else None)
        for n, p in model.named_parameters()
        if "lora_" in n
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.optim.AdamW(trainable, lr=lr).step()
    return float(out.loss.detach()), grads


def grad_counts(grads: dict[str, torch.Tensor | None]) -> tuple[int, int, int]:
    """(LoRA tensors, with a grad, lora_B grads that are non-zero)."""
    with_grad = sum(1 for g in grads.values() if g is not None)
    nonzero_b = sum(1 for n, g in grads.items() if "lora_B" in n and g is not None and bool(g.abs().sum() > 0))
    return len(grads), with_grad, nonzero_b


def param_bytes(model: nn.Module) -> int:
    from kbitprep.backends.base import tensor_nbytes

    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += tensor_nbytes(p)
    return total


def storage_digest(model: nn.Module, backend: Any) -> dict[str, str]:
    """sha256 of every quantized storage tensor (parameters and buffers), by name."""
    out: dict[str, str] = {}
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        mod = modules.get(name.rpartition(".")[0], model)
        if backend.is_quantized_param(name, p, mod):
            out[name] = _digest(p)
    for name, b in model.named_buffers():
        if not b.is_floating_point() or "scales" in name or "W_q" in name:
            out[name] = _digest(b)
    return out


def _digest(t: torch.Tensor) -> str:
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = inner()
        return "|".join(_digest(getattr(t, n)) for n in names)
    data = t.detach().contiguous().view(torch.uint8) if t.dtype != torch.bool else t.detach().to(torch.uint8)
    return hashlib.sha256(data.cpu().numpy().tobytes()).hexdigest() + f":{t.dtype}:{tuple(t.shape)}"


def snapshot(model: nn.Module) -> dict[str, tuple[torch.dtype, bool, torch.Tensor]]:
    return {n: (p.dtype, p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}


def hook_count(module: nn.Module) -> int:
    return len(module._forward_hooks)


def checkpointing_on(model: nn.Module) -> bool:
    """``is_activation_checkpointing`` on transformers 5; ``is_gradient_checkpointing`` on 4.57,
    where it is the only name and not deprecated."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


def enable_checkpointing(model: nn.Module, kwargs: dict[str, Any] | None = None) -> None:
    """Turn checkpointing on as a user would, with the name that exists without a deprecation
    warning (transformers 5 ``activation_checkpointing_enable``, 4.57 ``gradient_checkpointing_enable``)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]


def transformers_major() -> int:
    """Major version of the installed transformers (read from metadata, nothing imported)."""
    from importlib.metadata import version

    return int(version("transformers").split(".")[0])
