"""Checkpointing and input-grad wiring: adapters get gradients, with exactly one hook (C09, C10, C11)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from _lora import add_lora, grad_counts, standard_step
from _matrix import ARCHS as MATRIX
from _measure import hook_count
from _models import ENABLE_ADDS_INPUT_GRAD_HOOK
from _plan_warnings import warning_of
from _quantized import CPU_KINDS, bnb4, plain

REENTRANT = {"use_reentrant": True}


def _prepare(model: Any, *args: Any, **options: Any) -> Any:
    p = kbitprep.plan(model, *args, **options)
    if p.warnings:
        with pytest.warns(kbitprep.KbitPrepWarning):
            return kbitprep.prepare(model, *args, **options)
    return kbitprep.prepare(model, *args, **options)


def _input_grad_hooks(module: nn.Module) -> int:
    from kbitprep.steps.checkpoint_transformers import _FOREIGN_HOOK_NAMES

    return sum(
        1
        for h in module._forward_hooks.values()
        if getattr(h, "_kbitprep_hook", None) == "input_grad" or getattr(h, "__name__", "") in _FOREIGN_HOOK_NAMES
    )


# -- C09: a vision-language model ----------------------------------------------------------------


def tiny_llava() -> Any:
    torch.manual_seed(0)
    model = MATRIX["llava"].build()  # the matrix's Llava: CLIP tower + the tiny Llama, image token 999
    # PEFT's and TRL's tests mock a quantized model with this flag; kbitprep judges from the
    # storage (none here), so the tests force the bitsandbytes policy to get checkpointing on
    model.is_loaded_in_4bit = True  # type: ignore[assignment]
    return model


LLAVA = {"backend": "bitsandbytes"}


def llava_step(model: Any) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    peft_model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 998, (1, 24), generator=g)
    ids[0, :16] = 999
    pixels = torch.randn(1, 3, 32, 32, generator=g)
    out = peft_model(input_ids=ids, pixel_values=pixels, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if "lora_" in n}
    vision = {n: g for n, g in grads.items() if "vision_tower" in n}
    text = {n: g for n, g in grads.items() if "language_model" in n}
    return grad_counts(vision), grad_counts(text)


def _llava_entries(model: Any) -> list[nn.Module]:
    modules = dict(model.named_modules())
    # transformers 4.57 nests the CLIP tower one level deeper (vision_tower.vision_model.embeddings)
    vision = (
        modules.get("model.vision_tower.embeddings.patch_embedding")
        or modules["model.vision_tower.vision_model.embeddings.patch_embedding"]
    )
    return [vision, modules["model.language_model.embed_tokens"]]


@pytest.mark.parametrize("transformers_hook", ["transformers", "no-op"])
def test_vision_tower_adapters_get_gradients_under_reentrant_checkpointing(
    transformers_hook: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C09: on a tiny Llava flagged 4-bit, prepare with use_reentrant=True puts exactly one
    forward hook on each tower's input embedding (vision patch_embedding, text embed_tokens),
    and after LoRA one backward gives vision 8/8 LoRA grads (4 lora_B non-zero) and text 8/8.
    Whole kind: the same holds with transformers' own enable_input_require_grads made a no-op
    (as on older transformers), so the result comes from kbitprep."""
    if transformers_hook == "no-op":
        from transformers import PreTrainedModel

        monkeypatch.setattr(PreTrainedModel, "enable_input_require_grads", lambda self: None)
    model = tiny_llava()
    report = _prepare(model, gradient_checkpointing_kwargs=REENTRANT, **LLAVA)
    assert report.use_reentrant is True and report.input_grad_hook is True
    for module in _llava_entries(model):
        assert hook_count(module) == 1
    vision, text = llava_step(model)
    assert vision == (8, 8, 4)
    assert text[:2] == (8, 8)


