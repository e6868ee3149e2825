"""MoE models whose fused experts stay unquantized (issue 12, item 5).

transformers 5 stores a Mixtral layer's experts as two fused 3-D parameters
(``experts.gate_up_proj`` E x 2I x H and ``experts.down_proj`` E x H x I), not as ``nn.Linear``
modules, so its bitsandbytes 4-bit loader quantizes the attention projections and leaves the
experts in bf16. The plan must state the quantized share of the parameter bytes, and warn when the
16-bit weight matrices outweigh the quantized storage. Experts that *are* stored quantized
(bitsandbytes' ``replace_parameter_4bit`` parametrization, torchao ``Int8Tensor`` on the
``nn.Parameter``) are storage: never cast, never trainable.

Every expected byte count below is worked out here from the model's tensors, with this file's own
idea of what is quantized (``_truth``), never from kbitprep's inventory.

The tiny Mixtral: hidden 64, intermediate 128, 2 layers, 4 experts, vocab 1000, bf16. Per layer:
q/k/v/o 64x64, router 4x64, gate_up_proj 4x256x64, down_proj 4x64x128, two RMSNorms of 64.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from _lora import add_lora, grad_counts, standard_step
from _measure import digest
from _models import TINY, load, saved_tiny, transformers_major
from _plan_warnings import emitted_of, has_warning, warning_of
from _quantized import bnb4_config

pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install bitsandbytes)")

fused_experts = pytest.mark.skipif(
    transformers_major() < 5, reason="transformers 4 stores Mixtral experts as nn.Linear, which bitsandbytes quantizes"
)

MOE: dict[str, Any] = dict(
    TINY,
    num_local_experts=4,
    num_experts_per_tok=2,
)
EXPERTS = ("gate_up_proj", "down_proj")
WARNING = "Most weight bytes are not quantized"


@functools.cache
def _saved_moe(root: str) -> str:
    from transformers import MixtralConfig, MixtralForCausalLM

    path = Path(root) / "tiny-mixtral-bfloat16"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        MixtralForCausalLM(MixtralConfig(**MOE)).to(torch.bfloat16).save_pretrained(path)
    return str(path)


def _bnb4_moe(root: str) -> nn.Module:
    return load(_saved_moe(root), quantization_config=bnb4_config(bnb_4bit_compute_dtype=torch.float32))


def _bnb4_moe_4bit_experts(root: str) -> nn.Module:
    """The 4-bit load, then every fused expert parameter quantized with bitsandbytes 0.50's
    parametrization: a uint8 ``parametrizations.<name>.original`` dequantized at each access."""
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    model = _bnb4_moe(root)
    for layer in model.model.layers:  # type: ignore[union-attr]
        for name in EXPERTS:
            replace_parameter_4bit(layer.mlp.experts, name)
    return model


def _nbytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


def _truth(model: nn.Module) -> dict[str, tuple[bool, int]]:
    """name -> (quantized storage, bytes) for every distinct parameter, judged by this test:
    bitsandbytes ``Params4bit`` and integer parameters are storage at numel x element size; a
    torchao ``Int8Tensor`` is storage at its int8 data + fp32 scales + int8 zero points."""
    from bitsandbytes.nn import Params4bit

    out: dict[str, tuple[bool, int]] = {}
    for name, p in model.named_parameters():  # tied names come once
        if type(p).__name__ == "Int8Tensor":
            out[name] = (True, sum(_nbytes(getattr(p, a)) for a in ("qdata", "scale", "zero_point")))
        else:
            out[name] = (isinstance(p, Params4bit) or not p.is_floating_point(), _nbytes(p))
    return out


def _bytes(model: nn.Module) -> tuple[int, int]:
    """(quantized storage bytes, plain floating bytes)."""
    truth = _truth(model).values()
    return sum(b for s, b in truth if s), sum(b for s, b in truth if not s)


def _share_line(storage: int, floating: int) -> str:
    whole = storage + floating
    return (
        f"quantized storage: {storage:,} bytes ({round(100 * storage / whole)}% of parameter bytes); "
        f"not quantized: {floating:,} bytes ({round(100 * floating / whole)}%)"
    )


def _expert_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".experts." in n}


def _lora_step(model: nn.Module) -> None:
    """LoRA on q_proj / v_proj, one step: every LoRA tensor gets a gradient."""
    peft_model = add_lora(model)
    loss, grads = standard_step(peft_model)
    assert loss == loss and loss > 0
    total, with_grad, nonzero_b = grad_counts(grads)
    assert (total, with_grad, nonzero_b) == (8, 8, 4), grads.keys()


@fused_experts
def test_loader_leaves_fused_experts_in_bf16(model_root: str) -> None:
    from bitsandbytes.nn import Params4bit

    model = _bnb4_moe(model_root)
    experts = _expert_params(model)
    assert len(experts) == 4
    for name, p in experts.items():
        assert type(p) is nn.Parameter and p.dtype == torch.bfloat16 and p.dim() == 3, (name, type(p), p.dtype)
    assert tuple(experts["model.layers.0.mlp.experts.gate_up_proj"].shape) == (4, 256, 64)
    assert tuple(experts["model.layers.0.mlp.experts.down_proj"].shape) == (4, 64, 128)
    attention = [p for n, p in model.named_parameters() if ".self_attn." in n]
    assert len(attention) == 8 and all(isinstance(p, Params4bit) and p.dtype == torch.uint8 for p in attention)


@fused_experts
def test_plan_states_the_quantized_share_and_warns(model_root: str) -> None:
    model = _bnb4_moe(model_root)
    storage, floating = _bytes(model)
    # 8 attention projections of 64x64 at 4 bits; the experts alone are 2 x 196,608 bf16 bytes
    assert storage == 8 * 64 * 64 // 2
    p = kbitprep.plan(model)
    assert (p.storage_bytes, p.float_bytes) == (storage, floating)
    assert (p.to_dict()["storage_bytes"], p.to_dict()["float_bytes"]) == (storage, floating)
    assert _share_line(storage, floating) in str(p)

    # the warning: the 16-bit matrices outside embeddings and head, and the largest of them
    truth = _truth(model)
    params = dict(model.named_parameters())
    matrices = {
        n: b
        for n, (s, b) in truth.items()
        if not s and params[n].dim() >= 2 and n.rsplit(".", 2)[-2] not in ("embed_tokens", "lm_head")
    }
    left = sum(matrices.values())
    assert left > storage
    largest = max(matrices, key=lambda n: matrices[n])
    assert largest == "model.layers.0.mlp.experts.gate_up_proj"
    found = warning_of(p, "memory", WARNING)
    assert found.startswith(WARNING)
    assert f"{left:,} bytes in {len(matrices)} weight matrices" in found
    assert f"{storage:,} bytes of quantized storage" in found
    assert f"Largest: {largest!r} (4x256x64, torch.bfloat16)" in found


@fused_experts
@pytest.mark.parametrize("keep", [(), ("experts",)], ids=["upcast", "kept-bf16"])
def test_16bit_experts_model_trains_lora_on_attention(model_root: str, keep: tuple[str, ...]) -> None:
    model = _bnb4_moe(model_root)
    with pytest.warns(kbitprep.MemoryWarning, match=WARNING) as caught:
        report = kbitprep.prepare(model, keep_in_low_precision=keep)
    assert emitted_of(caught, kbitprep.MemoryWarning, "keep_in_low_precision=('experts',)")
    cast = {c.name for c in report.casts}
    experts = _expert_params(model)
    if keep:  # the warning's own suggestion: the experts stay bf16, brought up at use
        assert not set(experts) & cast
        assert {p.dtype for p in experts.values()} == {torch.bfloat16}
    else:  # plain bf16 weights: peft's upcast policy applies
        assert set(experts) <= cast
        assert {p.dtype for p in experts.values()} == {torch.float32}
    assert not any(p.requires_grad for p in model.parameters())
    _lora_step(model)


def test_dense_llama_4bit_has_no_warning(model_root: str) -> None:
    model = load(saved_tiny(model_root), quantization_config=bnb4_config(bnb_4bit_compute_dtype=torch.float32))
    storage, floating = _bytes(model)
    # 7 projections per layer (4 of 64x64, 3 of 64x128) at 4 bits, 2 layers
    assert storage == 2 * (4 * 64 * 64 + 3 * 64 * 128) // 2
    assert floating == 256_640  # embeddings, head and 5 norms in bf16 (tests/test_storage_and_undo.py)
    p = kbitprep.plan(model)
    assert (p.storage_bytes, p.float_bytes) == (storage, floating)
    assert not has_warning(p, "memory", WARNING), p.warnings
    assert _share_line(storage, floating) in str(p)


@fused_experts
def test_4bit_experts_are_storage(model_root: str) -> None:
    model = _bnb4_moe_4bit_experts(model_root)
    experts = _expert_params(model)
    assert sorted(experts) == sorted(
        f"model.layers.{i}.mlp.experts.parametrizations.{n}.original" for i in range(2) for n in EXPERTS
    )
    assert all(p.dtype == torch.uint8 for p in experts.values())
    storage, floating = _bytes(model)
    # attention 8 x 2,048 bytes, experts 2 x (4x256x64 + 4x64x128) / 2 bytes
    assert storage == 8 * 2048 + 2 * (4 * 256 * 64 + 4 * 64 * 128) // 2
    p = kbitprep.plan(model)
    assert (p.storage_bytes, p.float_bytes) == (storage, floating)
    assert not [c for c in p.casts if ".experts." in c.name]
    assert not has_warning(p, "memory", WARNING), p.warnings
    assert _share_line(storage, floating) in str(p)

    before = {n: digest(t) for n, t in experts.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", kbitprep.KbitPrepWarning)
        kbitprep.prepare(model)
    assert all(t.dtype == torch.uint8 and not t.requires_grad for t in experts.values())
    _lora_step(model)
    assert {n: digest(t) for n, t in _expert_params(model).items()} == before  # bit-identical after the step


@fused_experts
def test_torchao_int8_experts_are_storage(model_root: str) -> None:
    pytest.importorskip("torchao", reason="needs torchao (pip install torchao)")
    from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig, quantize_
    from transformers import AutoModelForCausalLM

    # torchao 0.18's Int8Tensor has no aten.transpose, which transformers' grouped_mm experts
    # forward calls; the eager experts forward indexes one expert at a time and works
    model = AutoModelForCausalLM.from_pretrained(
        _saved_moe(model_root), dtype=torch.bfloat16, device_map="cpu", experts_implementation="eager"
    )
    pattern = r"re:model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)"
    quantize_(model, FqnToConfig({pattern: Int8WeightOnlyConfig()}), filter_fn=None)
    experts = _expert_params(model)
    assert {type(p).__name__ for p in experts.values()} == {"Int8Tensor"}
    storage, floating = _bytes(model)
    # int8 data plus one fp32 scale and one int8 zero point per output row
    assert storage == 2 * (4 * 256 * (64 + 5) + 4 * 64 * (128 + 5))
    p = kbitprep.plan(model)
    assert p.backend == "torchao"
    assert (p.storage_bytes, p.float_bytes) == (storage, floating)
    assert not p.casts and not has_warning(p, "memory", WARNING), p.warnings
    assert _share_line(storage, floating) in str(p)
    kbitprep.prepare(model)
    assert all(type(t).__name__ == "Int8Tensor" and not t.requires_grad for t in experts.values())
    _lora_step(model)
