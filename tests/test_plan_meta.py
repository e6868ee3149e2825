"""``plan`` on a meta-device model (issue 18): the plan of a model built from a config without
weights is the plan of the loaded model, bytes counted from shapes; ``prepare`` still refuses it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import kbitprep
from _models import load, saved_tiny, tiny_llama
from _quantized import bnb4_config


def _meta_twin(model: nn.Module) -> nn.Module:
    """The same module tree with every parameter and buffer on the meta device."""
    from kbitprep._estimate._build import meta_working_copy

    work, _ = meta_working_copy(model, None)
    return work


@pytest.mark.parametrize("upcast", ["auto", "all", "none"])
def test_plan_of_an_unquantized_meta_model_is_the_loaded_models(upcast: str) -> None:
    real = tiny_llama(torch.bfloat16)
    with torch.device("meta"):
        meta = tiny_llama(torch.bfloat16)
    assert all(p.device.type == "meta" for p in meta.parameters())
    expected = kbitprep.plan(real, upcast=upcast).to_dict()
    got = kbitprep.plan(meta, upcast=upcast).to_dict()
    assert got == expected
    if upcast == "all":
        # every bf16 parameter to fp32: 2 more bytes per element, tied weights once
        elements = sum(p.numel() for p in {id(p): p for p in real.parameters()}.values())
        assert got["bytes_delta"] == 2 * elements
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in meta.parameters())


def test_plan_of_a_meta_nf4_model_is_the_loaded_models(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    real = load(saved_tiny(str(tmp_path)), quantization_config=bnb4_config(bnb_4bit_compute_dtype=torch.float32))
    meta = _meta_twin(real)
    assert all(t.device.type == "meta" for t in meta.parameters())
    expected = kbitprep.plan(real, keep_in_low_precision=("lm_head",)).to_dict()
    got = kbitprep.plan(meta, keep_in_low_precision=("lm_head",)).to_dict()
    assert got["backend"] == "bitsandbytes"
    assert got == expected
    assert got["bytes_delta"] > 0 and got["storage_bytes"] > 0


def test_prepare_still_refuses_the_meta_model_after_plan_accepted_it() -> None:
    with torch.device("meta"):
        meta = tiny_llama(torch.bfloat16)
    kbitprep.plan(meta)
    with pytest.raises(kbitprep.InvalidModelError, match="kbitprep.plan and kbitprep.estimate accept"):
        kbitprep.prepare(meta)
    assert all(p.requires_grad for p in meta.parameters())
