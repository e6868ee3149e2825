"""Quantized storage untouched, ``plan`` side-effect free, ``bytes_delta`` honest, ``undo`` exact,
a second ``prepare`` a no-op, tied weights cast once (issue 2).

Expected byte figures come from the arithmetic in ../shared/cases/README.md, not from kbitprep:
the tiny Llama has 7 plain float parameters (embed_tokens 1000x64, 5 RMSNorm weights of 64,
lm_head 1000x64) totalling 128,320 elements = 256,640 bytes in bf16, and 21 parameters totalling
210,240 elements = 420,480 bytes in bf16. bf16 -> fp32 doubles the bytes, so the delta equals the
bf16 size of what is cast. With ``tie_word_embeddings=True`` lm_head *is* embed_tokens: 64,000
elements fewer, and the shared parameter must be counted (and cast) once.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from _lora import add_lora, standard_step
from _measure import digest
from _models import ENABLE_ADDS_INPUT_GRAD_HOOK, enable_checkpointing, load, saved_tiny, transformers_major
from _quantized import bnb4_config_or_skip, bnb8_config_or_skip, torchao_int8_config_or_skip

# label: (config factory, expected bytes_delta with defaults, expected number of casts,
#         quantized state-dict entries that must exist)
CASES: dict[str, tuple[Callable[[], Any], int, int]] = {
    "bnb4": (bnb4_config_or_skip, 256_640, 7),
    "bnb8": (bnb8_config_or_skip, 256_640, 7),
    "torchao": (torchao_int8_config_or_skip, 0, 0),
    "bf16": (lambda: None, 420_480, 21),
}


def _load(model_root: str, label: str, tie: bool = False) -> nn.Module:
    return load(saved_tiny(model_root, tie=tie), quantization_config=CASES[label][0]())


def _warns_if(label: str) -> AbstractContextManager[Any]:
    # the unquantized model gets plan warnings (bytes added, checkpointing left off)
    return pytest.warns(kbitprep.KbitPrepWarning) if label == "bf16" else nullcontext()


# -- independent measurements ------------------------------------------------------------------


def _is_quantized_entry(name: str, t: torch.Tensor) -> bool:
    """Quantized storage in a state dict: integer tensors, tensor subclasses (torchao), and the
    bitsandbytes quant-state entries serialised next to a weight (``weight.absmax``, ``SCB``...)."""
    if type(t) not in (torch.Tensor, nn.Parameter):
        return True
    if not t.is_floating_point():
        return True
    return ".weight." in name or name.endswith(".SCB") or name.endswith(".weight_format")


def _quantized_digest(model: nn.Module) -> dict[str, str]:
    return {n: digest(t) for n, t in model.state_dict().items() if _is_quantized_entry(n, t)}


def _plain_param_bytes(model: nn.Module) -> int:
    """numel x element size of every plain (non-subclass, floating) parameter, tied ones once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or type(p) is not nn.Parameter or not p.is_floating_point():
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def _hooks(model: nn.Module) -> dict[str, tuple[tuple[int, ...], ...]]:
    out = {}
    for name, m in model.named_modules():
        kinds = (
            m._forward_hooks,
            m._forward_pre_hooks,
            m._backward_hooks,
            getattr(m, "_backward_pre_hooks", {}),
            m._state_dict_hooks,
            m._load_state_dict_pre_hooks,
        )
        ids = tuple(tuple(d.keys()) for d in kinds)
        if any(ids):
            out[name] = ids
    return out


def _checkpointing(model: nn.Module) -> dict[str, Any]:
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "gradient_checkpointing"):
            func = m.__dict__.get("_gradient_checkpointing_func")
            out[name] = (m.gradient_checkpointing, repr(getattr(func, "keywords", func)))
    return out


def _state(model: nn.Module) -> dict[str, Any]:
    """Everything prepare may touch, as comparable values."""
    config = getattr(model, "config", None)
    return {
        "params": {
            n: (p.dtype, p.requires_grad, type(p).__name__, digest(p))
            for n, p in model.named_parameters(remove_duplicate=False)
        },
        "data_ptr": {
            n: p.data_ptr() for n, p in model.named_parameters(remove_duplicate=False) if type(p) is nn.Parameter
        },
        "hooks": _hooks(model),
        "checkpointing": _checkpointing(model),
        "use_cache": getattr(config, "use_cache", None),
        "instance_attrs": sorted(k for k in vars(model) if not k.startswith("_modules")),
        "require_grads_hooks": len(getattr(model, "_require_grads_hooks", []) or []),
        "training": [m.training for m in model.modules()],
    }


