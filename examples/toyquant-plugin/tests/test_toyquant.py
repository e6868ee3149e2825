"""toyquant's own tests: kbitprep's conformance kit, plus what is specific to this plugin."""

from __future__ import annotations

import torch
from torch import nn
from toyquant import ToyQuantLinear, quantize
from toyquant.backend import ToyQuantBackend

import kbitprep
from kbitprep.testing import BackendConformanceTests


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    """A plain-torch language model: no transformers needed."""

    def __init__(self, vocab: int = 100, width: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def tiny_toyquant_model() -> nn.Module:
    torch.manual_seed(0)
    return quantize(TinyLM().to(torch.bfloat16))


class TestToyQuant(BackendConformanceTests):
    backend_cls = ToyQuantBackend

    def make_model(self) -> nn.Module:
        return tiny_toyquant_model()


def test_the_kit_runs_every_group_for_toyquant() -> None:
    """toyquant opts out of no conformance group: every check above runs."""
    for group in ("detection", "storage", "plan_apply", "undo", "training"):
        assert getattr(TestToyQuant, f"skip_{group}") is None, group


def test_found_through_the_entry_point() -> None:
    info = kbitprep.available_backends()["toyquant"]
    assert (info.source, info.status) == ("kbitprep-toyquant", "ok")


def test_detection_reason_names_the_evidence() -> None:
    model = tiny_toyquant_model()
    assert kbitprep.detect_backend(model).reason == "model.quantization_method is 'toyquant'"
    del model.quantization_method, model.is_quantized
    assert kbitprep.detect_backend(model).reason == "found 4 ToyQuantLinear modules"


def test_the_scale_is_storage_even_under_upcast_all() -> None:
    model = tiny_toyquant_model()
    p = kbitprep.plan(model, upcast="all", use_gradient_checkpointing=False)
    cast = {c.name for c in p.casts}
    assert not any(n.endswith((".scale", "up.weight", "down.weight")) for n in cast)
    assert "lm_head.weight" in cast and "embed_tokens.weight" in cast


def test_layer_matches_the_float_linear() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = ToyQuantLinear.from_linear(linear, compute_dtype=torch.float32)
    x = torch.randn(4, 64)
    assert torch.allclose(layer(x), linear(x), atol=0.02)
