"""none strategy (an unquantized model): the conformance kit on the tiny Llama in bf16.

Plus what is particular to it, peft 0.21's behaviour on a plain model: every fp16/bf16
parameter is upcast with its cost in bytes stated up front (a ``"memory"`` plan warning), and
gradient checkpointing is left as the model has it, off unless it was on.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from _models import checkpointing_on, enable_checkpointing, load, saved_tiny
from kbitprep.backends.none import NoQuantBackend
from kbitprep.testing import BackendConformanceTests

N_PARAMS = 21  # 14 decoder linears, embed_tokens, 5 RMSNorm weights, lm_head (untied)


def _prepare(model: nn.Module, **options: Any) -> tuple[Any, list[warnings.WarningMessage]]:
    """prepare() with the KbitPrepWarnings it emits recorded (the suite turns warnings into errors)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", kbitprep.KbitPrepWarning)
        report = kbitprep.prepare(model, **options)
    return report, [w for w in caught if issubclass(w.category, kbitprep.KbitPrepWarning)]


class TestNoQuantizationConformance(BackendConformanceTests):
    """The tiny Llama in bf16, checkpointing off as loaded."""

    backend_cls = NoQuantBackend
    expects_storage = False

    @pytest.fixture(autouse=True)
    def _model_root(self, model_root: str) -> None:
        self.root = model_root

    def make_model(self) -> nn.Module:
        return load(saved_tiny(self.root))


class TestNoQuantizationCheckpointingOnConformance(TestNoQuantizationConformance):
    """The same model with checkpointing turned on by the user before prepare (undo must keep it on)."""

    def make_model(self) -> nn.Module:
        model = super().make_model()
        enable_checkpointing(model, {"use_reentrant": False})
        return model


# -- what is particular to an unquantized model -----------------------------------------------------


@pytest.mark.parametrize("was_on", [False, True], ids=["off", "on"])
def test_checkpointing_is_left_as_the_model_has_it(model_root: str, was_on: bool) -> None:
    """Checkpointing stays off when it was off (and the plan says how to turn it on), stays on
    when the user turned it on; the plan and the report agree with what the model ends up with."""
    model = load(saved_tiny(model_root))
    if was_on:
        enable_checkpointing(model, {"use_reentrant": False})
    assert checkpointing_on(model) is was_on
    p = kbitprep.plan(model, upcast="none")
    assert p.backend == "none"
    assert p.gradient_checkpointing is was_on
    kinds = {w.kind for w in p.warnings}
    assert ("checkpointing" in kinds) is not was_on
    report, emitted = _prepare(model, upcast="none")
    assert [str(w.message) for w in emitted] == [w.message for w in p.warnings]
    assert report.gradient_checkpointing is was_on
    assert checkpointing_on(model) is was_on


def test_plan_warns_memory_with_the_bytes_the_upcast_adds(model_root: str) -> None:
    """All 21 bf16 parameters go to fp32: bytes_delta is 2 bytes per element, one ``"memory"``
    PlanWarning states that number, prepare emits it as MemoryWarning, and the measured bytes
    grow by exactly that much. ``upcast="none"`` casts nothing and has no memory warning."""
    model = load(saved_tiny(model_root))
    params = dict(model.named_parameters())
    assert len(params) == N_PARAMS and {q.dtype for q in params.values()} == {torch.bfloat16}
    added = 2 * sum(q.numel() for q in params.values())

    p = kbitprep.plan(model)
    assert len(p.casts) == N_PARAMS and {c.to_dtype for c in p.casts} == {torch.float32}
    assert p.bytes_delta == added
    memory = [w for w in p.warnings if isinstance(w, kbitprep.PlanWarning) and w.kind == "memory"]
    assert len(memory) == 1
    assert f"{added:,}" in memory[0] and str(N_PARAMS) in memory[0]

    before = sum(q.numel() * q.element_size() for q in model.parameters())
    _report, emitted = _prepare(model)
    assert [str(w.message) for w in emitted if w.category is kbitprep.MemoryWarning] == [memory[0].message]
    assert sum(q.numel() * q.element_size() for q in model.parameters()) - before == added
    assert {q.dtype for q in model.parameters()} == {torch.float32}

    plain = kbitprep.plan(load(saved_tiny(model_root)), upcast="none")
    assert (plain.casts, plain.bytes_delta) == ((), 0)
    assert "memory" not in {w.kind for w in plain.warnings}
