"""GPTQ strategy: real gptqmodel 7.6.0 weights quantized on CPU, and a toy GPTQ layer."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import nn

from _lora import add_lora, grad_counts, lora_step_trains, standard_step
from _measure import embed_hooks, kernel_inputs, storage_by_base_name
from _models import (
    N_LINEARS,
    N_PLAIN,
    PLAIN_NAMES,
    checkpointing_on,
    eval_forward,
    from_pretrained,
    standard_batch,
    tiny_llama,
)
from _quantized import strip_quantization_evidence
from kbitprep import MemoryWarning, NotTrainableError, detect_backend, get_backend, plan, prepare
from kbitprep.backends.gptq import GptqBackend
from kbitprep.testing import BackendConformanceTests

log = logging.getLogger(__name__)

# get_backend("gptq") needs gptqmodel, also for the toy layer; 7.6.0, the release for torch 2.13 on
# CPU, requires transformers>=5.14, so the transformers 4.57 session has none
pytest.importorskip(
    "gptqmodel", reason="gptqmodel is not installed (pip install gptqmodel==7.6.0; it needs transformers>=5.14)"
)

PLAIN = set(PLAIN_NAMES)


def _aten_layers(model: nn.Module) -> list[nn.Module]:
    from gptqmodel.nn_modules.qlinear.torch_aten_kernel import TorchAtenLinear

    return [m for m in model.modules() if isinstance(m, TorchAtenLinear)]


def _checkpointing_on(model: nn.Module) -> bool:
    return checkpointing_on(model)


@pytest.fixture
def gptq_model(gptq_dir: str) -> nn.Module:
    """The C05(a) model, freshly reloaded in fp16 (eval mode, no forward run yet)."""
    return from_pretrained(gptq_dir, torch.float16)


# -- the conformance kit (kbitprep.testing) --------------------------------------------------------


@pytest.mark.slow
class TestGptqTorchKernel(BackendConformanceTests):
    """The tiny Llama quantized by gptqmodel on CPU (4 bits, group 32): buffers-only storage (C05)."""

    backend_cls = GptqBackend

    @pytest.fixture(autouse=True)
    def _gptq_dir(self, gptq_dir: str) -> None:
        self.gptq_dir = gptq_dir

    def make_model(self) -> nn.Module:
        return from_pretrained(self.gptq_dir, torch.float16)


# -- what is particular to GPTQ --------------------------------------------------------------------


def test_gptq_model_is_loaded_with_buffers_only_storage(gptq_model: nn.Module) -> None:
    """C05(a): 14 TorchAtenLinear with int32/fp16 buffers; the only parameters are the 7 plain fp16."""
    layers = _aten_layers(gptq_model)
    assert len(layers) == N_LINEARS
    assert all(m.linear_mode is None for m in layers)
    q = gptq_model.model.layers[0].self_attn.q_proj
    buffers = dict(q.named_buffers())
    assert (buffers["qweight"].dtype, tuple(buffers["qweight"].shape)) == (torch.int32, (64 * 4 // 32, 64))
    assert (buffers["qzeros"].dtype, tuple(buffers["qzeros"].shape)) == (torch.int32, (64 // 32, 64 * 4 // 32))
    assert (buffers["scales"].dtype, tuple(buffers["scales"].shape)) == (torch.float16, (64 // 32, 64))
    assert (buffers["g_idx"].dtype, tuple(buffers["g_idx"].shape)) == (torch.int32, (64,))
    assert {n for n, _p in gptq_model.named_parameters()} == PLAIN
    detection = detect_backend(gptq_model)
    assert detection.backend == "gptq"
    assert "GptqHfQuantizer" in detection.reason


def test_gptq_prepare_pins_train_mode_so_an_eval_forward_cannot_stop_gradients(
    gptq_model: nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    """C14 variant A and C05(a): plan runs no forward and changes no mode; prepare pins all 14
    layers to "train", casts nothing, keeps storage bit-identical; after LoRA, an eval no-grad
    forward and train(), the standard step gives 8 LoRA grads, 4 non-zero lora_B, fp16 logits."""
    model = gptq_model
    backend = get_backend("gptq")
    before = storage_by_base_name(model, backend)
    assert len([n for n in before if n.endswith(".qweight")]) == N_LINEARS

    p = plan(model)
    assert all(m.linear_mode is None for m in _aten_layers(model))  # plan ran no forward
    assert p.backend == "gptq"
    assert p.casts == ()
    assert p.bytes_delta == 0
    assert p.precision == ()

    report = prepare(model)
    assert [m.linear_mode for m in _aten_layers(model)] == ["train"] * N_LINEARS
    params = dict(model.named_parameters())
    assert {n: (t.dtype, t.requires_grad) for n, t in params.items()} == {n: (torch.float16, False) for n in PLAIN}
    assert storage_by_base_name(model, backend) == before
    assert _checkpointing_on(model) and report.gradient_checkpointing and report.use_reentrant is False

    peft_model = add_lora(model)
    eval_forward(peft_model)
    assert [m.linear_mode for m in _aten_layers(model)] == ["train"] * N_LINEARS

    peft_model.train()
    logits = peft_model(input_ids=standard_batch()).logits
    assert logits.dtype == torch.float16
    loss, grads = standard_step(peft_model)
    assert grad_counts(grads) == (8, 8, 4)
    assert torch.isfinite(torch.tensor(loss))
    assert storage_by_base_name(model, backend) == before
    with capsys.disabled():
        print(f"\n[gptq C14-A] loss={loss:.4f} grad_counts={grad_counts(grads)}")


def test_gptq_undo_unpins_the_layers(gptq_model: nn.Module) -> None:
    """C14: before_training's pin is recorded and undone with the rest of the preparation."""
    report = prepare(gptq_model)
    assert {m.linear_mode for m in _aten_layers(gptq_model)} == {"train"}
    report.undo()
    assert {m.linear_mode for m in _aten_layers(gptq_model)} == {None}
    assert not _checkpointing_on(gptq_model)


