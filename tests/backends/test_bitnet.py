"""BitNet strategy: pre-quantized ternary checkpoints of the tiny Llama loaded through
transformers 5.24 (BitNetHfQuantizer only warns without a GPU), in its three layer storages."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import kbitprep
from _lora import add_lora, grad_counts, standard_step
from _measure import storage_state
from _models import N_LINEARS, checkpointing_on, from_pretrained
from _plan_warnings import emitted_of, warning_of
from _quantized import strip_quantization_evidence, write_bitnet_checkpoint
from kbitprep import NotTrainableError, detect_backend, get_backend, plan, prepare


@pytest.fixture(autouse=True)
def _eager() -> Iterator[None]:
    """BitLinear and ActQuant are wrapped in torch.compile: minutes on 2 CPU cores for nothing
    these tests check; run them eagerly. (A monkeypatched ``torch._dynamo.config.disable``, which
    torch 2.13 does not have, left dynamo's config unusable for later compile tests.)"""
    with torch.compiler.set_stance("force_eager"):
        yield


def _load(model_root: str, linear_class: str, mode: str = "offline") -> nn.Module:
    path = Path(model_root) / f"bitnet-{linear_class}-{mode}"
    return from_pretrained(
        write_bitnet_checkpoint(str(path), linear_class=linear_class, quantization_mode=mode), torch.bfloat16
    )


def test_packed_bitlinear_is_refused_with_the_true_reason(model_root: str) -> None:
    """BitLinear: uint8 (out/4, in) weight buffers. Its input gradient really is only the
    per-token max-abs path (one non-zero element per token), so prepare refuses, counts the 14
    layers, names the loadable alternative, and changes nothing."""
    model = _load(model_root, "bitlinear")
    q = model.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "BitLinear"
    assert (q.weight.dtype, tuple(q.weight.shape)) == (torch.uint8, (64 // 4, 64))
    detection = detect_backend(model)
    assert (detection.backend, detection.reason) == (
        "bitnet",
        "model.hf_quantizer is BitNetHfQuantizer (quant_method 'bitnet')",
    )

    x = torch.randn(2, 3, 64, dtype=torch.bfloat16, requires_grad=True)
    q(x).float().square().sum().backward()
    assert x.grad is not None
    assert (x.grad != 0).sum(-1).tolist() == [[1, 1, 1], [1, 1, 1]]

    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(NotTrainableError, match=r"14 BitNet BitLinear layers") as info:
        prepare(model)
    assert "linear_class='autobitlinear', quantization_mode='offline'" in str(info.value)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not checkpointing_on(model)


def test_offline_autobitlinear_keeps_ternary_storage_and_trains(
    model_root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Offline AutoBitLinear: bf16 ternary weights (loaded with requires_grad=True) and a (1,)
    scale are storage; nothing is cast; the plan says Trainer needs mark_trainable; one LoRA step
    gives every lora_B a non-zero gradient (ActQuant's straight-through estimator) and leaves the
    storage bit-identical."""
    model = _load(model_root, "autobitlinear")
    layers = [m for m in model.modules() if type(m).__name__ == "AutoBitLinear"]
    assert len(layers) == N_LINEARS
    assert set(torch.unique(layers[0].weight.float()).tolist()) <= {-1.0, 0.0, 1.0}
    assert detect_backend(model).backend == "bitnet"
    backend = get_backend("bitnet")
    state = storage_state(model, backend)
    assert len(state) == N_LINEARS
    assert state["model.layers.0.self_attn.q_proj.weight"][:3] == (torch.bfloat16, (64, 64), 64 * 64 * 2)

    p = plan(model)
    assert (p.backend, p.casts, p.bytes_delta, p.compute_dtype) == ("bitnet", (), 0, torch.bfloat16)
    warning_of(p, "backend", "kbitprep.mark_trainable(model)")
    with pytest.warns(kbitprep.BackendWarning, match="mark_trainable"):
        prepare(model)
    assert not any(m.weight.requires_grad for m in layers)
    loss, grads = standard_step(add_lora(model, r=4))
    assert grad_counts(grads) == (8, 8, 4)
    assert storage_state(model, backend) == {k: (*v[:3], False, v[4]) for k, v in state.items()}
    with capsys.disabled():
        print(f"\n[bitnet offline AutoBitLinear] loss={loss:.4f} grad_counts={grad_counts(grads)}")


def test_mark_trainable_accepts_offline_autobitlinear(model_root: str) -> None:
    """transformers says is_trainable False; the strategy's verdict (it trains) lets Trainer in."""
    model = _load(model_root, "autobitlinear")
    assert model.hf_quantizer.is_trainable is False
    kbitprep.mark_trainable(model)
    assert model.hf_quantizer.is_trainable is True


def test_online_autobitlinear_stores_nothing_quantized_and_is_prepared_as_unquantized(model_root: str) -> None:
    """Online AutoBitLinear (quantization-aware training) keeps float master weights: the label
    has no storage behind it, so the verdict is 'none' and LoRA trains."""
    model = _load(model_root, "autobitlinear", "online")
    detection = detect_backend(model)
    assert detection.backend == "none" and "'bitnet'" in detection.reason
    with pytest.warns(kbitprep.KbitPrepWarning) as caught:  # peft's upcast, stated in bytes (C01)
        prepare(model)
    assert emitted_of(caught, kbitprep.MemoryWarning, "not quantized; upcasting 21 parameter")
    _loss, grads = standard_step(add_lora(model, r=4))
    assert grad_counts(grads) == (8, 8, 4)


@pytest.mark.parametrize("tier", ["config_dict", "attribute", "modules"])
def test_bitnet_is_detected_in_every_evidence_tier(model_root: str, tier: str) -> None:
    model = _load(model_root, "autobitlinear")
    strip_quantization_evidence(model)
    expected = {
        "config_dict": "model.config.quantization_config['quant_method'] is 'bitnet'",
        "attribute": "model.quantization_method is 'bitnet'",
        "modules": "found 14 BitNet AutoBitLinear modules",
    }[tier]
    if tier == "config_dict":
        model.config.quantization_config = {"quant_method": "bitnet", "linear_class": "autobitlinear"}
    elif tier == "attribute":
        model.quantization_method = "bitnet"
    assert (detect_backend(model).backend, detect_backend(model).reason) == ("bitnet", expected)
    assert plan(model).casts == ()
