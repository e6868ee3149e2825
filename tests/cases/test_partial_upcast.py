"""Mixed dtypes after a partial upcast never reach a module as a mismatch (C03, C04)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from _lora import add_lora, grad_counts, standard_step
from _measure import plan_compute_dtype, quantized_tensors
from _models import NORM_NAMES, PLAIN_NAMES, standard_batch
from _quantized import CPU_KINDS, bnb4
from kbitprep.steps.cast_at_use import spec_of


def norm_only(name: str, param: nn.Parameter, module: nn.Module) -> bool:
    return "norm" in name


def random_half(seed: int) -> Callable[[str, nn.Parameter, nn.Module], bool]:
    chosen = set(random.Random(seed).sample(PLAIN_NAMES, 4 if seed % 2 else 3))

    def policy(name: str, param: nn.Parameter, module: nn.Module) -> bool:
        return name in chosen

    policy.__name__ = f"random_half_{seed}_{'+'.join(sorted(chosen))}"
    return policy


def _check_inputs_match(model: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Wrap, at class level, the forward of every module that owns a plain floating parameter
    and record any floating input that reaches the forward body in another dtype than the one
    the module computes in: its compute-dtype rule's (the plan's ``precision`` row) when it has
    one, else its own parameters' dtype. Class-level wrapping sees what the module's own code
    receives, after kbitprep's cast at use (nn.Linear / nn.Embedding then take kbitprep's
    generic path, which gives the same numbers)."""
    bad: list[str] = []
    storage = {id(t) for t in quantized_tensors(model).values()}
    expected: dict[int, tuple[str, torch.dtype]] = {}
    classes: set[type] = set()
    for mname, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in storage and p.is_floating_point()]
        if not own or isinstance(module, nn.Embedding) or "lora_" in mname:
            continue
        spec = spec_of(module)
        expected[id(module)] = (mname, own[0].dtype if spec is None else spec.dtype)
        classes.add(getattr(type(module), "_kbitprep_original_class", type(module)))

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if id(self) in expected:
                mname, dtype = expected[id(self)]
                for x in (*args, *kwargs.values()):
                    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype:
                        bad.append(f"{mname}: {x.dtype} into {dtype}")
            return original(self, *args, **kwargs)

        return forward

    for cls in classes:
        monkeypatch.setattr(cls, "forward", wrap(cls.forward))
    return bad


def test_norm_only_upcast_trains_and_keeps_bf16_logits(model_root: str) -> None:
    """C03: a norm-only callable plans 5 casts, bytes_delta 640; the training forward runs,
    the logits are bf16 (lm_head stays bf16 and receives bf16), the loss is finite and the
    standard step gives 8 LoRA grads, 4 lora_B non-zero."""
    model = bnb4(model_root)
    report = kbitprep.prepare(model, upcast=norm_only)
    assert sorted(c.name for c in report.casts) == sorted(NORM_NAMES)
    assert report.bytes_delta == 640

    peft_model = add_lora(model)
    peft_model.train()
    assert peft_model(input_ids=standard_batch(2, 8)).logits.dtype == torch.bfloat16
    loss, grads = standard_step(peft_model)
    assert torch.isfinite(torch.tensor(loss))
    assert grad_counts(grads) == (8, 8, 4)


PARTIAL_POLICIES: dict[str, dict[str, Any]] = {
    "norm-only": {"upcast": norm_only},
    "auto-keep-lm_head": {"keep_in_low_precision": ("lm_head",)},
    "auto-keep-embed-and-lm_head": {"keep_in_low_precision": ("model.embed_tokens", "lm_head")},
    "all-keep-lm_head": {"upcast": "all", "keep_in_low_precision": ("lm_head",)},
    **{f"random-half-{s}": {"upcast": random_half(s)} for s in range(5)},
}


