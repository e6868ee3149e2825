"""Misuse found by review: a second prepare with other options, odd dtypes, forced backends."""

from __future__ import annotations

import warnings

import pytest
import torch

import kbitprep
from _lora import add_lora, grad_counts, standard_step
from _models import load, saved_tiny
from _plan_warnings import has_warning, warning_of
from _quantized import bnb4_config
from kbitprep.backends.base import QuantBackend


def _quiet_prepare(model: torch.nn.Module, **kw: object) -> kbitprep.PreparationReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kbitprep.KbitPrepWarning)
        return kbitprep.prepare(model, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"keep_in_low_precision": ("lm_head",)}, {}),
        ({"keep_in_low_precision": ("lm_head",)}, {"upcast_dtype": torch.float64}),
        ({"upcast": lambda n, p, m: "norm" in n}, {"upcast": "all"}),
    ],
)
def test_a_second_prepare_with_other_options_leaves_no_stale_input_cast(
    model_root: str, first: dict[str, object], second: dict[str, object]
) -> None:
    """C03 whole kind: compute-dtype rules always follow the module's dtype, whatever ran
    before: lm_head computes in the dtype the second report gives it (its precision row, else
    its weight's dtype), and no stale rule from the first prepare casts it elsewhere."""
    model = load(saved_tiny(model_root), quantization_config=bnb4_config())
    _quiet_prepare(model, **first)
    report = _quiet_prepare(model, **second)
    rows = {r.name: r.computes for r in report.precision}
    want = rows.get("lm_head", model.lm_head.weight.dtype)
    seen: list[torch.dtype] = []
    model.lm_head.register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))  # type: ignore[arg-type]
    peft_model = add_lora(model)
    loss, grads = standard_step(peft_model)
    assert torch.isfinite(torch.tensor(loss))
    assert grad_counts(grads) == (8, 8, 4)
    assert seen[0] == want


def test_upcast_dtype_must_be_a_compute_dtype(model_root: str) -> None:
    model = load(saved_tiny(model_root), quantization_config=bnb4_config())
    before = {n: p.dtype for n, p in model.named_parameters()}
    with pytest.raises(kbitprep.InvalidArgumentError, match="float8"):
        kbitprep.prepare(model, upcast_dtype=torch.float8_e4m3fn)
    assert {n: p.dtype for n, p in model.named_parameters()} == before


def test_a_forced_backend_that_disagrees_with_detection_is_named(model_root: str) -> None:
    model = load(saved_tiny(model_root), quantization_config=bnb4_config())
    p = kbitprep.plan(model, backend="hqq")
    warning_of(p, "detection", "looks like 'bitsandbytes'")
    assert not has_warning(kbitprep.plan(model, backend="bitsandbytes"), "detection", "looks like")


def test_no_backend_may_be_named_auto() -> None:
    class Auto(QuantBackend):
        name = "auto"

        def detect(self, model: torch.nn.Module) -> str | None:
            return None

    with pytest.raises(kbitprep.InvalidArgumentError, match="auto"):
        kbitprep.register_backend(Auto)


def test_reports_undone_out_of_order_still_restore_the_model(model_root: str) -> None:
    """Undoing an earlier report first also undoes the later ones on the same model."""
    from _measure import snapshot
    from _models import checkpointing_on

    model = load(saved_tiny(model_root), quantization_config=bnb4_config())
    before = snapshot(model)
    use_cache = model.config.use_cache
    r1 = _quiet_prepare(model)
    r2 = _quiet_prepare(model, gradient_checkpointing_kwargs={"use_reentrant": True})
    r1.undo()
    r2.undo()
    assert not checkpointing_on(model)
    assert model.config.use_cache is use_cache
    assert len(model.model.embed_tokens._forward_hooks) == 0
    for name, (dtype, rg, value) in before.items():
        p = dict(model.named_parameters())[name]
        assert (p.dtype, p.requires_grad) == (dtype, rg), name
        assert torch.equal(p.detach(), value), name


def test_keeping_low_what_an_earlier_prepare_upcast_says_it_cannot(model_root: str) -> None:
    """prepare() upcasts lm_head to fp32 (peft's policy); a second call asking to keep it low
    changes nothing (kbitprep never casts down) and says so in a warning naming the pattern and
    the way out, instead of silently leaving it fp32. After undo() the same request keeps it bf16."""
    model = load(saved_tiny(model_root), quantization_config=bnb4_config())
    report = _quiet_prepare(model)
    assert model.lm_head.weight.dtype == torch.float32
    p = kbitprep.plan(model, keep_in_low_precision=("lm_head",))
    assert p.casts == ()
    note = warning_of(p, "precision", "'lm_head'")
    assert "already in torch.float32" in note and "report.undo()" in note
    report.undo()
    p = kbitprep.plan(model, keep_in_low_precision=("lm_head",))
    assert "lm_head.weight" not in {c.name for c in p.casts}
    assert not has_warning(p, "precision", "'lm_head'"), p.warnings
