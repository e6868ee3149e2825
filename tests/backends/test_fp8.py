"""The fp8 strategy on transformers 5.24's finegrained ``FP8Linear`` and ``FbgemmFp8Linear``.

transformers refuses to build FP8 layers on a CPU (a pre-quantized FP8 checkpoint loads
dequantized there) and its FP8 matmul comes from a hub kernel, so the tiny Llama's 14 decoder
linears are replaced by hand-built ``FP8Linear`` layers (float8_e4m3fn weights, 32x32 block
float32 ``weight_scale_inv``), and ``fp8_linear`` by a CPU reference that dequantizes with
transformers' own ``_dequantize_fp8_weight`` and returns the input's dtype. The backward is
transformers' ``FP8LinearFunction``, unchanged.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kbitprep
from _lora import add_lora, standard_step
from _measure import storage_state
from _models import decoder_linears, tiny_llama
from _plan_warnings import emitted_of

pytest.importorskip("transformers.integrations.finegrained_fp8")

from transformers.integrations import finegrained_fp8 as fg  # noqa: E402
from transformers.integrations.fbgemm_fp8 import FbgemmFp8Linear  # noqa: E402
from transformers.integrations.finegrained_fp8 import FP8Linear  # noqa: E402

from kbitprep.backends.fp8 import Fp8Backend  # noqa: E402

BLOCK = (32, 32)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# per layer: q/k/v/o 64x64 and gate/up/down 128x64 one-byte weights; float32 block scales of
# 2x2 (q/k/v/o) and 4x2 / 2x4 (gate, up / down) entries
STORAGE_BYTES = 2 * (4 * 64 * 64 + 3 * 128 * 64) + 2 * 4 * (4 * 4 + 3 * 8)


def _reference_fp8_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    block_size: Any = None,
    bias: torch.Tensor | None = None,
    activation_scale: torch.Tensor | None = None,
    allow_deepgemm: bool = True,
) -> torch.Tensor:
    """CPU stand-in for the hub kernel: dequantize to the input's dtype, then ``F.linear``."""
    w = fg._dequantize_fp8_weight(weight, weight_scale_inv, block_size, input.dtype)
    return F.linear(input, w, bias)


@pytest.fixture(autouse=True)
def cpu_fp8_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fg, "fp8_linear", _reference_fp8_linear)