def test_vision_tower_adapters_get_gradients_by_default() -> None:
    """C09: a default prepare is non-reentrant, reports the input-grad hook transformers 5's
    enable installs (kept, C18), and both towers' LoRA tensors get grads: vision 8/8, text 8/8."""
    model = tiny_llava()
    report = _prepare(model, **LLAVA)
    assert report.use_reentrant is False and report.input_grad_hook is ENABLE_ADDS_INPUT_GRAD_HOOK
    vision, text = llava_step(model)
    assert vision[:2] == (8, 8) and text[:2] == (8, 8)


# -- C10: get_input_embeddings missing, raising or returning None --------------------------------


def _raise(*_a: Any) -> Any:
    raise NotImplementedError("custom-code model")


def _break_input_embeddings(model: Any, how: str) -> Any:
    if how == "raises":
        model.get_input_embeddings = _raise
        model.model.get_input_embeddings = _raise
    elif how == "returns-none":
        model.get_input_embeddings = lambda: None
        model.model.get_input_embeddings = lambda: None
    elif how == "missing":
        for m in (model, model.model):
            base = type(m)
            m.__class__ = type(f"No{base.__name__}", (base,), {"get_input_embeddings": property(_missing)})
        assert not hasattr(model, "get_input_embeddings")
    return model


def _missing(self: Any) -> Any:
    raise AttributeError("get_input_embeddings")


@pytest.mark.parametrize("how", ["raises", "missing", "returns-none"])
def test_input_embedding_lookup_failures_do_not_crash_and_adapters_train(how: str, model_root: str) -> None:
    """C10: with get_input_embeddings raising NotImplementedError, missing (hasattr False) or
    returning None, on the bnb 4-bit model: the default prepare does not raise, reports
    use_reentrant False and the input-grad hook transformers 5 installs, and the standard step gives 8 grads, 4
    non-zero; with use_reentrant=True prepare does not raise, model.model.embed_tokens (the
    first nn.Embedding) carries exactly one forward hook, and the step gives 8 grads, 4
    non-zero."""
    model = _break_input_embeddings(bnb4(model_root), how)
    report = _prepare(model)
    assert report.use_reentrant is False and report.input_grad_hook is ENABLE_ADDS_INPUT_GRAD_HOOK
    loss, grads = standard_step(add_lora(model))
    assert grad_counts(grads) == (8, 8, 4)

    model = _break_input_embeddings(bnb4(model_root), how)
    report = _prepare(model, gradient_checkpointing_kwargs=REENTRANT)
    assert report.input_grad_hook is True
    assert report.input_grad_modules == ("model.embed_tokens",)
    assert hook_count(model.model.embed_tokens) == 1
    loss, grads = standard_step(add_lora(model))
    assert grad_counts(grads) == (8, 8, 4)


