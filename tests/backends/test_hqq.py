"""HQQ strategy: real ``HQQLinear`` layers (hqq 0.2.8, PYTORCH backend) built on CPU."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("hqq", reason="hqq is not installed (pip install hqq)")

from hqq.core.quantize import HQQLinear  # noqa: E402

from _lora import add_lora, grad_counts, lora_step_trains, standard_step  # noqa: E402
from _measure import hook_count, kernel_inputs, storage_state  # noqa: E402
from _models import ENABLE_ADDS_INPUT_GRAD_HOOK, N_LINEARS, N_PLAIN, decoder_linears, standard_batch, tiny_llama  # noqa: E402
from _plan_warnings import warning_of  # noqa: E402
from _quantized import UPCAST_IDS, UPCASTS, hqq_tiny, prepare_quietly  # noqa: E402
from kbitprep import BackendWarning, detect_backend, get_backend, plan, prepare  # noqa: E402
from kbitprep.backends.hqq import HqqBackend  # noqa: E402
from kbitprep.testing import BackendConformanceTests  # noqa: E402

# 4 bits, group 64, packed two per byte: (out·in/64/2, 64) uint8, i.e. (out/2, in) when in == 64
W_Q_SHAPES = {
    "q_proj": (32, 64),
    "k_proj": (32, 64),
    "v_proj": (32, 64),
    "o_proj": (32, 64),
    "gate_proj": (64, 64),  # 128x64
    "up_proj": (64, 64),  # 128x64
    "down_proj": (64, 64),  # 64x128
}


def _hqq_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, HQQLinear)]


class LowRankAdapter(nn.Module):
    """Hand-written adapter (C08): ``base(x) + x·A·B``, x·A·B computed in the adapter's dtype and
    added in the output's dtype. A is (in, 4), B is (4, out), both random non-zero."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.base = base
        g = torch.Generator().manual_seed(in_features + out_features)
        self.A = nn.Parameter((torch.randn(in_features, 4, generator=g) * 0.1).to(dtype))
        self.B = nn.Parameter((torch.randn(4, out_features, generator=g) * 0.1).to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        delta = x.to(self.A.dtype) @ self.A @ self.B
        return out + delta.to(out.dtype)


# -- the conformance kit (kbitprep.testing) --------------------------------------------------------


class TestHqqDirect(BackendConformanceTests):
    """HQQLinear swapped in by hand, no transformers attribute: found by module type (C15)."""

    backend_cls = HqqBackend

    def make_model(self) -> nn.Module:
        return hqq_tiny()


# -- what is particular to HQQ ---------------------------------------------------------------------


def test_hqq_model_is_found_by_layer_type_without_transformers_attributes() -> None:
    """C15: no attribute is set; detection names HQQLinear and plans no cast."""
    model = hqq_tiny()
    assert not hasattr(model, "quantization_method") and not hasattr(model, "hqq_quantized")
    detection = detect_backend(model)
    assert detection.backend == "hqq"
    assert detection.reason == "found 14 HQQLinear modules"
    p = plan(model)
    assert (p.casts, p.bytes_delta, p.precision, p.warnings) == ((), 0, (), ())


def test_detection_and_plan_never_read_weight_on_hqq_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """C15: HQQLinear has no .weight in hqq 0.2.8; detection and plan must not read it."""
    model = hqq_tiny()
    reads: list[str] = []

    def weight(self: HQQLinear) -> Any:
        reads.append(type(self).__name__)
        raise AttributeError("'HQQLinear' object has no attribute 'weight'")

    monkeypatch.setattr(HQQLinear, "weight", property(weight), raising=False)
    assert detect_backend(model).backend == "hqq"
    plan(model)
    plan(model, upcast="all")
    assert reads == []


@pytest.mark.parametrize("tier", ["config_dict", "quantization_method", "hqq_quantized", "modules"])
def test_hqq_is_never_upcast_whichever_tier_finds_it(tier: str) -> None:
    """C15 whole kind: attribute, config dict or module type, auto casts nothing."""
    model = hqq_tiny()
    if tier == "config_dict":
        model.config.quantization_config = {"quant_method": "hqq", "nbits": 4}
    elif tier == "quantization_method":
        model.quantization_method = "hqq"
    elif tier == "hqq_quantized":
        model.hqq_quantized = True
    detection = detect_backend(model)
    assert detection.backend == "hqq"
    assert ("HQQLinear" in detection.reason) == (tier == "modules")
    p = plan(model)
    assert (p.casts, p.bytes_delta) == ((), 0)


@pytest.mark.parametrize("upcast", UPCASTS, ids=UPCAST_IDS)
def test_hqq_packed_weights_are_never_cast_or_unfrozen(upcast: Any) -> None:
    """C15/C06 whole kind: under auto, "all" and an always-True callable every W_q keeps uint8,
    its packed shape and bytes, is bit-identical and never requires grad."""
    model = hqq_tiny()
    backend = get_backend("hqq")
    before = storage_state(model, backend)
    assert len(before) == N_LINEARS
    for name, (dtype, shape, nbytes, requires_grad, _digest) in before.items():
        assert name.endswith(".W_q")
        assert (dtype, shape, requires_grad) == (torch.uint8, W_Q_SHAPES[name.split(".")[-2]], False)
        assert nbytes == shape[0] * shape[1]
    report = prepare_quietly(model, upcast)
    assert storage_state(model, backend) == before
    expected_casts = 0 if upcast == "auto" else N_PLAIN
    assert len(report.casts) == expected_casts
    assert report.bytes_delta == (0 if upcast == "auto" else 256_640)  # 7 plain bf16 (256,640 B) -> fp32


def test_hqq_peft_lora_trains_and_every_layer_gets_its_compute_dtype(capsys: pytest.CaptureFixture[str]) -> None:
    """C15: prepare with defaults, PEFT LoRA (HqqLoraLinear), standard step: finite loss, 8 with
    grad, 4 non-zero; the 7 plain parameters stay bf16; every HQQLinear received bf16 inputs."""
    model = hqq_tiny()
    report = prepare(model)
    assert report.backend == "hqq" and report.casts == ()
    plain = {n: p.dtype for n, p in model.named_parameters() if "W_q" not in n}
    assert len(plain) == N_PLAIN and set(plain.values()) == {torch.bfloat16}
    peft_model = add_lora(model)
    assert sum(type(m).__name__ == "HqqLoraLinear" for m in peft_model.modules()) == 4
    with kernel_inputs(_hqq_layers(peft_model)) as seen:
        loss, grads = standard_step(peft_model)
    assert torch.isfinite(torch.tensor(loss))
    assert grad_counts(grads) == (8, 8, 4)
    assert len(seen) >= N_LINEARS and set(seen) == {torch.bfloat16}
    with capsys.disabled():
        print(f"\n[hqq C15] loss={loss:.4f} grad_counts={grad_counts(grads)}")


def test_hqq_upcast_all_still_trains_with_bf16_inputs_to_every_layer() -> None:
    """C15: an explicit upcast="all" casts the 7 plain parameters, warns, and every HQQLinear
    still receives bf16 because its inputs are cast to its compute dtype."""
    model = hqq_tiny()
    report = prepare_quietly(model, "all")
    assert len(report.casts) == N_PLAIN
    peft_model = add_lora(model)
    with kernel_inputs(_hqq_layers(peft_model)) as seen:
        loss, grads = standard_step(peft_model)
    assert torch.isfinite(torch.tensor(loss))
    assert grad_counts(grads) == (8, 8, 4)
    assert len(seen) >= N_LINEARS and set(seen) == {torch.bfloat16}


@pytest.mark.parametrize("reentrant", [True, None], ids=["reentrant", "default"])
def test_hand_written_adapters_on_hqq_get_gradients_in_both_checkpointing_modes(reentrant: bool | None) -> None:
    """C08: adapters injected after prepare by hand get 8 of 8 non-zero grads; reentrant mode adds
    exactly one input-grad hook on embed_tokens, the default (non-reentrant) keeps the one transformers 5
    installs; W_q stays frozen."""
    model = hqq_tiny()
    kwargs = {"use_reentrant": True} if reentrant else None
    report = prepare(model, gradient_checkpointing_kwargs=kwargs)
    if reentrant:
        assert report.use_reentrant is True and report.input_grad_hook is True
        assert hook_count(model.model.embed_tokens) == 1
    else:
        # transformers 5's own enable installs the hook for an input_ids model; kept (C18)
        assert report.use_reentrant is False and report.input_grad_hook is ENABLE_ADDS_INPUT_GRAD_HOOK
    adapters: list[nn.Parameter] = []
    for name, layer in decoder_linears(model):
        if name.endswith(("q_proj", "v_proj")):
            adapter = LowRankAdapter(layer, 64, 64, torch.bfloat16)
            model.set_submodule(name, adapter)
            adapters += [adapter.A, adapter.B]
    assert len(adapters) == 8
    model.train()
    ids = standard_batch()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in adapters) == 8
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("W_q"))


