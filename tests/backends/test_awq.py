"""AWQ strategy: real 4-bit AWQ weights (auto-round 0.16.1 RTN, exported as auto_awq) loaded
through transformers 5.24 and gptqmodel 7.6.0's CPU kernels, on the tiny Llama."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _lora import add_lora, grad_counts, standard_step
from _measure import embed_hooks, storage_by_base_name
from _models import N_LINEARS, PLAIN_NAMES, checkpointing_on, eval_forward, from_pretrained
from _quantized import strip_quantization_evidence
from kbitprep import NotTrainableError, detect_backend, get_backend, plan, prepare

# 7.6.0, the gptqmodel release for torch 2.13 on CPU, requires transformers>=5.14
pytest.importorskip("gptqmodel", reason="gptqmodel is not installed (pip install gptqmodel==7.6.0)")

PLAIN = set(PLAIN_NAMES)


def _aten_layers(model: nn.Module) -> list[nn.Module]:
    from gptqmodel.nn_modules.qlinear.torch_aten_kernel_awq import TorchAtenAwqLinear

    return [m for m in model.modules() if isinstance(m, TorchAtenAwqLinear)]


@pytest.fixture
def awq_model(awq_dir: str) -> nn.Module:
    """The AWQ tiny model, freshly reloaded in fp16 (eval mode, no forward run yet)."""
    return from_pretrained(awq_dir, torch.float16)


def test_awq_model_is_loaded_with_buffer_storage_and_detected(awq_model: nn.Module) -> None:
    """14 TorchAtenAwqLinear with no mode chosen; AWQ GEMM layout for a 64x64 layer at 4 bits,
    group 32: qweight int32 (in, out/8), qzeros int32 (in/32, out/8), scales fp16 (in/32, out)."""
    layers = _aten_layers(awq_model)
    assert len(layers) == N_LINEARS
    assert all(m.linear_mode is None for m in layers)
    buffers = dict(awq_model.model.layers[0].self_attn.q_proj.named_buffers())
    assert {n: (b.dtype, tuple(b.shape)) for n, b in buffers.items()} == {
        "qweight": (torch.int32, (64, 64 * 4 // 32)),
        "qzeros": (torch.int32, (64 // 32, 64 * 4 // 32)),
        "scales": (torch.float16, (64 // 32, 64)),
    }
    assert {n for n, _p in awq_model.named_parameters()} == PLAIN
    detection = detect_backend(awq_model)
    assert (detection.backend, detection.reason) == ("awq", "model.hf_quantizer is AwqQuantizer (quant_method 'awq')")


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no_checkpointing"])
def test_awq_prepare_pins_train_mode_so_an_eval_forward_cannot_stop_gradients(
    awq_model: nn.Module, checkpointing: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """C14 variant A for AWQ: plan runs no forward; prepare pins the 14 layers to "train",
    casts nothing and plans fp16 compute; after LoRA, an eval no-grad forward and train(), one
    step gives every lora_B a non-zero gradient and the storage is bit-identical. Without the
    pin the step gives no LoRA gradient (checkpointing) or raises 'element 0 of tensors does not
    require grad' (none)."""
    model = awq_model
    backend = get_backend("awq")
    before = storage_by_base_name(model, backend)
    assert len([n for n in before if n.endswith(".qweight")]) == N_LINEARS

    p = plan(model, use_gradient_checkpointing=checkpointing)
    assert all(m.linear_mode is None for m in _aten_layers(model))
    assert (p.backend, p.casts, p.bytes_delta, p.compute_dtype) == ("awq", (), 0, torch.float16)

    prepare(model, use_gradient_checkpointing=checkpointing)
    assert [m.linear_mode for m in _aten_layers(model)] == ["train"] * N_LINEARS
    params = dict(model.named_parameters())
    assert {n: (t.dtype, t.requires_grad) for n, t in params.items()} == {n: (torch.float16, False) for n in PLAIN}
    assert checkpointing_on(model) is checkpointing

    peft_model = add_lora(model, r=4)
    eval_forward(peft_model)
    assert [m.linear_mode for m in _aten_layers(model)] == ["train"] * N_LINEARS

    loss, grads = standard_step(peft_model)
    assert grad_counts(grads) == (8, 8, 4)
    assert torch.isfinite(torch.tensor(loss))
    assert storage_by_base_name(model, backend) == before
    with capsys.disabled():
        print(f"\n[awq C14-A checkpointing={checkpointing}] loss={loss:.4f} grad_counts={grad_counts(grads)}")


def test_awq_layers_latched_by_an_eval_forward_raise_before_anything_changes(awq_model: nn.Module) -> None:
    """C14 variant B for AWQ: an eval no-grad forward latches all 14 layers; prepare raises
    NotTrainableError counting them and naming the fix, and changes nothing."""
    model = awq_model
    eval_forward(model)
    assert [m.linear_mode for m in _aten_layers(model)] == ["inference"] * N_LINEARS
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks_before = embed_hooks(model)

    with pytest.raises(NotTrainableError) as info:
        prepare(model)
    message = str(info.value)
    assert "14 of 14 AWQ layers" in message
    assert 'AwqConfig(bits=4, backend="torch_awq")' in message
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before
    assert embed_hooks(model) == hooks_before
    assert not checkpointing_on(model)
    assert get_backend("awq").trainable(model).ok is False


def test_awq_undo_unpins_the_layers(awq_model: nn.Module) -> None:
    report = prepare(awq_model)
    assert {m.linear_mode for m in _aten_layers(awq_model)} == {"train"}
    report.undo()
    assert {m.linear_mode for m in _aten_layers(awq_model)} == {None}


def test_awq_torch_kernel_has_no_mode_and_trains_after_an_eval_forward(awq_dir: str) -> None:
    """The fix the refusal names: AwqConfig(backend="torch_awq") gives AwqTorchLinear, which has
    no linear_mode; an eval no-grad forward before prepare is harmless and LoRA trains."""
    from transformers import AwqConfig

    with torch.compiler.set_stance("force_eager"):  # its dequantize is torch.compile'd
        model = from_pretrained(awq_dir, torch.float16, quantization_config=AwqConfig(bits=4, backend="torch_awq"))
        layers = [m for m in model.modules() if type(m).__name__ == "AwqTorchLinear"]
        assert len(layers) == N_LINEARS and not any(hasattr(m, "linear_mode") for m in layers)
        eval_forward(model)
        report = prepare(model)
        assert (report.backend, report.casts) == ("awq", ())
        _loss, grads = standard_step(add_lora(model, r=4))
    assert grad_counts(grads) == (8, 8, 4)


@pytest.mark.parametrize("tier", ["config_dict", "attribute", "modules"])
def test_awq_is_detected_in_every_evidence_tier(awq_model: nn.Module, tier: str) -> None:
    model = awq_model
    strip_quantization_evidence(model)
    expected = {
        "config_dict": "model.config.quantization_config['quant_method'] is 'awq'",
        "attribute": "model.quantization_method is 'awq'",
        "modules": "found 14 AWQ TorchAtenAwqLinear modules",
    }[tier]
    if tier == "config_dict":
        model.config.quantization_config = {"quant_method": "awq", "bits": 4}
    elif tier == "attribute":
        model.quantization_method = "awq"
    detection = detect_backend(model)
    assert (detection.backend, detection.reason) == ("awq", expected)
    assert detect_backend(model).others == ()  # the GPTQ strategy does not claim AWQ kernels
    assert plan(model).casts == ()