def test_gptq_layers_latched_by_an_eval_forward_raise_before_anything_changes(gptq_model: nn.Module) -> None:
    """C14 variant B: after an eval no-grad forward all 14 layers are in inference mode; prepare
    raises NotTrainableError counting them and naming the fix, and changes nothing."""
    model = gptq_model
    eval_forward(model)
    assert [m.linear_mode for m in _aten_layers(model)] == ["inference"] * N_LINEARS
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks_before = embed_hooks(model)

    with pytest.raises(NotTrainableError) as info:
        prepare(model, gradient_checkpointing_kwargs={"use_reentrant": True})
    message = str(info.value)
    assert "14 of 14 GPTQ layers" in message
    assert "Reload" in message
    assert 'GPTQConfig(bits=4, backend="gptq_torch")' in message
    assert isinstance(info.value, ValueError)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before
    assert embed_hooks(model) == hooks_before
    assert not _checkpointing_on(model)
    with pytest.raises(NotTrainableError):
        plan(model)


def test_gptq_torch_kernel_has_no_mode_and_trains_after_an_eval_forward(gptq_dir: str) -> None:
    """C14 whole kind: loaded with backend="gptq_torch" (TorchLinear, no linear_mode), an eval
    no-grad forward before prepare is harmless: prepare succeeds and the step gives 8/8, 4 non-zero."""
    from transformers import GPTQConfig

    # TorchLinear wraps its dequantize in torch.compile (inductor): over a minute on 2 CPU cores
    # for nothing this test checks; run it eagerly (torch 2.13 has no torch._dynamo.config.disable)
    with torch.compiler.set_stance("force_eager"):
        model = from_pretrained(gptq_dir, torch.float16, quantization_config=GPTQConfig(bits=4, backend="gptq_torch"))
        layers = [m for m in model.modules() if type(m).__name__ == "TorchLinear"]
        assert len(layers) == N_LINEARS and not any(hasattr(m, "linear_mode") for m in layers)
        eval_forward(model)
        report = prepare(model)
        assert report.backend == "gptq" and report.casts == ()
        _loss, grads = standard_step(add_lora(model))
    assert grad_counts(grads) == (8, 8, 4)


def test_gptq_upcast_all_casts_only_the_plain_parameters_and_feeds_kernels_fp16(gptq_model: nn.Module) -> None:
    """C05(a) with upcast="all": exactly the 7 plain parameters are cast, no buffer changes, and
    every GPTQ layer still receives fp16 inputs; a warning says the kernels want their own dtype."""
    model = gptq_model
    backend = get_backend("gptq")
    before = storage_by_base_name(model, backend)
    p = plan(model, upcast="all")
    assert {c.name for c in p.casts} == PLAIN
    assert {(c.from_dtype, c.to_dtype) for c in p.casts} == {(torch.float16, torch.float32)}
    assert p.bytes_delta == sum(t.numel() for t in model.parameters()) * 2
    with pytest.warns(MemoryWarning, match="upcast='all' on a gptq model"):
        prepare(model, upcast="all")
    assert storage_by_base_name(model, backend) == before
    peft_model = add_lora(model)
    with kernel_inputs(_aten_layers(model)) as seen:
        _loss, grads = standard_step(peft_model)
    assert grad_counts(grads) == (8, 8, 4)
    assert len(seen) >= N_LINEARS and set(seen) == {torch.float16}  # checkpointing reruns forwards