class _EmbedAsLinear(nn.Module):
    """Token embedding done with a parameter and F.embedding: no nn.Embedding anywhere."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight)


@pytest.mark.parametrize("how", ["raises", "missing", "returns-none", "no-embedding"])
def test_entry_module_lookup_never_crashes_or_silently_gives_up(how: str, model_root: str) -> None:
    """C10 whole kind: for each variant (missing, raising, None, and no nn.Embedding at all)
    the reentrant plan never raises; with no nn.Embedding plan.warnings says the adapters will
    get no gradient; otherwise prepare, a second prepare and checkpointing being re-enabled
    leave exactly one input-grad hook on the chosen module."""
    model = bnb4(model_root)
    if how == "no-embedding":
        model.model.embed_tokens = _EmbedAsLinear(model.model.embed_tokens.weight)
        _break_input_embeddings(model, "raises")
        p = kbitprep.plan(model, gradient_checkpointing_kwargs=REENTRANT)
        assert p.input_grad_hook is False
        warning_of(p, "checkpointing", "no gradient")
        return
    _break_input_embeddings(model, how)
    _prepare(model, gradient_checkpointing_kwargs=REENTRANT)
    _prepare(model, gradient_checkpointing_kwargs=REENTRANT)
    assert _input_grad_hooks(model.model.embed_tokens) == 1
    assert sum(_input_grad_hooks(m) for m in model.modules()) == 1


# -- C11: call order on an unquantized model -----------------------------------------------------


def test_unquantized_model_leaves_checkpointing_off_and_adapters_train(model_root: str) -> None:
    """C11 order 1: the unquantized bf16 model is detected as "none", all 21 parameters are
    frozen, checkpointing stays off (report.gradient_checkpointing False) with a warning saying
    why and how to turn it on, and the standard step gives 8 grads, 4 non-zero."""
    model = plain(model_root)
    assert kbitprep.detect_backend(model).backend == "none"
    with pytest.warns(kbitprep.KbitPrepWarning):
        report = kbitprep.prepare(model)
    assert report.frozen == 21
    assert report.gradient_checkpointing is False
    note = warning_of(report, "checkpointing", "not quantized")
    assert "gradient_checkpointing_enable" in note
    loss, grads = standard_step(add_lora(model))
    assert grad_counts(grads) == (8, 8, 4)


def test_unquantized_model_with_reentrant_checkpointing_gets_one_input_grad_hook(model_root: str) -> None:
    """C11 order 2: checkpointing already on and reentrant, then prepare: the input-grad path
    is wired (report.input_grad_hook True), embed_tokens carries exactly one forward hook
    whoever installed it, and the standard step gives 8 grads."""
    model = plain(model_root)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=REENTRANT)
    with pytest.warns(kbitprep.KbitPrepWarning):
        report = kbitprep.prepare(model)
    assert report.input_grad_hook is True and report.use_reentrant is True
    assert hook_count(model.model.embed_tokens) == 1
    _loss, grads = standard_step(add_lora(model))
    assert grad_counts(grads)[:2] == (8, 8)


def test_checkpointing_turned_on_after_prepare_still_gives_gradients_and_one_hook(model_root: str) -> None:
    """C11 order 3: prepare, attach LoRA, then turn on reentrant checkpointing as a trainer
    does: the standard step gives 8 grads and embed_tokens carries exactly one forward hook."""
    model = plain(model_root)
    with pytest.warns(kbitprep.KbitPrepWarning):
        kbitprep.prepare(model)
    peft_model = add_lora(model)
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=REENTRANT)  # type: ignore[operator]
    assert hook_count(model.model.embed_tokens) == 1
    _loss, grads = standard_step(peft_model)
    assert grad_counts(grads)[:2] == (8, 8)


ORDER_KINDS = ["none", "generic", "bnb4", "bnb8", "torchao_hf", "hqq"]


@pytest.mark.parametrize("order", ["prepare", "reentrant-then-prepare", "prepare-lora-then-reentrant"])
@pytest.mark.parametrize("kind", ORDER_KINDS)
def test_adapters_get_gradients_whatever_the_call_order(kind: str, order: str, model_root: str) -> None:
    """C11 whole kind: for none, generic (flagged vptq with int8 storage; the warning names it), bnb 4-bit and
    8-bit, torchao and hqq, in each order of prepare / attaching adapters / enabling reentrant
    checkpointing, the standard step gives 8 LoRA grads and no module carries more than one
    input-grad hook (exactly one on embed_tokens wherever reentrant checkpointing is on)."""
    model = CPU_KINDS[kind](model_root)
    if order == "reentrant-then-prepare":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=REENTRANT)
    report = _prepare(model)
    if kind == "generic":
        warning_of(report, "backend", "'vptq'")
    target = add_lora(model)
    if order == "prepare-lora-then-reentrant":
        if report.gradient_checkpointing:  # a later, different request is applied with a warning
            with pytest.warns(kbitprep.CheckpointingWarning, match="already on"):
                target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=REENTRANT)  # type: ignore[operator]
        else:
            target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=REENTRANT)  # type: ignore[operator]
    hooks = {n: _input_grad_hooks(m) for n, m in model.named_modules() if _input_grad_hooks(m)}
    assert all(v == 1 for v in hooks.values()), hooks
    from kbitprep.steps.checkpoint_transformers import current_use_reentrant

    if current_use_reentrant(model):
        assert hooks == {"model.embed_tokens": 1}
    _loss, grads = standard_step(target)
    assert grad_counts(grads)[:2] == (8, 8)
