"""Defaults never hide a state change; an explicit argument always wins (C12)."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

import kbitprep
from _measure import hook_count, model_state, param_bytes
from _models import checkpointing_on
from _quantized import CPU_KINDS, bnb4


def _prepare(fn: Any, model: Any, *args: Any, **options: Any) -> Any:
    p = kbitprep.plan(model, *args, **options)
    if p.warnings:
        with pytest.warns(kbitprep.KbitPrepWarning):
            return fn(model, *args, **options)
    return fn(model, *args, **options)


def test_plan_shows_the_checkpointing_default_and_an_explicit_off(model_root: str) -> None:
    """C12: on the fresh bnb 4-bit model plan() says checkpointing on, use_reentrant False;
    plan(use_gradient_checkpointing=False) says off, use_reentrant None, no input-grad hook;
    neither call changes the model (parameters, hooks, checkpointing flags, use_cache)."""
    model = bnb4(model_root)
    before = model_state(model)
    assert model.config.use_cache is True and checkpointing_on(model) is False

    on = kbitprep.plan(model)
    off = kbitprep.plan(model, use_gradient_checkpointing=False)

    assert on.gradient_checkpointing is True and on.use_reentrant is False
    assert off.gradient_checkpointing is False and off.use_reentrant is None and off.input_grad_hook is False
    assert model_state(model) == before


@pytest.mark.parametrize("entry", ["prepare", "prepare_model_for_kbit_training"])
def test_explicit_no_checkpointing_is_honoured(entry: str, model_root: str) -> None:
    """C12: prepare(model, use_gradient_checkpointing=False) and PEFT's positional
    prepare_model_for_kbit_training(model, False) leave checkpointing off, config.use_cache True,
    no forward hook on embed_tokens, report.gradient_checkpointing False, and freeze and cast
    exactly as C02 (7 casts, +256,640 bytes, every parameter frozen)."""
    model = bnb4(model_root)
    if entry == "prepare":
        report = kbitprep.prepare(model, use_gradient_checkpointing=False)
    else:
        assert kbitprep.prepare_model_for_kbit_training(model, False) is model
        report = model._kbitprep_report  # type: ignore[assignment]
    assert checkpointing_on(model) is False
    assert model.config.use_cache is True
    assert hook_count(model.model.embed_tokens) == 0
    assert report.gradient_checkpointing is False and report.use_reentrant is None
    assert len(report.casts) == 7 and report.bytes_delta == 256_640
    assert param_bytes(model) == 554_240
    assert not any(p.requires_grad for p in model.parameters())


def test_default_checkpointing_shows_in_the_report_and_undo_restores_it(model_root: str) -> None:
    """C12: the drop-in default turns checkpointing on and says so
    (report.to_dict()["gradient_checkpointing"] is True); report.undo() turns it off, restores
    config.use_cache to True and leaves no forward hook on embed_tokens."""
    model = bnb4(model_root)
    report = kbitprep.prepare(model)
    assert checkpointing_on(model) is True
    assert report.to_dict()["gradient_checkpointing"] is True
    assert report.use_cache_off is True and model.config.use_cache is False

    report.undo()
    assert checkpointing_on(model) is False
    assert model.config.use_cache is True
    assert hook_count(model.model.embed_tokens) == 0


class _WantsCheckpointing(kbitprep.QuantBackend):
    """A runtime backend that insists on checkpointing; an explicit False must still win."""

    name: ClassVar[str] = "c12-wants-checkpointing"

    def detect(self, model: Any) -> str | None:
        return None

    def wants_gradient_checkpointing(self, model: Any) -> bool:
        return True


@pytest.mark.parametrize("kind", list(CPU_KINDS))
def test_explicit_false_wins_for_every_backend(kind: str, model_root: str) -> None:
    """C12 whole kind: for every backend that runs on CPU, use_gradient_checkpointing=False is
    visible in the plan (off, use_reentrant None, no hook, use_cache untouched) and prepare
    adds no forward hook anywhere, leaves checkpointing off and use_cache as loaded; undo then
    restores the model exactly."""
    model = CPU_KINDS[kind](model_root)
    before = model_state(model)
    p = kbitprep.plan(model, use_gradient_checkpointing=False)
    assert p.gradient_checkpointing is False and p.use_reentrant is None
    assert p.input_grad_hook is False and p.use_cache_off is False
    report = _prepare(kbitprep.prepare, model, use_gradient_checkpointing=False)
    assert report.gradient_checkpointing is False
    state = model_state(model)
    assert state["use_cache"] == before["use_cache"]
    assert {n: h[0] for n, h in state["hooks"].items()} == {n: h[0] for n, h in before["hooks"].items()}
    assert not any(h[2] for h in state["hooks"].values())
    report.undo()
    after = model_state(model)
    assert {n: v[:5] + v[6:] for n, v in after["params"].items()} == {
        n: v[:5] + v[6:] for n, v in before["params"].items()
    }
    assert after["hooks"] == before["hooks"] and after["use_cache"] == before["use_cache"]


@pytest.fixture()
def runtime_backend() -> Any:
    from kbitprep._registry import _registry

    kbitprep.register_backend(_WantsCheckpointing, replace=True)
    yield _WantsCheckpointing
    for table in (_registry.classes, _registry.sources, _registry.instances):
        table.pop(_WantsCheckpointing.name, None)


def test_explicit_false_wins_over_a_backend_that_wants_checkpointing(runtime_backend: Any, model_root: str) -> None:
    """C12 whole kind: an explicit False beats a backend's wants_gradient_checkpointing()."""
    model = bnb4(model_root)
    assert kbitprep.plan(model, backend=_WantsCheckpointing.name).gradient_checkpointing is True
    p = kbitprep.plan(model, use_gradient_checkpointing=False, backend=_WantsCheckpointing.name)
    assert p.gradient_checkpointing is False and p.use_reentrant is None