def _assert_same(before: dict[str, Any], after: dict[str, Any], keys: tuple[str, ...] | None = None) -> None:
    for key in keys or tuple(before):
        assert before[key] == after[key], f"{key} changed"


def _embed_hooks(model: nn.Module) -> int:
    return len(model.get_input_embeddings()._forward_hooks)


# -- storage ------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["bnb4", "bnb8", "torchao"])
def test_quantized_storage_bytes_identical_after_prepare_and_undo(label: str, model_root: str) -> None:
    model = _load(model_root, label)
    before = _quantized_digest(model)
    # 14 decoder linears are quantized; bnb adds quant-state entries next to each weight
    assert sum(1 for n in before if n.endswith(("proj.weight", "proj.weight.qdata"))) == 14 or len(before) >= 14
    report = kbitprep.prepare(model)
    assert _quantized_digest(model) == before
    for name, p in model.named_parameters():
        if type(p) is not nn.Parameter or not p.is_floating_point():
            assert not p.requires_grad, f"quantized storage {name} was made trainable"
    # training does not touch quantized storage either (only LoRA is trainable)
    report.undo()
    assert _quantized_digest(model) == before


def test_bnb4_weights_stay_packed_params4bit(model_root: str) -> None:
    bnb = pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install bitsandbytes)")
    model = _load(model_root, "bnb4")
    kbitprep.prepare(model)
    weights = [m.weight for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(weights) == 14
    assert all(isinstance(w, bnb.nn.Params4bit) and w.dtype == torch.uint8 and not w.requires_grad for w in weights)


# -- plan ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", list(CASES))
@pytest.mark.parametrize("reentrant", [None, True])
def test_plan_changes_nothing(label: str, reentrant: bool | None, model_root: str) -> None:
    model = _load(model_root, label)
    kwargs = None if reentrant is None else {"use_reentrant": reentrant}
    before = _state(model)
    stored = _quantized_digest(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # plan reports findings in plan.warnings, it never warns
        p = kbitprep.plan(model, gradient_checkpointing_kwargs=kwargs)
    _assert_same(before, _state(model))
    assert _quantized_digest(model) == stored
    expected_delta, expected_casts = CASES[label][1], CASES[label][2]
    assert p.bytes_delta == expected_delta
    assert len(p.casts) == expected_casts
    assert sum(c.bytes_after - c.bytes_before for c in p.casts) == expected_delta
    # a plan is data: JSON-serialisable and printable without touching the model
    import json

    json.dumps(p.to_dict())
    assert p.backend in str(p)
    _assert_same(before, _state(model))


@pytest.mark.parametrize("label", list(CASES))
def test_bytes_delta_equals_measured_change(label: str, model_root: str) -> None:
    model = _load(model_root, label)
    p = kbitprep.plan(model)
    bytes_before = _plain_param_bytes(model)
    with _warns_if(label):
        report = kbitprep.prepare(model)
    measured = _plain_param_bytes(model) - bytes_before
    assert measured == p.bytes_delta == report.bytes_delta == CASES[label][1]
    # every cast in the plan happened, and nothing else changed dtype
    params = dict(model.named_parameters())
    for c in report.casts:
        assert params[c.name].dtype == c.to_dtype
        assert params[c.name].numel() * params[c.name].element_size() == c.bytes_after


# -- undo ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", list(CASES))
@pytest.mark.parametrize("reentrant", [None, True])
def test_undo_restores_everything(label: str, reentrant: bool | None, model_root: str) -> None:
    model = _load(model_root, label)
    if label == "bf16" and reentrant:
        # the unquantized backend leaves checkpointing as the model has it; turn it on first
        # (transformers' own call) so prepare has checkpointing and the input-grad path to wire
        enable_checkpointing(model, {"use_reentrant": True})
    kwargs = None if reentrant is None else {"use_reentrant": reentrant}
    before = _state(model)
    with _warns_if(label):
        report = kbitprep.prepare(model, gradient_checkpointing_kwargs=kwargs)
    after = _state(model)
    assert after["params"] != before["params"] or label == "torchao"
    if label != "bf16":
        assert report.gradient_checkpointing and after["use_cache"] is False
        assert report.use_reentrant is bool(reentrant)
    if report.gradient_checkpointing and (report.use_reentrant or ENABLE_ADDS_INPUT_GRAD_HOOK):
        assert report.input_grad_hook
        assert _embed_hooks(model) == 1
    else:
        assert not report.input_grad_hook
    report.undo()
    restored = _state(model)
    for key in ("params", "hooks", "checkpointing", "use_cache", "instance_attrs", "require_grads_hooks", "training"):
        assert restored[key] == before[key], f"undo did not restore {key}: {before[key]!r} -> {restored[key]!r}"
    report.undo()  # a second undo does nothing
    assert _state(model)["params"] == before["params"]


def test_report_is_honest_about_input_grad_hooks(model_root: str) -> None:
    """transformers 5's activation_checkpointing_enable adds an input-grad hook itself, also for
    non-reentrant checkpointing; kbitprep keeps it (C18) and the report says so. transformers
    4.57 adds none, and non-reentrant checkpointing needs none."""
    model = _load(model_root, "bnb4")
    report = kbitprep.prepare(model)
    assert report.gradient_checkpointing and report.use_reentrant is False
    assert report.input_grad_hook is ENABLE_ADDS_INPUT_GRAD_HOOK
    assert _embed_hooks(model) == int(ENABLE_ADDS_INPUT_GRAD_HOOK)
    # and LoRA still trains without the hook under non-reentrant checkpointing
    torch.manual_seed(0)
    _loss, grads = standard_step(add_lora(model))
    assert sum(1 for n, g in grads.items() if "lora_B" in n and g is not None and bool(g.abs().sum() > 0)) == 4


# -- idempotence --------------------------------------------------------------------------------


@pytest.mark.parametrize("label", list(CASES))
@pytest.mark.parametrize("reentrant", [None, True])
def test_second_prepare_is_a_noop(label: str, reentrant: bool | None, model_root: str) -> None:
    model = _load(model_root, label)
    kwargs = None if reentrant is None else {"use_reentrant": reentrant}
    original = _state(model)
    with _warns_if(label):
        first = kbitprep.prepare(model, gradient_checkpointing_kwargs=kwargs)
    once = _state(model)
    bytes_once = _plain_param_bytes(model)
    with _warns_if(label) if label == "bf16" else nullcontext():
        second = kbitprep.prepare(model, gradient_checkpointing_kwargs=kwargs)
    assert second.casts == ()
    assert second.bytes_delta == 0
    assert second.backend == first.backend
    assert second.gradient_checkpointing == first.gradient_checkpointing
    _assert_same(once, _state(model))  # same data pointers, hooks, flags, use_cache
    assert _plain_param_bytes(model) == bytes_once
    if first.input_grad_hook:
        assert _embed_hooks(model) == 1
    # undoing both, last first, gives back the model as loaded
    second.undo()
    _assert_same(once, _state(model), ("params", "hooks", "checkpointing", "use_cache"))
    first.undo()
    _assert_same(original, _state(model), ("params", "hooks", "checkpointing", "use_cache", "instance_attrs"))


def test_drop_in_twice_adds_no_second_hook(model_root: str) -> None:
    model = _load(model_root, "bnb4")
    kw = {"use_reentrant": True}
    assert kbitprep.prepare_model_for_kbit_training(model, True, kw) is model
    assert kbitprep.prepare_model_for_kbit_training(model, True, kw) is model
    assert _embed_hooks(model) == 1


# -- tied weights -------------------------------------------------------------------------------


@pytest.mark.parametrize(("label", "expected_delta", "expected_casts"), [("bnb4", 128_640, 6), ("bf16", 292_480, 20)])
def test_tied_weights_cast_once_and_stay_tied(
    label: str, expected_delta: int, expected_casts: int, model_root: str
) -> None:
    model = _load(model_root, label, tie=True)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert head.weight is emb.weight, "fixture: the tied checkpoint must load tied"
    original = emb.weight.detach().clone()
    p = kbitprep.plan(model)
    assert p.bytes_delta == expected_delta
    assert len(p.casts) == expected_casts
    tied = [c for c in p.casts if c.tied]
    assert len(tied) == 1
    assert {tied[0].name, *tied[0].tied} == {"model.embed_tokens.weight", "lm_head.weight"}
    bytes_before = _plain_param_bytes(model)
    with _warns_if(label):
        report = kbitprep.prepare(model)
    assert _plain_param_bytes(model) - bytes_before == report.bytes_delta == expected_delta
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert emb.weight.dtype == torch.float32
    assert torch.equal(emb.weight.detach().to(torch.bfloat16), original)
    report.undo()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert emb.weight.dtype == torch.bfloat16
    assert torch.equal(emb.weight.detach(), original)


@pytest.mark.skipif(
    transformers_major() < 5,
    reason="transformers 4.57's gradient_checkpointing_enable adds no input-grad hook; this test is "
    "about giving back the one transformers 5's activation_checkpointing_enable adds",
)
def test_undo_restores_checkpointing_that_was_already_on_in_another_mode(model_root: str) -> None:
    """Checkpointing on (reentrant, with transformers' input-grad hook) before prepare; prepare
    switches it to non-reentrant; undo must give back the reentrant setup and its hook."""
    model = _load(model_root, "bnb4")
    enable_checkpointing(model, {"use_reentrant": True})
    assert _embed_hooks(model) == 1
    before = _state(model)
    report = kbitprep.prepare(model)
    assert report.use_reentrant is False
    assert _use_reentrant_flags(model) == {False}
    report.undo()
    assert _use_reentrant_flags(model) == {True}
    _assert_same(
        before,
        _state(model),
        ("params", "hooks", "checkpointing", "use_cache", "instance_attrs", "require_grads_hooks"),
    )


def _use_reentrant_flags(model: nn.Module) -> set[Any]:
    return {
        getattr(m._gradient_checkpointing_func, "keywords", {}).get("use_reentrant")
        for m in model.modules()
        if getattr(m, "gradient_checkpointing", False) is True
    }


def test_a_prepared_model_pickles_whole_and_its_loaded_report_refuses_to_undo() -> None:
    """torch.save(model) after prepare_model_for_kbit_training (a kept-low lm_head with its
    compute-dtype rule, the report on the model): it loads back, computes as before bit for bit,
    keeps the rule, and the loaded report's undo() raises InvalidModelError instead of silently
    doing nothing; the live report still undoes. (With checkpointing on, transformers 5.24's own
    input-grad hook is a local function, so such a model does not pickle, with or without kbitprep.)"""
    import io

    from _models import tiny_llama
    from kbitprep import InvalidModelError
    from kbitprep.steps.cast_at_use import spec_of

    model = tiny_llama(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kbitprep.KbitPrepWarning)
        kbitprep.prepare_model_for_kbit_training(model, keep_in_low_precision=("lm_head",))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert spec_of(loaded.lm_head) == spec_of(model.lm_head) and loaded.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(1, 999, (1, 6), generator=torch.Generator().manual_seed(0))
    model.eval()
    loaded.eval()
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    with pytest.raises(InvalidModelError, match="loaded back from a pickle"):
        loaded._kbitprep_report.undo()
    model._kbitprep_report.undo()
    assert spec_of(model.lm_head) is None and model.lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("what", ["model", "report"])
def test_a_deep_copy_cannot_undo_and_leaves_the_original_prepared(what: str, model_root: str) -> None:
    """TRL deep-copies a prepared model as its reference model. The copy's undo steps would point at
    the original's parameters and modules (deepcopy does not re-point closures), so undo on a
    copy raises InvalidModelError and changes neither model; the original report still undoes."""
    model = _load(model_root, "bnb4")
    before = _state(model)
    report = kbitprep.prepare_model_for_kbit_training(model)._kbitprep_report  # type: ignore[union-attr]
    prepared = _state(model)
    copied = copy.deepcopy(model)._kbitprep_report if what == "model" else copy.deepcopy(report)
    with pytest.raises(kbitprep.InvalidModelError, match="copied"):
        copied.undo()
    after = _state(model)
    for key in ("params", "hooks", "checkpointing", "use_cache"):
        assert after[key] == prepared[key], f"undo on a copy changed the original's {key}"
    report.undo()
    assert _state(model)["params"] == before["params"]
