"""The tiny Llama the suite runs on: its config, building, saving and loading it, its parameter
and layer names, the standard batch, checkpointing toggles and the transformers version."""

from __future__ import annotations

import functools
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

# the tiny gpt-oss (GptOssConfig): the tiny Llama's sizes with 4 local experts (2 per token) of
# width 64, grouped-query attention and one sliding-window layer
GPT_OSS: dict[str, Any] = {
    **TINY, "intermediate_size": 64, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4,
    "num_experts_per_tok": 2, "max_position_embeddings": 64, "layer_types": ["sliding_attention", "full_attention"],
    "sliding_window": 16,
}  # fmt: skip


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


def load(path: str, dtype: torch.dtype = torch.bfloat16, quantization_config: Any = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    # passing quantization_config=None explicitly would make transformers 5.24 reload a saved
    # pre-quantized checkpoint as plain nn.Linear with random weights, so pass it only when given
    extra: dict[str, Any] = {} if quantization_config is None else {"quantization_config": quantization_config}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu", **extra)


def from_pretrained(path: str, dtype: torch.dtype, **kw: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` on CPU.

    No ``quantization_config=None`` is passed: in transformers 5.24 an explicit None makes a
    pre-quantized GPTQ checkpoint load as plain ``nn.Linear`` with random weights.
    """
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu", **kw)


def standard_batch(batch: int = 2, seq: int = 32, vocab: int = 1000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def eval_forward(model: nn.Module) -> None:
    """Eval mode and a no-grad forward on a short batch (what latches gptqmodel's kernels into
    inference mode)."""
    model.eval()
    with torch.no_grad():
        model(input_ids=standard_batch(1, 8))


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


NORM_NAMES = (
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.1.input_layernorm.weight",
    "model.layers.1.post_attention_layernorm.weight",
    "model.norm.weight",
)
PLAIN_NAMES = ("model.embed_tokens.weight", *NORM_NAMES, "lm_head.weight")
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
N_LINEARS = 14
N_PLAIN = 7  # embed_tokens, 5 RMSNorm weights, lm_head


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n.rpartition(".")[2] in DECODER_LINEARS]
