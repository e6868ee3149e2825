"""Quantized storage is never cast, unfrozen or miscounted, whatever dtype it reports (C06, C07)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from _lora import add_lora, grad_counts, standard_step
from _measure import param_bytes, quantized_tensors, storage_record
from _models import PLAIN_NAMES
from _quantized import CPU_KINDS, bnb4_bf16_storage, torchao_direct, torchao_direct_intx, torchao_hf

ALWAYS = {"upcast": lambda name, param, module: True}
POLICIES: dict[str, dict[str, Any]] = {"auto": {}, "all": {"upcast": "all"}, "always-true": ALWAYS}


def _prepare(model: Any, **options: Any) -> Any:
    p = kbitprep.plan(model, **options)
    if p.warnings:
        with pytest.warns(kbitprep.KbitPrepWarning):
            return kbitprep.prepare(model, **options)
    return kbitprep.prepare(model, **options)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_bf16_stored_4bit_weights_are_never_cast(policy: str, model_root: str) -> None:
    """C06: with bnb_4bit_quant_storage=bf16 all 21 parameters report bf16, yet the plan casts
    exactly the 7 plain ones (256,640 bytes) and none of the 14 Params4bit, under auto, "all"
    and an always-True callable. After prepare the parameters total 554,240 bytes and every
    Params4bit is still bf16, same shape, bit-identical, requires_grad False."""
    import bitsandbytes as bnb

    model = bnb4_bf16_storage(model_root)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert param_bytes(model) == 297_600
    packed = {n: p for n, p in model.named_parameters() if isinstance(p, bnb.nn.Params4bit)}  # type: ignore[attr-defined]
    assert len(packed) == 14
    assert {tuple(p.shape) for p in packed.values()} == {(1024, 1), (2048, 1)}
    copies = {n: p.detach().clone() for n, p in packed.items()}

    report = _prepare(model, **POLICIES[policy])

    assert sorted(c.name for c in report.casts) == sorted(PLAIN_NAMES)
    assert report.bytes_delta == 256_640
    assert param_bytes(model) == 554_240
    after = dict(model.named_parameters())
    for n, p in copies.items():
        q = after[n]
        assert isinstance(q, bnb.nn.Params4bit) and q.dtype == torch.bfloat16, n  # type: ignore[attr-defined]
        # packed bytes read as bf16 include NaN patterns: compare the raw bits
        assert q.shape == p.shape and torch.equal(q.detach().view(torch.int16), p.view(torch.int16)), n
        assert q.requires_grad is False, n


def test_bf16_stored_4bit_model_trains(model_root: str) -> None:
    """C06: after prepare the bf16-stored 4-bit model's training forward runs and the standard
    step gives 8 LoRA grads, 4 lora_B non-zero."""
    model = bnb4_bf16_storage(model_root)
    kbitprep.prepare(model)
    loss, grads = standard_step(add_lora(model))
    assert torch.isfinite(torch.tensor(loss))
    assert grad_counts(grads) == (8, 8, 4)


@pytest.mark.parametrize("kind", list(CPU_KINDS))
def test_no_policy_touches_quantized_storage(kind: str, model_root: str) -> None:
    """C06 whole kind: for every backend that runs on CPU, under auto, "all" and an always-True
    callable, no quantized tensor (by the test's own ground truth: Params4bit, Int8Params,
    torchao subclasses, HQQ W_q, integer buffers) changes class, dtype, shape, bytes, content or
    requires_grad; undo between policies restores the loaded model."""
    model = CPU_KINDS[kind](model_root)
    before = {n: storage_record(t) for n, t in quantized_tensors(model).items()}
    for label, options in POLICIES.items():
        report = _prepare(model, **options)
        cast_names = {c.name for c in report.casts} | {t for c in report.casts for t in c.tied}
        assert not cast_names & set(before), (label, cast_names & set(before))
        after = {n: storage_record(t) for n, t in quantized_tensors(model).items()}
        assert after == before, label
        report.undo()


TORCHAO_ROUTES = {
    "a-transformers-int8": (torchao_hf, "Int8Tensor", 7, 256_640, False),
    "b-quantize_-int8": (torchao_direct, "Int8Tensor", 6, 128_640, True),
    "c-quantize_-intx-int4": (torchao_direct_intx, "IntxUnpackedToInt8Tensor", 6, 128_640, True),
}


@pytest.mark.parametrize("route", list(TORCHAO_ROUTES))
def test_float_reporting_torchao_weights_are_never_cast(route: str, model_root: str) -> None:
    """C07: torchao weights report bf16 but are tensor subclasses. (a) TorchAoConfig, (b)
    quantize_ int8 and (c) quantize_ intx int4 are detected as torchao (for (b), (c) the reason
    names the subclass); auto plans no casts, bytes_delta 0, checkpointing on; after prepare each
    quantized weight keeps its class, reports bf16, has bit-identical qdata and requires_grad
    False. upcast="all" casts exactly the plain Parameters: 7 / 256,640 B for (a), 6 / 128,640 B
    for (b) and (c), and leaves the quantized weights untouched."""
    build, cls, n_plain, all_delta, direct = TORCHAO_ROUTES[route]
    model = build(model_root)
    detection = kbitprep.detect_backend(model)
    assert detection.backend == "torchao"
    if direct:
        assert not hasattr(model, "hf_quantizer")
        assert cls in detection.reason
    weights = {n: p for n, p in model.named_parameters() if type(p).__name__ == cls}
    assert len(weights) == (14 if not direct else 15)
    qdata = {n: p.qdata.clone() for n, p in weights.items()}

    p = kbitprep.plan(model)
    assert p.casts == () and p.bytes_delta == 0 and p.gradient_checkpointing is True
    _prepare(model)
    after = dict(model.named_parameters())
    for n in weights:
        q = after[n]
        assert type(q).__name__ == cls and q.dtype == torch.bfloat16 and q.requires_grad is False, n
        assert torch.equal(q.qdata, qdata[n]), n

    model = build(model_root)
    plain = {n for n, q in model.named_parameters() if type(q) is nn.Parameter}
    report = _prepare(model, upcast="all")
    assert len(report.casts) == n_plain and {c.name for c in report.casts} == plain
    assert report.bytes_delta == all_delta
    after = dict(model.named_parameters())
    for n in weights:
        assert type(after[n]).__name__ == cls and after[n].dtype == torch.bfloat16, n
        assert torch.equal(after[n].qdata, qdata[n]), n


def test_torchao_int8_trains(model_root: str) -> None:
    """C07 (a): after prepare the TorchAoConfig int8 model gives 8 LoRA grads, 4 lora_B non-zero."""
    model = torchao_hf(model_root)
    kbitprep.prepare(model)
    loss, grads = standard_step(add_lora(model))
    assert torch.isfinite(torch.tensor(loss))
    assert grad_counts(grads) == (8, 8, 4)


class _Wrapped(nn.Parameter):
    """A float Parameter subclass no backend knows: storage of some unknown scheme."""


@pytest.mark.parametrize("backend", ["none", "generic", "bitsandbytes", "torchao"])
def test_any_parameter_subclass_is_storage_and_counted_by_inner_tensors(backend: str, model_root: str) -> None:
    """C07 whole kind: a parameter whose type is not exactly Parameter is treated as quantized
    storage by every strategy (never cast, never unfrozen), even under upcast="all"; bytes
    reported for torchao subclasses come from their inner tensors, not numel x element_size."""
    from _quantized import need

    if backend in ("bitsandbytes", "torchao"):
        need(backend)
    model = CPU_KINDS["none"](model_root)
    odd = _Wrapped(model.lm_head.weight.detach().clone(), requires_grad=False)
    model.lm_head.weight = odd
    report = _prepare(model, backend=backend, upcast="all")
    assert "lm_head.weight" not in {c.name for c in report.casts}
    assert type(model.lm_head.weight) is _Wrapped and model.lm_head.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.requires_grad is False

    from kbitprep.backends.base import tensor_nbytes

    int8 = torchao_direct(model_root)
    w = int8.lm_head.weight
    inner = (
        w.qdata.numel() * 1
        + w.scale.numel() * w.scale.element_size()
        + w.zero_point.numel() * w.zero_point.element_size()
    )
    assert tensor_nbytes(w) == inner != w.numel() * w.element_size()
