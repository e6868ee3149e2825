"""Misuse found by review: a second prepare with other options, odd dtypes, forced backends."""

from __future__ import annotations

import warnings

import pytest
import torch

import kbitprep
from _models import add_lora, bnb4_config, grad_counts, load, saved_tiny, standard_step
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
    """C03 whole kind: input casts always follow the module's dtype, whatever ran before."""
    model = load(saved_tiny(model_root), quantization_config=bnb4_config())
    _quiet_prepare(model, **first)
    _quiet_prepare(model, **second)
    seen: dict[str, tuple[torch.dtype, torch.dtype]] = {}

    def check(name: str) -> object:
        def hook(module: torch.nn.Module, args: tuple[object, ...]) -> None:
            x = next(a for a in args if isinstance(a, torch.Tensor))
            seen[name] = (x.dtype, module.weight.dtype)

        return hook

    model.lm_head.register_forward_pre_hook(check("lm_head"))  # type: ignore[arg-type]
    peft_model = add_lora(model)
    loss, grads = standard_step(peft_model)
    assert torch.isfinite(torch.tensor(loss))
    assert grad_counts(grads) == (8, 8, 4)
    got, own = seen["lm_head"]
    assert got == own


def test_upcast_dtype_must_be_a_compute_dtype(model_root: str) -> None:
    model = load(saved_tiny(model_root), quantization_config=bnb4_config())
    before = {n: p.dtype for n, p in model.named_parameters()}
    with pytest.raises(kbitprep.InvalidArgumentError, match="float8"):
        kbitprep.prepare(model, upcast_dtype=torch.float8_e4m3fn)
    assert {n: p.dtype for n, p in model.named_parameters()} == before


def test_a_forced_backend_that_disagrees_with_detection_is_named(model_root: str) -> None:
    model = load(saved_tiny(model_root), quantization_config=bnb4_config())
    p = kbitprep.plan(model, backend="hqq")
    assert any("looks like 'bitsandbytes'" in w for w in p.warnings)
    assert not any("looks like" in w for w in kbitprep.plan(model, backend="bitsandbytes").warnings)


def test_no_backend_may_be_named_auto() -> None:
    class Auto(QuantBackend):
        name = "auto"

        def detect(self, model: torch.nn.Module) -> str | None:
            return None

    with pytest.raises(kbitprep.InvalidArgumentError, match="auto"):
        kbitprep.register_backend(Auto)


def test_reports_undone_out_of_order_still_restore_the_model(model_root: str) -> None:
    """Undoing an earlier report first also undoes the later ones on the same model."""
    from _models import checkpointing_on, snapshot

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