@pytest.mark.parametrize(
    "kind",
    ["bnb4", *(pytest.param(k, marks=pytest.mark.slow) for k in ("none", "torchao_hf", "hqq"))],
)
@pytest.mark.parametrize("policy", list(PARTIAL_POLICIES))
def test_no_partial_policy_leaves_a_dtype_mismatch(
    kind: str, policy: str, model_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C03 whole kind: for the four partial policies of the case and five random halves of the
    7 plain parameters (fixed seeds), on bnb 4-bit, an unquantized bf16 model, torchao and hqq,
    the standard LoRA step completes with a finite loss and 8/8 grads, and every module that owns
    a plain float parameter receives inputs of the dtype it computes in."""
    model = CPU_KINDS[kind](model_root)
    options = PARTIAL_POLICIES[policy]
    p = kbitprep.plan(model, **options)
    if p.warnings:
        with pytest.warns(kbitprep.KbitPrepWarning):
            kbitprep.prepare(model, **options)
    else:
        kbitprep.prepare(model, **options)
    peft_model = add_lora(model)
    bad = _check_inputs_match(peft_model, monkeypatch)
    loss, grads = standard_step(peft_model)
    assert bad == []
    assert torch.isfinite(torch.tensor(loss))
    n, with_grad, _nonzero = grad_counts(grads)
    assert n == with_grad == 8


def test_activation_dtypes_follow_the_plan_for_auto_none_and_bf16_target(model_root: str) -> None:
    """C04: auto lists model.norm.weight and lm_head.weight bf16→fp32 and gives fp32 hidden
    states and logits; upcast="none" has no casts, bytes_delta 0 and bf16 activations (the
    compute dtype); upcast_dtype=bf16 has no cast items (from == to) and bf16 activations.
    str(plan) shows one row per cast; to_dict() passes json.dumps."""
    ids = standard_batch(2, 8)

    model = bnb4(model_root)
    auto = kbitprep.plan(model)
    by_name = {c.name: c for c in auto.casts}
    for name in ("model.norm.weight", "lm_head.weight"):
        assert (by_name[name].from_dtype, by_name[name].to_dtype) == (torch.bfloat16, torch.float32)
    text = str(auto)
    for c in auto.casts:
        rows = [line for line in text.splitlines() if c.name in line.split()]
        assert len(rows) == 1, (c.name, text)
        shape = "x".join(str(s) for s in c.shape)
        assert shape in rows[0] and str(c.from_dtype) in rows[0] and str(c.to_dtype) in rows[0]
        assert f"{c.bytes_before:,}" in rows[0] and f"{c.bytes_after:,}" in rows[0]
    json.dumps(auto.to_dict())
    kbitprep.prepare(model)
    model.train()
    assert model.model(ids).last_hidden_state.dtype == torch.float32
    assert model(ids).logits.dtype == torch.float32

    for options in ({"upcast": "none"}, {"upcast_dtype": torch.bfloat16}):
        model = bnb4(model_root)
        p = kbitprep.plan(model, **options)
        assert p.casts == () and p.bytes_delta == 0, options
        json.dumps(p.to_dict())
        kbitprep.prepare(model, **options)
        model.train()
        assert model.model(ids).last_hidden_state.dtype == torch.bfloat16, options
        assert model(ids).logits.dtype == torch.bfloat16, options


@pytest.mark.parametrize("kind", ["bnb4", "none", "torchao_hf"])
@pytest.mark.parametrize(
    "options",
    [{}, {"upcast": "none"}, {"upcast": "all"}, {"keep_in_low_precision": ("lm_head",)}, {"upcast": norm_only}],
    ids=["auto", "none", "all", "auto-keep-lm_head", "norm-only"],
)
def test_output_dtypes_are_predicted_by_the_plan(kind: str, options: dict[str, Any], model_root: str) -> None:
    """C04 whole kind: for auto, none, all, auto keeping lm_head low and a norm-only callable,
    last_hidden_state.dtype is the dtype the plan says model.norm computes in and logits.dtype
    the dtype it says lm_head computes in (the weight's dtype, or the model's compute dtype for
    a weight kept narrower)."""
    model = CPU_KINDS[kind](model_root)
    p = kbitprep.plan(model, **options)
    norm_dtype = plan_compute_dtype(p, model, "model.norm")
    head_dtype = plan_compute_dtype(p, model, "lm_head")
    if p.warnings:
        with pytest.warns(kbitprep.KbitPrepWarning):
            kbitprep.prepare(model, **options)
    else:
        kbitprep.prepare(model, **options)
    model.train()
    ids = standard_batch(2, 8)
    assert model.model(ids).last_hidden_state.dtype == norm_dtype
    assert model(ids).logits.dtype == head_dtype
