"""quanto strategy: real optimum-quanto 0.2.7 weights, loaded through transformers' QuantoConfig
and quantized with quanto's own quantize/freeze, on the tiny Llama (14 decoder linears)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from _lora import add_lora, grad_counts, standard_step
from _measure import storage_state
from _models import N_LINEARS, N_PLAIN, from_pretrained, saved_tiny, standard_batch, tiny_llama
from _plan_warnings import emitted_of, warning_of
from _quantized import strip_quantization_evidence
from kbitprep import KbitPrepWarning, MemoryWarning, detect_backend, get_backend, plan, prepare

pytest.importorskip("optimum.quanto", reason="optimum-quanto is not installed (pip install optimum-quanto==0.2.7)")

# bytes of one 64x64 quanto weight (independent of kbitprep): codes + per-row scale (+ shift for
# the 2/4-bit QBitsTensor, whose codes are packed two per uint8). dtype bytes: bf16 2, fp32 4.
_CODE_BYTES = {"int8": 64 * 64, "float8": 64 * 64, "int4": 64 * 64 // 2}
_HAS_SHIFT = {"int8": False, "float8": False, "int4": True}


def _q_proj_bytes(weights: str, dtype: torch.dtype) -> int:
    per_row = torch.tensor([], dtype=dtype).element_size() * 64
    return _CODE_BYTES[weights] + per_row * (2 if _HAS_SHIFT[weights] else 1)


def _quanto_layers(model: nn.Module) -> list[nn.Module]:
    from optimum.quanto.nn import QLinear

    return [m for m in model.modules() if isinstance(m, QLinear)]


def _load(model_root: str, weights: str, dtype: torch.dtype) -> nn.Module:
    from transformers import QuantoConfig

    src = saved_tiny(model_root, str(dtype).removeprefix("torch."))
    return from_pretrained(src, dtype, quantization_config=QuantoConfig(weights=weights))


def _train_and_check(model: nn.Module, dtype: torch.dtype) -> tuple[float, tuple[int, int, int]]:
    """LoRA r=4 on q_proj/v_proj, one step; every LoRA B gets a non-zero gradient and the
    quantized storage is bit-identical afterwards."""
    backend = get_backend("quanto")
    before = storage_state(model, backend)
    peft_model = add_lora(model, r=4)
    loss, grads = standard_step(peft_model)
    assert grad_counts(grads) == (8, 8, 4)
    assert torch.isfinite(torch.tensor(loss))
    assert storage_state(model, backend) == before
    assert {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n} == {torch.float32}
    return loss, grad_counts(grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("weights", ["int8", "int4", "float8"])
def test_quanto_config_load_is_detected_kept_as_stored_and_trains(
    model_root: str, weights: str, dtype: torch.dtype, capsys: pytest.CaptureFixture[str]
) -> None:
    """QuantoConfig(weights=...) through transformers 5.24: backend quanto from the quantizer,
    nothing cast, compute dtype = load dtype, the 14 subclass weights frozen and unchanged, and
    one LoRA step gives every lora_B a non-zero gradient."""
    model = _load(model_root, weights, dtype)
    layers = _quanto_layers(model)
    assert len(layers) == N_LINEARS
    q = model.model.layers[0].self_attn.q_proj
    assert type(q.weight).__name__ == ("WeightQBitsTensor" if weights == "int4" else "WeightQBytesTensor")
    assert q.weight.dtype == dtype  # the subclass reports its scale's dtype

    detection = detect_backend(model)
    assert detection.backend == "quanto"
    assert detection.reason == "model.hf_quantizer is QuantoHfQuantizer (quant_method 'quanto')"

    backend = get_backend("quanto")
    state = storage_state(model, backend)
    assert len(state) == N_LINEARS
    assert state["model.layers.0.self_attn.q_proj.weight"][2] == _q_proj_bytes(weights, dtype)

    p = plan(model)
    assert (p.backend, p.casts, p.bytes_delta) == ("quanto", (), 0)
    assert p.compute_dtype == dtype
    assert backend.compute_dtype(model) == dtype

    prepare(model)
    params = dict(model.named_parameters())
    assert sum(1 for p_ in params.values() if p_.requires_grad) == 0
    assert {type(params[f"{n}.weight"]).__name__ for n, m in model.named_modules() if m in layers} == {
        type(q.weight).__name__
    }
    plain = {n: p_.dtype for n, p_ in params.items() if type(p_) is nn.Parameter}
    assert len(plain) == N_PLAIN and set(plain.values()) == {dtype}

    loss, counts = _train_and_check(model, dtype)
    with capsys.disabled():
        print(f"\n[quanto QuantoConfig {weights} {dtype}] loss={loss:.4f} grad_counts={counts}")


def test_peft_casts_the_quanto_weights_where_kbitprep_keeps_them(model_root: str) -> None:
    """Why the strategy exists: peft 0.21.2 upcasts every bf16 parameter, quanto's weights
    included, and quanto refuses the cast; kbitprep leaves them as stored."""
    from peft import prepare_model_for_kbit_training

    with pytest.raises(Exception, match="The dtype of a weights Tensor cannot be changed"):
        prepare_model_for_kbit_training(_load(model_root, "int8", torch.bfloat16))
    model = _load(model_root, "int8", torch.bfloat16)
    prepare(model)
    assert {type(m.weight).__name__ for m in _quanto_layers(model)} == {"WeightQBytesTensor"}
    assert {m.weight.dtype for m in _quanto_layers(model)} == {torch.bfloat16}


def _quanto_own(weights: str, activations: str | None, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The tiny Llama quantized with optimum.quanto.quantize (decoder only, as transformers
    leaves lm_head), calibrated on one batch when activations are quantized, then frozen."""
    import optimum.quanto as oq

    model = tiny_llama(dtype)
    qtypes: dict[str, Any] = {"int8": oq.qint8, "int4": oq.qint4, "float8": oq.qfloat8}
    oq.quantize(model.model, weights=qtypes[weights], activations=qtypes[activations] if activations else None)
    if activations:
        with oq.Calibration():
            model(input_ids=standard_batch(1, 8))
    oq.freeze(model.model)
    return model


