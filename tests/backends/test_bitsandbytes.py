"""bitsandbytes strategy: the conformance kit on the tiny Llama loaded 4-bit NF4 and 8-bit LLM.int8().

Plus what is particular to bitsandbytes, worked out from the library's own classes rather than
from the strategy: peft's upcast of every non-storage fp16/bf16 parameter, the packed
``Params4bit`` / ``Int8Params`` kept as they are, and the CPU inference repack switched off.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'kbitprep[bnb]')")

import bitsandbytes as bnb  # noqa: E402

import kbitprep  # noqa: E402
from _models import load, saved_tiny  # noqa: E402
from _quantized import bnb4_config  # noqa: E402
from kbitprep.backends.bitsandbytes import BitsAndBytesBackend  # noqa: E402
from kbitprep.testing import BackendConformanceTests  # noqa: E402

N_LINEARS = 14  # 7 per decoder layer, 2 layers; lm_head stays a plain nn.Linear
PLAIN = {
    "model.embed_tokens.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.1.input_layernorm.weight",
    "model.layers.1.post_attention_layernorm.weight",
    "model.norm.weight",
    "lm_head.weight",
}


def _bnb4(root: str) -> nn.Module:
    return load(saved_tiny(root), quantization_config=bnb4_config())


def _bnb8(root: str) -> nn.Module:
    from transformers import BitsAndBytesConfig

    return load(saved_tiny(root), quantization_config=BitsAndBytesConfig(load_in_8bit=True))


BUILDERS = {"4bit-nf4": _bnb4, "8bit-int8": _bnb8}
# what bitsandbytes itself stores the packed weight as: the ground truth, not the strategy's word
STORAGE = {"4bit-nf4": (bnb.nn.Params4bit, torch.uint8), "8bit-int8": (bnb.nn.Int8Params, torch.int8)}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Kit(BackendConformanceTests):
    backend_cls = BitsAndBytesBackend
    kind: str

    @pytest.fixture(autouse=True)
    def _model_root(self, model_root: str) -> None:
        self.root = model_root

    def make_model(self) -> nn.Module:
        return BUILDERS[self.kind](self.root)


class TestBitsAndBytes4bitConformance(_Kit):
    """``BitsAndBytesConfig(load_in_4bit=True, nf4, double quant, bf16 compute)``: 14 Linear4bit."""

    kind = "4bit-nf4"


class TestBitsAndBytes8bitConformance(_Kit):
    """``BitsAndBytesConfig(load_in_8bit=True)``: 14 Linear8bitLt."""

    kind = "8bit-int8"


# -- what is particular to bitsandbytes ------------------------------------------------------------


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_every_plain_half_parameter_goes_to_fp32_and_packed_weights_keep_their_bytes(
    model_root: str, kind: str
) -> None:
    """peft 0.21's policy: after prepare every fp16/bf16 parameter that is not bitsandbytes'
    packed storage is float32; every Params4bit (uint8) / Int8Params (int8) keeps its class,
    dtype, shape and byte count and stays frozen. The plan names exactly the 7 plain parameters
    and bytes_delta is 2 bytes per element of them (bf16 -> fp32)."""
    model = BUILDERS[kind](model_root)
    storage_cls, storage_dtype = STORAGE[kind]
    params = dict(model.named_parameters())
    packed = {n: (p.dtype, tuple(p.shape), _nbytes(p)) for n, p in params.items() if isinstance(p, storage_cls)}
    assert len(packed) == N_LINEARS
    assert {dtype for dtype, _shape, _nb in packed.values()} == {storage_dtype}
    half = {n for n, p in params.items() if n not in packed and p.dtype in (torch.float16, torch.bfloat16)}
    assert half == PLAIN

    p = kbitprep.plan(model)
    assert {c.name for c in p.casts} == PLAIN
    assert {(c.from_dtype, c.to_dtype) for c in p.casts} == {(torch.bfloat16, torch.float32)}
    assert p.bytes_delta == sum(params[n].numel() for n in PLAIN) * 2 == 256_640

    report = kbitprep.prepare(model)
    assert report.backend == "bitsandbytes"
    after = dict(model.named_parameters())
    for name, param in after.items():
        if name in packed:
            assert type(param) is storage_cls, f"{name}: {type(param).__name__}"
            assert (param.dtype, tuple(param.shape), _nbytes(param)) == packed[name], name
        else:
            assert param.dtype == torch.float32, f"{name} is {param.dtype} after prepare"
        assert not param.requires_grad, f"{name} left trainable"


def test_eval_forward_repack_is_undone_and_switched_off(model_root: str) -> None:
    """bitsandbytes 0.50 repacks a 4-bit weight for good on the first eval no-grad forward on an
    AVX512-BF16 CPU (a layout with no backward). After such a forward, prepare leaves every
    Params4bit byte-identical to the loaded checkpoint, turns ``support_avx512bf16_for_cpu`` off
    on every Linear4bit, and undo gives the flags back."""
    model = _bnb4(model_root)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == N_LINEARS
    loaded = {id(m): m.weight.detach().clone() for m in layers}
    flags = [getattr(m, "support_avx512bf16_for_cpu", None) for m in layers]

    with torch.no_grad():
        model(torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0)))
    report = kbitprep.prepare(model)

    for m in layers:
        assert isinstance(m.weight, bnb.nn.Params4bit) and m.weight.dtype == torch.uint8
        assert torch.equal(m.weight.detach(), loaded[id(m)]), "a 4-bit weight was left in another layout"
        if hasattr(m, "support_avx512bf16_for_cpu"):
            assert m.support_avx512bf16_for_cpu is False
    report.undo()
    assert [getattr(m, "support_avx512bf16_for_cpu", None) for m in layers] == flags


def test_upcast_none_casts_nothing_and_still_freezes(model_root: str) -> None:
    """``upcast="none"``: no cast, bytes unchanged, every parameter keeps its dtype and is frozen."""
    model = _bnb4(model_root)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    bytes_before = sum(_nbytes(p) for p in model.parameters())
    report: Any = kbitprep.prepare(model, upcast="none")
    assert (report.casts, report.bytes_delta) == ((), 0)
    assert {n: p.dtype for n, p in model.named_parameters()} == dtypes
    assert sum(_nbytes(p) for p in model.parameters()) == bytes_before
    assert not any(p.requires_grad for p in model.parameters())


def test_layers_of_both_kinds_are_counted_after_one_found() -> None:
    """Without a quantizer, config or legacy attribute, the reason counts each layer class,
    sorted, after one "found" (the default detect; before it, each class repeated "found")."""
    model = nn.Sequential(bnb.nn.Linear4bit(8, 8), bnb.nn.Linear8bitLt(8, 8), bnb.nn.Linear4bit(8, 8))
    assert BitsAndBytesBackend().detect(model) == "found 2 Linear4bit modules, 1 Linear8bitLt module"
    assert kbitprep.detect_backend(model).backend == "bitsandbytes"
