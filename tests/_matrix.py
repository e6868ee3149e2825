"""The architecture × quantization matrix the option invariants are checked over (issue 16).

Architectures: Llama (untied embeddings), Qwen2 and Gemma2 (tied), T5 (encoder-decoder), a
Llava-style VLM (CLIP vision tower + Llama), Whisper (audio encoder-decoder) and a Llama sequence
classifier. Quantizations: bitsandbytes nf4 with fp32 or bf16 compute (bf16 checkpoint),
LLM.int8 on an fp16 checkpoint, and the unquantized bf16 checkpoint. Each architecture is saved
once per test session under the session's model folder and loaded by transformers as a user
would load it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from _models import TINY
from _quantized import bnb4_config

VOCAB = 1000
IMAGE_TOKEN = 999


@dataclass(frozen=True)
class Arch:
    """One architecture of the matrix.

    Attributes:
        name: Short name (test ids).
        model_class: transformers class name loaded with ``from_pretrained``.
        build: Builds the randomly initialised fp32 model (seeded by the caller).
        lora_targets: peft ``target_modules``.
        head_and_embeddings: ``keep_in_low_precision`` naming the output head and the input
            embeddings (tied together on Qwen2 / Gemma2).
        subtree: ``keep_in_low_precision`` naming one whole parent module (a block or a tower).
        head: The output module's short name (``modules_to_save`` target).
        batch: Builds the training batch, given the dtype floating inputs arrive in.
    """

    name: str
    model_class: str
    build: Callable[[], nn.Module]
    lora_targets: tuple[str, ...]
    head_and_embeddings: tuple[str, ...]
    subtree: tuple[str, ...]
    head: str
    batch: Callable[[torch.dtype], dict[str, torch.Tensor]]


def _ids(n: int, seq: int, high: int = IMAGE_TOKEN) -> torch.Tensor:
    return torch.randint(1, high, (n, seq), generator=torch.Generator().manual_seed(0))


def _lm_batch(_features: torch.dtype) -> dict[str, torch.Tensor]:
    ids = _ids(2, 12)
    return {"input_ids": ids, "labels": ids}


def _t5_batch(_features: torch.dtype) -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(2, 12), "labels": _ids(2, 8)}


def _whisper_batch(features: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_features": torch.randn(2, 80, 128, generator=g).to(features), "labels": _ids(2, 8)}


def _llava_batch(features: torch.dtype) -> dict[str, torch.Tensor]:
    ids = _ids(2, 20)
    ids[:, 2:18] = IMAGE_TOKEN  # 16 image tokens, as image_seq_length
    g = torch.Generator().manual_seed(0)
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 32, 32, generator=g).to(features), "labels": ids}


def _cls_batch(_features: torch.dtype) -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(2, 12), "labels": torch.tensor([0, 2])}


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**TINY))  # type: ignore[arg-type]


def _qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**{**TINY, "num_key_value_heads": 2}, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg)  # type: ignore[arg-type]


def _gemma2() -> nn.Module:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(**{**TINY, "num_key_value_heads": 2}, head_dim=16, tie_word_embeddings=True)
    return Gemma2ForCausalLM(cfg)  # type: ignore[arg-type]


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return T5ForConditionalGeneration(cfg)  # type: ignore[arg-type]


def _whisper() -> nn.Module:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(
        vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
        max_source_positions=64, max_target_positions=64, decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return WhisperForConditionalGeneration(cfg)  # type: ignore[arg-type]


def _llava() -> nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**TINY),  # type: ignore[arg-type]
        image_token_index=IMAGE_TOKEN,
        image_seq_length=16,
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(cfg)  # type: ignore[arg-type]


def _classifier() -> nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(**TINY, num_labels=3, pad_token_id=0)  # type: ignore[arg-type]
    return LlamaForSequenceClassification(cfg)  # type: ignore[arg-type]


_LM = ("q_proj", "v_proj")
ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("llama", "LlamaForCausalLM", _llama, _LM, ("lm_head", "embed_tokens"), ("layers.1",), "lm_head", _lm_batch),
        Arch("qwen2", "Qwen2ForCausalLM", _qwen2, _LM, ("lm_head", "embed_tokens"), ("layers.0",), "lm_head", _lm_batch),
        Arch("gemma2", "Gemma2ForCausalLM", _gemma2, _LM, ("lm_head", "embed_tokens"), ("model.norm",), "lm_head", _lm_batch),
        Arch("t5", "T5ForConditionalGeneration", _t5, ("q", "v"), ("lm_head", "shared"), ("encoder",), "lm_head", _t5_batch),
        Arch("llava", "LlavaForConditionalGeneration", _llava, _LM, ("lm_head", "embed_tokens"), ("vision_tower",), "lm_head", _llava_batch),
        Arch("whisper", "WhisperForConditionalGeneration", _whisper, _LM, ("proj_out", "embed_tokens"), ("encoder",), "proj_out", _whisper_batch),
        Arch("classifier", "LlamaForSequenceClassification", _classifier, _LM, ("score", "embed_tokens"), ("layers.0",), "score", _cls_batch),
    )
}  # fmt: skip

# quantization name -> (checkpoint dtype, quantization config factory or None)
QUANTS: dict[str, tuple[torch.dtype, Callable[[], Any] | None]] = {
    "nf4-fp32": (torch.bfloat16, lambda: bnb4_config(bnb_4bit_compute_dtype=torch.float32)),
    "nf4-bf16": (torch.bfloat16, lambda: bnb4_config(bnb_4bit_compute_dtype=torch.bfloat16)),
    "int8": (torch.float16, lambda: _bnb8_config()),
    "bf16": (torch.bfloat16, None),
}


def _bnb8_config() -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]


@functools.cache
def _saved(root: str, arch: str, dtype: torch.dtype) -> str:
    path = Path(root) / f"matrix-{arch}-{str(dtype).removeprefix('torch.')}"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        ARCHS[arch].build().to(dtype).save_pretrained(path)  # type: ignore[operator]
    return str(path)


def load_matrix_model(root: str, arch: str, quant: str) -> nn.Module:
    """``arch`` saved once under ``root`` in the checkpoint dtype of ``quant``, loaded on the CPU
    with its quantization (in eval mode, as ``from_pretrained`` returns it)."""
    import transformers

    dtype, config = QUANTS[quant]
    cls = getattr(transformers, ARCHS[arch].model_class)
    extra: dict[str, Any] = {} if config is None else {"quantization_config": config()}
    model: nn.Module = cls.from_pretrained(_saved(root, arch, dtype), dtype=dtype, device_map="cpu", **extra)
    return model
