"""Backend kernel-mode traps: inference-only kernels and untrainable configs (C13, C16)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import kbitprep
from _lora import add_lora, grad_counts, standard_step
from _measure import hook_count, model_state
from _models import checkpointing_on, standard_batch
from _quantized import CPU_KINDS, bnb4, intx_config, need, torchao_direct, torchao_hf


def _linear4bit(model: Any) -> list[Any]:
    import bitsandbytes as bnb  # noqa: F401

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]  # type: ignore[attr-defined]


def _pack_like_an_avx512bf16_cpu(model: Any) -> None:
    """What one eval no-grad forward does to every Linear4bit on a CPU with AVX512-BF16
    (bitsandbytes 0.50.2 Linear4bit.forward): repack the weight into the CPU-only layout with
    bitsandbytes' own function, and leave the fast-path flag on. A layer the real forward already
    repacked (this CPU has AVX512-BF16) is left as it is: packing twice is not what bitsandbytes does."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    for m in _linear4bit(model):
        if getattr(m.weight.quant_state, "packing_format_for_cpu", False):
            continue
        m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)
        m.support_avx512bf16_for_cpu = True


def test_prepare_undoes_the_cpu_inference_repack_of_4bit_weights(
    model_root: str, record_property: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """C13: the eval forward's repack is reproduced with bitsandbytes' own
    _convert_weight_packed_for_cpu (has_avx512bf16() is recorded; where it is False the real
    trap cannot fire here). After prepare no Linear4bit weight is in the packed CPU layout:
    shapes are back to (2048, 1) / (4096, 1), bytes bit-identical to a copy taken before, the
    fast path is off on all 14 layers. The standard step then gives a finite loss, 8 grads, 4
    non-zero, and every lora_B changes."""
    from bitsandbytes.functional import has_avx512bf16

    record_property("has_avx512bf16", has_avx512bf16())  # type: ignore[no-untyped-call]
    with capsys.disabled():
        print(f"\n[C13] bitsandbytes.functional.has_avx512bf16() = {has_avx512bf16()}")  # type: ignore[no-untyped-call]

    model = bnb4(model_root)
    layers = _linear4bit(model)
    assert len(layers) == 14
    copies = {id(m): m.weight.detach().clone() for m in layers}  # the layout from_pretrained leaves
    with torch.no_grad():  # the smoke-test forward, eval mode as from_pretrained leaves it
        model(standard_batch())
    _pack_like_an_avx512bf16_cpu(model)
    assert all(m.weight.quant_state.packing_format_for_cpu for m in layers)
    assert {tuple(m.weight.shape) for m in layers} != {(2048, 1), (4096, 1)}

    kbitprep.prepare(model)

    for m in layers:
        assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        assert tuple(m.weight.shape) in ((2048, 1), (4096, 1))
        assert torch.equal(m.weight.detach(), copies[id(m)])
        assert m.support_avx512bf16_for_cpu is False
    peft_model = add_lora(model)
    b_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_B" in n}
    loss, grads = standard_step(peft_model)
    assert torch.isfinite(torch.tensor(loss))
    assert grad_counts(grads) == (8, 8, 4)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            assert not torch.equal(p.detach(), b_before[n]), n


def test_evaluation_during_training_keeps_4bit_gradients(model_root: str) -> None:
    """C13: prepare, attach LoRA, run an eval no-grad forward, then train(): the fast path stays
    off (no repack can happen), and the standard step gives 8 grads, 4 non-zero."""
    model = bnb4(model_root)
    kbitprep.prepare(model)
    peft_model = add_lora(model)
    peft_model.eval()
    with torch.no_grad():
        peft_model(input_ids=standard_batch())
    for m in _linear4bit(model):
        assert m.support_avx512bf16_for_cpu is False
        assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    _loss, grads = standard_step(peft_model)
    assert grad_counts(grads) == (8, 8, 4)


@pytest.mark.parametrize("kind", list(CPU_KINDS))
def test_kbitprep_never_runs_a_forward(kind: str, model_root: str) -> None:
    """C13 whole kind: plan and prepare never run an eval or no-grad forward (or any forward)
    on any module of the model, for every backend that runs on CPU: a forward pre-hook on every
    module records none."""
    model = CPU_KINDS[kind](model_root)
    calls: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: calls.append(n)) for n, m in model.named_modules()]
    try:
        kbitprep.plan(model)
        p = kbitprep.plan(model)
        if p.warnings:
            with pytest.warns(kbitprep.KbitPrepWarning):
                kbitprep.prepare(model)
        else:
            kbitprep.prepare(model)
    finally:
        for h in handles:
            h.remove()
    assert calls == []


# -- C16: torchao trainability per config ---------------------------------------------------------


def _dynamic() -> Any:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


def _int8wo() -> Any:
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


ROUTES = {
    "a-transformers-dynamic-int8": (torchao_hf, _dynamic, False),
    "a'-quantize_-dynamic-int8": (torchao_direct, _dynamic, False),
    "b-transformers-intx-int4": (torchao_hf, intx_config, True),
    "b'-quantize_-intx-int4": (torchao_direct, intx_config, True),
    "c-transformers-int8-weight-only": (torchao_hf, _int8wo, True),
    "c'-quantize_-int8-weight-only": (torchao_direct, _int8wo, True),
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_torchao_trainability_is_decided_per_layer(route: str, model_root: str) -> None:
    """C16 and its whole kind, over both wrong answers and both routes. Dynamic-activation int8
    (through transformers, (a), and quantize_, (a')) raises NotTrainableError, also a ValueError
    and a KbitPrepError, naming dynamic activation quantization, before anything changes
    (embed_tokens.weight.requires_grad still True, checkpointing off, no hooks added). Intx int4
    ((b): transformers says is_trainable False) and int8 weight-only ((c)) prepare with 0 casts
    and the standard step gives 8 grads, 4 non-zero."""
    need("torchao")
    build, config, trainable = ROUTES[route]
    model = build(model_root, config())
    if route.startswith("b-"):
        assert model.hf_quantizer.is_trainable is False
    before = model_state(model)
    if not trainable:
        with pytest.raises(kbitprep.NotTrainableError) as info:
            kbitprep.prepare(model)
        assert isinstance(info.value, ValueError) and isinstance(info.value, kbitprep.KbitPrepError)
        text = str(info.value)
        assert "Int8DynamicActivationInt8WeightConfig" in text or "dynamic activation" in text
        assert model.model.embed_tokens.weight.requires_grad is True
        assert checkpointing_on(model) is False
        assert hook_count(model.model.embed_tokens) == 0
        assert model_state(model) == before
        return
    p = kbitprep.plan(model)
    assert p.casts == ()
    if p.warnings:
        with pytest.warns(kbitprep.KbitPrepWarning):
            report = kbitprep.prepare(model)
    else:
        report = kbitprep.prepare(model)
    assert report.casts == ()
    loss, grads = standard_step(add_lora(model))
    assert torch.isfinite(torch.tensor(loss))
    assert grad_counts(grads) == (8, 8, 4)