@pytest.mark.parametrize(("weights", "activations"), [("int8", None), ("int4", "float8")])
def test_quanto_own_quantize_freeze_is_found_by_its_layers_and_trains(
    weights: str, activations: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    """quantize/freeze without transformers: no quantizer or attribute, found by the 14 QLinear
    layers; peft's fp32 upcast would break the bf16 layers, kbitprep casts nothing and trains."""
    model = _quanto_own(weights, activations)
    assert getattr(model, "hf_quantizer", None) is None and getattr(model, "quantization_method", None) is None
    # quanto's freeze leaves the quantized weights requires_grad=True: prepare must freeze them
    assert all(m.weight.requires_grad for m in _quanto_layers(model))
    detection = detect_backend(model)
    assert (detection.backend, detection.reason) == ("quanto", "found 14 quanto QLinear modules")
    p = plan(model)
    assert (p.casts, p.bytes_delta, p.compute_dtype, p.warnings) == ((), 0, torch.bfloat16, ())
    prepare(model)
    assert not any(m.weight.requires_grad for m in _quanto_layers(model))
    loss, counts = _train_and_check(model, torch.bfloat16)
    with capsys.disabled():
        print(f"\n[quanto quantize/freeze w={weights} a={activations}] loss={loss:.4f} grad_counts={counts}")


def test_unfrozen_quanto_layers_are_named_in_a_warning() -> None:
    """Before freeze a quanto layer holds a plain float weight (quantized at each forward): it
    is no storage, nothing is cast, and the plan says the model is not stored quantized."""
    import optimum.quanto as oq

    model = tiny_llama(torch.bfloat16)
    oq.quantize(model.model, weights=oq.qint8)
    assert detect_backend(model).backend == "quanto"
    p = plan(model)
    assert p.casts == ()
    assert warning_of(p, "backend", "optimum.quanto.freeze").startswith("14 of 14 quanto layers")


@pytest.mark.parametrize("tier", ["config_object", "config_dict", "attribute", "modules"])
def test_quanto_is_detected_in_every_evidence_tier(model_root: str, tier: str) -> None:
    """Whichever tier finds quanto, the reason names it and auto casts nothing."""
    from transformers import QuantoConfig

    model = _load(model_root, "int8", torch.bfloat16)
    strip_quantization_evidence(model)
    expected = {
        "config_object": "model.config.quantization_config.quant_method is 'quanto'",
        "config_dict": "model.config.quantization_config['quant_method'] is 'quanto'",
        "attribute": "model.quantization_method is 'quanto'",
        "modules": "found 14 quanto QLinear modules",
    }[tier]
    if tier == "config_object":
        model.config.quantization_config = QuantoConfig(weights="int8")
    elif tier == "config_dict":
        model.config.quantization_config = {"quant_method": "quanto", "weights": "int8"}
    elif tier == "attribute":
        model.quantization_method = "quanto"
    assert (detect_backend(model).backend, detect_backend(model).reason) == ("quanto", expected)
    assert plan(model).casts == ()


def test_quanto_upcast_all_casts_only_plain_parameters_and_feeds_layers_their_dtype(model_root: str) -> None:
    """upcast="all" on bf16 int4: the 7 plain parameters go to fp32, the quanto weights stay
    bf16-reporting subclasses, and LoRA trains (the layers must get bf16 inputs: on fp32 they
    raise "expected m1 and m2 to have the same dtype")."""
    model = _load(model_root, "int4", torch.bfloat16)
    p = plan(model, upcast="all")
    assert len(p.casts) == N_PLAIN and {(c.from_dtype, c.to_dtype) for c in p.casts} == {
        (torch.bfloat16, torch.float32)
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", KbitPrepWarning)
        prepare(model, upcast="all")
    assert emitted_of(caught, MemoryWarning, "expect their own compute")
    assert {m.weight.dtype for m in _quanto_layers(model)} == {torch.bfloat16}
    _train_and_check(model, torch.bfloat16)  # a quanto layer fed fp32 raises a dtype error
