"""MXFP4 strategy: gpt-oss's packed FP4 experts. transformers 5.24 cannot quantize or keep MXFP4
on this CPU (it needs triton >= 3.5 and the hub kernels, and loads a pre-quantized checkpoint
dequantized to bf16), so the CPU tests build transformers' own ``Mxfp4GptOssMLP`` /
``Mxfp4GptOssExperts`` layers into a tiny gpt-oss, as ``replace_with_mxfp4_linear`` does; the
dequantized load is C19 (tests/cases/test_dequantized_label.py). The real load runs under ``gpu``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from _models import GPT_OSS, checkpointing_on, transformers_major
from kbitprep import NotTrainableError, detect_backend, get_backend, plan, prepare

pytestmark = pytest.mark.skipif(
    transformers_major() < 5,
    reason="the gpt-oss MXFP4 layers built here (Mxfp4GptOssMLP / Mxfp4GptOssExperts) are transformers 5's; "
    "transformers 4.57's mxfp4 integration has no Mxfp4GptOssMLP",
)


def _mxfp4_gpt_oss(label: str | None = "all") -> nn.Module:
    """Tiny bf16 gpt-oss whose 2 MoE blocks are transformers' MXFP4 layers: uint8 experts of
    shape (4, 128, 32) and (4, 64, 32), fp32 biases. ``label``: "all" sets the quantizer and
    config a transformers load sets, "attribute" only ``quantization_method``, None nothing."""
    from transformers import GptOssConfig, GptOssForCausalLM, Mxfp4Config
    from transformers.integrations.mxfp4 import Mxfp4GptOssExperts, Mxfp4GptOssMLP
    from transformers.quantizers.quantizer_mxfp4 import Mxfp4HfQuantizer

    torch.manual_seed(0)
    config = GptOssConfig(**GPT_OSS)
    model = GptOssForCausalLM(config).to(torch.bfloat16)
    for layer in model.model.layers:
        layer.mlp = Mxfp4GptOssMLP(layer.mlp.router, Mxfp4GptOssExperts(config))
    if label == "all":
        model.hf_quantizer = Mxfp4HfQuantizer(Mxfp4Config())
        model.config.quantization_config = Mxfp4Config()
        model.quantization_method = "mxfp4"
    elif label == "attribute":
        model.quantization_method = "mxfp4"
    return model  # type: ignore[no-any-return]


def _experts(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "Mxfp4GptOssExperts"]


@pytest.mark.parametrize(
    ("label", "reason"),
    [
        ("all", "model.hf_quantizer is Mxfp4HfQuantizer (quant_method 'mxfp4')"),
        ("attribute", "model.quantization_method is 'mxfp4'"),
        (None, "found 2 Mxfp4GptOssExperts modules"),
    ],
)
def test_packed_mxfp4_experts_are_detected_and_refused_before_anything_changes(label: str | None, reason: str) -> None:
    """Packed FP4 experts (uint8, two values per byte): backend mxfp4 in every tier, plan and
    prepare raise NotTrainableError counting the 2 expert modules, and nothing changes."""
    model = _mxfp4_gpt_oss(label)
    experts = _experts(model)
    assert len(experts) == 2
    shapes = {(n, p.dtype, tuple(p.shape)) for n, p in experts[0].named_parameters()}
    assert ("gate_up_proj", torch.uint8, (4, 2 * 64, 64 // 2)) in shapes
    assert ("down_proj", torch.uint8, (4, 64, 64 // 2)) in shapes

    detection = detect_backend(model)
    assert (detection.backend, detection.reason) == ("mxfp4", reason)
    assert get_backend("mxfp4").find_storage(model) == "2 Mxfp4GptOssExperts modules holding packed FP4 weights"
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(NotTrainableError, match="2 gpt-oss expert modules") as info:
        plan(model)
    assert "Mxfp4Config(dequantize=True)" in str(info.value)
    with pytest.raises(NotTrainableError):
        prepare(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not checkpointing_on(model)


def test_swizzled_experts_are_still_storage_not_a_dequantized_model() -> None:
    """On a GPU transformers swaps each packed parameter for a triton_kernels tensor (not a
    torch.Tensor, gone from named_parameters) and moves the scales into a precision config. The
    verdict must stay mxfp4 (refused), not 'none' as if the weights were dequantized."""
    model = _mxfp4_gpt_oss("all")

    class TritonTensorStandIn:  # what swizzle_mxfp4_convertops stores: an opaque kernel tensor
        shape = torch.Size([4, 64, 128])

    for experts in _experts(model):
        for proj in ("gate_up_proj", "down_proj"):
            del experts._parameters[proj]
            setattr(experts, proj, TritonTensorStandIn())
            setattr(experts, f"{proj}_precision_config", object())
    assert {n for n, p in model.named_parameters() if p.dtype == torch.uint8} == set()
    assert detect_backend(model).backend == "mxfp4"
    with pytest.raises(NotTrainableError, match="2 gpt-oss expert modules"):
        plan(model)


@pytest.mark.gpu
def test_mxfp4_on_cuda_is_refused_and_its_experts_really_drop_the_gradient(tmp_path: Path) -> None:
    """Real MXFP4 on CUDA (needs triton and the hub kernels): the experts' output has no
    grad_fn for an input that requires grad, and kbitprep refuses the model."""
    pytest.importorskip("triton", reason="triton is not installed")
    pytest.importorskip("kernels", reason="kernels is not installed")
    from transformers import AutoModelForCausalLM, GptOssConfig, GptOssForCausalLM, Mxfp4Config

    GptOssForCausalLM(GptOssConfig(**GPT_OSS)).to(torch.bfloat16).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.bfloat16, device_map="cuda", quantization_config=Mxfp4Config()
    )
    assert len(_experts(model)) == 2
    hidden = torch.randn(1, 8, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    out, _logits = model.model.layers[0].mlp(hidden)
    assert out.grad_fn is None
    with pytest.raises(NotTrainableError):
        plan(model)