@pytest.mark.parametrize("tier", ["hf_quantizer", "config_object", "config_dict", "attribute", "modules"])
def test_gptq_is_detected_and_not_upcast_in_every_evidence_tier(gptq_model: nn.Module, tier: str) -> None:
    """C05 whole kind: whichever tier finds GPTQ, auto casts nothing on the real model."""
    from transformers import GPTQConfig

    model = gptq_model
    quantizer = model.hf_quantizer
    strip_quantization_evidence(model)
    if tier == "hf_quantizer":
        model.hf_quantizer = quantizer
    elif tier == "config_object":
        model.config.quantization_config = GPTQConfig(bits=4)
    elif tier == "config_dict":
        model.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    elif tier == "attribute":
        model.quantization_method = "gptq"
    detection = detect_backend(model)
    assert detection.backend == "gptq"
    if tier == "modules":
        assert detection.reason == "found 14 GPTQ TorchAtenLinear modules"
    p = plan(model)
    assert (p.casts, p.bytes_delta) == ((), 0)


# -- C05(b): a toy GPTQ layer that multiplies its raw input (the original kernel's behaviour) ---


class ToyGptqLinear(nn.Module):
    """Packed 4-bit weight: ``qweight`` int32 (in/8, out), ``scales`` fp16 (out,). Its forward
    dequantizes to fp16 and multiplies the input as it comes, so fp32 input fails."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float().t()  # (in, out)
        scales = w.abs().amax(dim=0).clamp(min=1e-6) / 7
        q = (torch.round(w / scales).clamp(-8, 7) + 8).to(torch.int32)  # 0..15
        q = q.reshape(w.shape[0] // 8, 8, w.shape[1])
        packed = torch.zeros(w.shape[0] // 8, w.shape[1], dtype=torch.int32)
        for i in range(8):
            packed |= q[:, i, :] << (4 * i)
        self.register_buffer("qweight", packed)
        self.register_buffer("scales", scales.to(torch.float16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shifts = torch.arange(0, 32, 4, dtype=torch.int32).view(1, 8, 1)
        q = (self.qweight.unsqueeze(1) >> shifts) & 15
        w = (q.reshape(-1, self.qweight.shape[1]) - 8).to(torch.float16) * self.scales
        return x @ w


def _toy_gptq_model(tier: str) -> nn.Module:
    model = tiny_llama(torch.float16)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            model.set_submodule(name, ToyGptqLinear(module))
    if tier == "attribute":
        model.quantization_method = "gptq"
    else:
        model.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    return model


@pytest.mark.parametrize("tier", ["attribute", "config_dict"])
def test_toy_gptq_layer_flagged_in_one_tier_is_not_upcast_and_trains(tier: str) -> None:
    """C05(b): backend gptq, 0 casts, and a training forward runs without a dtype error."""
    model = _toy_gptq_model(tier)
    assert sum(isinstance(m, ToyGptqLinear) for m in model.modules()) == N_LINEARS
    detection = detect_backend(model)
    assert detection.backend == "gptq"
    assert detection.reason in (
        "model.quantization_method is 'gptq'",
        "model.config.quantization_config['quant_method'] is 'gptq'",
    )
    report = prepare(model)
    assert (report.casts, report.bytes_delta) == ((), 0)
    params = dict(model.named_parameters())
    assert len(params) == N_PLAIN and {p.dtype for p in params.values()} == {torch.float16}
    model.train()
    embed = model.get_input_embeddings()
    embed.weight.requires_grad_(True)  # something upstream to differentiate
    out = model(input_ids=standard_batch(), labels=standard_batch())
    out.loss.backward()
    assert out.logits.dtype == torch.float16
    assert embed.weight.grad is not None and bool(embed.weight.grad.abs().sum() > 0)


def test_toy_gptq_layer_gets_fp16_inputs_under_upcast_all() -> None:
    """C05(b) with upcast="all": the toy kernel would fail on fp32; its inputs are cast to fp16."""
    model = _toy_gptq_model("config_dict")
    with pytest.warns(MemoryWarning, match="expect their own compute"):
        report = prepare(model, upcast="all")
    assert len(report.casts) == N_PLAIN
    assert {m.computes for m in report.precision if "proj" in m.name} == {torch.float16}
    model.train()
    out = model(input_ids=standard_batch(), labels=standard_batch())
    assert torch.isfinite(out.loss)


@pytest.mark.gpu
def test_gptq_quantized_on_cuda_trains_one_step(model_root: str, tmp_path: Any) -> None:
    """C05(a) on CUDA: quantize with gptqmodel on the GPU, reload, prepare, LoRA, one step."""
    pytest.importorskip("gptqmodel", reason="gptqmodel is not installed")
    from _models import saved_tiny
    from _quantized import quantize_gptq

    qdir = quantize_gptq(saved_tiny(model_root, "float16"), str(tmp_path / "gptq-cuda"), device_map="cuda")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(qdir, dtype=torch.float16, device_map="cuda")
    backend = get_backend("gptq")
    before = storage_by_base_name(model, backend)
    p = prepare(model)
    assert p.backend == "gptq" and p.casts == ()
    lora_step_trains(model)
    assert storage_by_base_name(model, backend) == before