def _to_fp8(linear: nn.Module) -> FP8Linear:
    """Block-wise float8_e4m3fn quantization of ``linear`` (scale = block absmax / 448)."""
    out, inn = linear.weight.shape
    layer = FP8Linear(inn, out, block_size=BLOCK)
    w = linear.weight.detach().float()
    bn, bk = BLOCK
    scale = w.unflatten(0, (out // bn, bn)).unflatten(-1, (inn // bk, bk)).abs().amax(dim=(1, 3)) / FP8_MAX
    full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    layer.weight.data = (w / full).to(torch.float8_e4m3fn)
    layer.weight_scale_inv.data = scale
    return layer


def fp8_llama(dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    model = tiny_llama(dtype)
    for name, linear in decoder_linears(model):
        model.set_submodule(name, _to_fp8(linear))
    return model


def _fp8_storage(model: nn.Module) -> dict[str, tuple[torch.dtype, str]]:
    """(dtype, sha256) of every FP8Linear weight and weight_scale_inv, by base-model name."""
    state = storage_state(model, Fp8Backend())
    return {n: (s[0], s[4]) for n, s in state.items() if n.endswith(("weight", "weight_scale_inv"))}


# -- detection -------------------------------------------------------------------------------


def _label_quantizer(model: nn.Module) -> str:
    from transformers import FineGrainedFP8Config
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    model.hf_quantizer = FineGrainedFP8HfQuantizer(FineGrainedFP8Config(weight_block_size=BLOCK))
    return "FineGrainedFP8HfQuantizer (quant_method 'fp8')"


def _label_config(model: nn.Module) -> str:
    from transformers import FineGrainedFP8Config

    model.config.quantization_config = FineGrainedFP8Config(weight_block_size=BLOCK)
    return "quantization_config.quant_method is 'fp8'"


def _label_dict(model: nn.Module) -> str:
    model.config.quantization_config = {"quant_method": "fbgemm_fp8"}
    return "quantization_config['quant_method'] is 'fbgemm_fp8'"


def _label_legacy(model: nn.Module) -> str:
    from transformers.utils.quantization_config import QuantizationMethod

    model.quantization_method = QuantizationMethod.FP8
    return "model.quantization_method is 'fp8'"


def _no_label(model: nn.Module) -> str:
    return "found 14 FP8Linear modules"


@pytest.mark.parametrize("label", [_label_quantizer, _label_config, _label_dict, _label_legacy, _no_label])
def test_detected_in_every_tier(label: Any) -> None:
    model = fp8_llama()
    expected = label(model)
    detection = kbitprep.detect_backend(model)
    assert detection.backend == "fp8"
    assert expected in detection.reason


class _RawFp8(nn.Module):
    """A module of another class holding a float8 ``weight`` beside its ``weight_scale_inv``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.weight, self.weight_scale_inv = layer.weight, layer.weight_scale_inv


def test_layers_of_several_classes_are_counted_after_one_found() -> None:
    """The reason counts each class, sorted, after one "found" (the default detect; before it,
    each class repeated "found")."""
    model = fp8_llama()
    name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, FP8Linear))
    model.set_submodule(name, _RawFp8(layer))
    assert Fp8Backend().detect(model) == "found 13 FP8Linear modules, 1 _RawFp8 module"


def test_label_without_fp8_storage_is_unquantized() -> None:
    """The same label on the plain model: no storage behind it, so `none` (C19)."""
    model = tiny_llama()
    _label_quantizer(model)
    detection = kbitprep.detect_backend(model)
    assert detection.backend == "none"
    assert "'fp8'" in detection.reason and "dequantized" in detection.reason


# -- storage and the plan ---------------------------------------------------------------------


def test_storage_is_float8_weights_and_their_scales() -> None:
    model = fp8_llama()
    backend = kbitprep.get_backend("fp8")
    modules = dict(model.named_modules())
    storage = {
        n for n, p in model.named_parameters() if backend.is_quantized_param(n, p, modules[n.rpartition(".")[0]])
    }
    assert len(storage) == 28  # 14 float8_e4m3fn weights + 14 float32 weight_scale_inv
    assert {p.dtype for n, p in model.named_parameters() if n in storage} == {torch.float8_e4m3fn, torch.float32}
    # the shared base rule says the same, with no FP8-specific code
    generic = kbitprep.get_backend("generic")
    assert storage == {
        n for n, p in model.named_parameters() if generic.is_quantized_param(n, p, modules[n.rpartition(".")[0]])
    }
    assert backend.compute_dtype(model) == torch.bfloat16
    assert all(backend.input_dtype(m) is None for m in model.modules())


@pytest.mark.parametrize("upcast", ["auto", "none", "all"])
def test_plan_never_casts_or_computes_in_float8(upcast: str) -> None:
    model = fp8_llama()
    p = kbitprep.plan(model, upcast=upcast)
    assert p.backend == "fp8"
    assert p.compute_dtype == torch.bfloat16
    assert p.activation_dtype in (torch.bfloat16, torch.float32)
    assert not any("float8" in f"{r.stored} {r.computes} {r.output_to}" for r in p.precision)
    assert not any("float8" in str(i.dtype) for i in p.model_inputs)
    assert not any("weight_scale_inv" in c.name or "float8" in f"{c.from_dtype} {c.to_dtype}" for c in p.casts)
    assert len(p.casts) == (7 if upcast == "all" else 0)  # embed_tokens, 5 RMSNorm weights, lm_head
    assert p.storage_bytes == STORAGE_BYTES


# -- training --------------------------------------------------------------------------------


def _train_two_steps(model: nn.Module) -> dict[str, torch.Tensor | None]:
    lora = add_lora(model, r=4)
    standard_step(lora)
    lora.zero_grad()
    _loss, grads = standard_step(lora)  # step 2: lora_B moved off zero, so lora_A gets a gradient too
    return grads


@pytest.mark.parametrize("upcast", ["auto", "all"])
def test_lora_trains_and_fp8_storage_is_bit_identical(upcast: str) -> None:
    model = fp8_llama()
    before = _fp8_storage(model)
    assert len(before) == 28
    if upcast == "all":
        with pytest.warns(kbitprep.MemoryWarning) as seen:
            report = kbitprep.prepare(model, upcast=upcast)
        assert emitted_of(seen, kbitprep.MemoryWarning, "upcast='all' on a fp8 model")
    else:
        report = kbitprep.prepare(model, upcast=upcast)
    assert _fp8_storage(model) == before  # prepare casts no float8 and no scale
    grads = _train_two_steps(model)
    assert len(grads) == 8  # r=4 LoRA on q_proj and v_proj of 2 layers: A and B each
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads.values())
    after = _fp8_storage(model)
    assert after == before  # weights and scales bit-identical after two optimizer steps
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    report.undo()


def test_fbgemm_layers_are_refused_and_model_unchanged() -> None:
    model = tiny_llama()
    for name, linear in decoder_linears(model):
        layer = FbgemmFp8Linear(linear.in_features, linear.out_features, bias=False)
        model.set_submodule(name, layer)
    state = {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    assert kbitprep.detect_backend(model).backend == "fp8"
    with pytest.raises(kbitprep.NotTrainableError) as info:
        kbitprep.prepare(model)
    assert "FbgemmFp8Linear" in str(info.value) and "no backward" in str(info.value)
    assert {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()} == state


def test_fp4_packed_weights_are_refused() -> None:
    model = fp8_llama()
    q_proj = model.model.layers[0].self_attn.q_proj
    q_proj.weight = nn.Parameter(torch.zeros(64, 32, dtype=torch.int8), requires_grad=False)
    with pytest.raises(kbitprep.NotTrainableError) as info:
        kbitprep.plan(model)
    assert "FP4" in str(info.value) and "model.layers.0.self_attn.q_proj" in str(info.value)