def test_model_flagged_hqq_without_hqq_layers_is_prepared_as_unquantized() -> None:
    """C15 whole kind (1): quantization_method says hqq but the linears are plain nn.Linear (a
    transformers 4.57 HQQ checkpoint loaded by 5.24). The label has no storage behind it, so the
    verdict is "none" (issue 12: storage decides), the reason names 'hqq' and says the weights are
    dequantized, and the plan is peft's for an unquantized bf16 model: all 21 parameters to fp32."""
    model = tiny_llama(torch.bfloat16)
    model.quantization_method = "hqq"
    p = plan(model)
    assert p.backend == "none"
    assert "'hqq'" in p.reason and "dequantized" in p.reason
    assert len(p.casts) == 21 and {c.to_dtype for c in p.casts} == {torch.float32}


def test_hqq_layers_in_another_compute_dtype_are_reported_and_still_run() -> None:
    """C15 whole kind (2): fp32 HQQ layers inside a bf16 model (what transformers 4.57 built):
    plan.warnings names the mismatch before any forward; the inputs of each layer are cast to
    fp32 and the training forward runs."""
    model = hqq_tiny(compute_dtype=torch.float32, model_dtype=torch.bfloat16)
    p = plan(model)
    assert p.casts == ()
    assert len(p.warnings) == 1
    warning = warning_of(p, "backend", "compute in another dtype")
    assert "torch.bfloat16" in warning and "14 with torch.float32" in warning
    with pytest.warns(BackendWarning, match="compute in another dtype"):
        prepare(model)
    model.train()
    model.model.embed_tokens.weight.requires_grad_(True)
    ids = standard_batch()
    with kernel_inputs(_hqq_layers(model)) as seen:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    assert torch.isfinite(out.loss)
    assert set(seen) == {torch.float32}


@pytest.mark.gpu
def test_hqq_on_cuda_trains_one_step() -> None:
    """C15 on CUDA: HQQLinear quantized on the GPU (bf16 compute), prepare, LoRA, one step."""
    from hqq.core.quantize import BaseQuantizeConfig

    model = tiny_llama(torch.bfloat16).cuda()
    for name, linear in decoder_linears(model):
        model.set_submodule(
            name,
            HQQLinear(linear, BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.bfloat16, device="cuda"),
        )
    backend = get_backend("hqq")
    before = storage_state(model, backend)
    report = prepare(model)
    assert report.backend == "hqq" and report.casts == ()
    lora_step_trains(model)
    assert storage_state(model, backend) == before
