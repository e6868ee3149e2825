"""One compute dtype per model (issue 11; C20, C21, C22 and C03/C04's kind across architectures).

Every architecture family the tests build (decoder-only Llama, encoder-decoder T5, the Llava VLM,
Whisper's audio encoder), each loaded 4-bit by bitsandbytes, under every policy (auto, a keep
pattern, ``upcast="none"``, a partial callable): the LoRA step runs with no dtype mismatch
anywhere (sub-model boundaries and floating model inputs included), every LoRA tensor gets a
gradient, and the output dtype is the one the plan says the output module computes in.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from _lora import add_lora, grad_counts, standard_step
from _matrix import ARCHS as MATRIX
from _matrix import _ids
from _matrix import _llava_batch as _batch_llava
from _matrix import _lm_batch as _batch_lm
from _matrix import _t5_batch as _batch_t5
from _matrix import _whisper_batch as _batch_whisper
from _measure import plan_compute_dtype
from _models import load, saved_tiny
from _plan_warnings import warning_of
from _quantized import bnb4_config
from kbitprep.steps.cast_at_use import spec_of

pytest.importorskip("bitsandbytes")


def _saved(root: str, name: str, build: Callable[[], nn.Module]) -> str:
    path = Path(root) / name
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        build().to(torch.bfloat16).save_pretrained(path)
    return str(path)


def _load(path: str, cls: Any, compute: torch.dtype) -> nn.Module:
    model: nn.Module = cls.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=bnb4_config(bnb_4bit_compute_dtype=compute)
    )
    return model


def t5(root: str, compute: torch.dtype = torch.bfloat16) -> nn.Module:
    from transformers import T5ForConditionalGeneration

    return _load(_saved(root, "t5", MATRIX["t5"].build), T5ForConditionalGeneration, compute)


def whisper(root: str, compute: torch.dtype = torch.bfloat16) -> nn.Module:
    from transformers import WhisperForConditionalGeneration

    return _load(_saved(root, "whisper", MATRIX["whisper"].build), WhisperForConditionalGeneration, compute)


def llava(root: str, compute: torch.dtype = torch.bfloat16) -> nn.Module:
    from transformers import LlavaForConditionalGeneration

    return _load(_saved(root, "llava", MATRIX["llava"].build), LlavaForConditionalGeneration, compute)


def llama(root: str, compute: torch.dtype = torch.bfloat16) -> nn.Module:
    return load(saved_tiny(root), quantization_config=bnb4_config(bnb_4bit_compute_dtype=compute))


# family -> (builder, LoRA targets, keep pattern, output module, batch builder)
FAMILIES: dict[str, tuple[Callable[..., nn.Module], list[str], tuple[str, ...], str, Callable[..., Any]]] = {
    "decoder-only": (llama, ["q_proj", "v_proj"], ("lm_head", "embed_tokens"), "lm_head", _batch_lm),
    "encoder-decoder": (t5, ["q", "v"], ("lm_head", "shared"), "lm_head", _batch_t5),
    "vlm": (llava, ["q_proj", "v_proj"], ("lm_head", "embed_tokens"), "lm_head", _batch_llava),
    "audio": (whisper, ["q_proj", "v_proj"], ("proj_out", "embed_tokens"), "proj_out", _batch_whisper),
}


def norm_only(name: str, param: nn.Parameter, module: nn.Module) -> bool:
    return "norm" in name


def _policy(name: str, keep: tuple[str, ...]) -> dict[str, Any]:
    return {
        "auto": {},
        "keep": {"keep_in_low_precision": keep},
        "none": {"upcast": "none"},
        "partial": {"upcast": norm_only},
    }[name]


def _prepare(model: nn.Module, **options: Any) -> kbitprep.PreparationReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kbitprep.KbitPrepWarning)
        return kbitprep.prepare(model, **options)


def _lora(model: nn.Module, targets: list[str]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))


def _input_dtype(report: kbitprep.PreparationReport, name: str) -> torch.dtype:
    """bf16 features (what a bf16 feature extractor yields) when kbitprep casts them; else the
    dtype the plan names for them."""
    for item in report.model_inputs:
        if item.name == name and not item.cast:
            return item.dtype
    return torch.bfloat16


@pytest.mark.parametrize("policy", ["auto", "keep", "none", "partial"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_and_policy_trains_with_the_planned_output_dtype(
    family: str, policy: str, model_root: str
) -> None:
    build, targets, keep, head, batch = FAMILIES[family]
    model = build(model_root)
    report = _prepare(model, **_policy(policy, keep))
    expected = plan_compute_dtype(report, model, head)
    features = _input_dtype(report, "input_features" if family == "audio" else "pixel_values")
    peft_model = _lora(model, targets)
    peft_model.train()
    out = peft_model(**batch(features))
    assert out.logits.dtype == expected
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)


def test_t5_keep_low_crosses_the_encoder_decoder_boundary(model_root: str) -> None:
    """C20: T5 4-bit (compute bf16), keep lm_head and shared: the step runs and all 24 LoRA
    tensors get gradients. Issue 16: keep changes storage only, so lm_head computes in fp32 as
    it does without keep (peft's upcast), and the logits are fp32 (they were bf16 before)."""
    model = t5(model_root)
    report = _prepare(model, keep_in_low_precision=("lm_head", "shared"))
    assert plan_compute_dtype(report, model, "lm_head") == torch.float32
    assert report.compute_dtype == torch.bfloat16 and report.activation_dtype == torch.float32
    peft_model = _lora(model, ["q", "v"])
    peft_model.train()
    out = peft_model(**_batch_t5(torch.bfloat16))
    out.loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert len(grads) == 24 and all(g is not None for g in grads)
    assert out.logits.dtype == torch.float32


def test_whisper_default_plan_names_the_entry_module_and_dtype(model_root: str) -> None:
    """C21 with peft's policy: nothing is added, and the plan names input_features, the module
    that takes it (model.encoder.conv1, now fp32) and a warning; fp32 features train 24/24."""
    model = whisper(model_root)
    p = kbitprep.plan(model)
    entry = {i.name: i for i in p.model_inputs}["input_features"]
    assert (entry.module, entry.dtype, entry.cast) == ("model.encoder.conv1", torch.float32, False)
    assert "model.encoder.conv1" in warning_of(p, "precision", "'input_features' must now be torch.float32")
    assert p.precision == ()
    _prepare(model)
    peft_model = _lora(model, ["q_proj", "v_proj"])
    peft_model.train()
    out = peft_model(**_batch_whisper(torch.float32))
    out.loss.backward()
    assert sum(1 for n, q in peft_model.named_parameters() if "lora_" in n and q.grad is not None) == 24


def test_whisper_features_under_a_keep_policy_need_what_they_need_without_it(model_root: str) -> None:
    """C21 under a keep pattern. Issue 16: keep changes storage only, so the plan's model inputs
    and their warning are those of the same call without keep (input_features fp32 at
    model.encoder.conv1, left to the caller; kbitprep added an input cast under keep before),
    and fp32 features train 24/24."""
    keep = {"keep_in_low_precision": ("proj_out", "embed_tokens")}
    assert kbitprep.plan(whisper(model_root), **keep).model_inputs == kbitprep.plan(whisper(model_root)).model_inputs
    model = whisper(model_root)
    report = _prepare(model, **keep)
    entry = {i.name: i for i in report.model_inputs}["input_features"]
    assert (entry.module, entry.dtype, entry.cast) == ("model.encoder.conv1", torch.float32, False)
    warning_of(report, "precision", "'input_features' must now be torch.float32")
    peft_model = _lora(model, ["q_proj", "v_proj"])
    peft_model.train()
    out = peft_model(**_batch_whisper(torch.float32))
    out.loss.backward()
    assert sum(1 for n, q in peft_model.named_parameters() if "lora_" in n and q.grad is not None) == 24


# -- C22's kind: kept-low modules compute at the compute dtype -----------------------------------


def _peft_loss(model: nn.Module) -> float:
    from peft import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(model)
    torch.manual_seed(0)
    loss, _grads = standard_step(add_lora(model))
    return loss


def _kept_loss(model: nn.Module, **options: Any) -> tuple[float, kbitprep.PreparationReport]:
    report = _prepare(model, **options)
    torch.manual_seed(0)
    loss, grads = standard_step(add_lora(model))
    assert grad_counts(grads) == (8, 8, 4)
    return loss, report


def test_kept_low_modules_compute_in_fp32_and_match_peft_exactly(model_root: str) -> None:
    """C22 on the tiny Llama with fp32 compute: keeping lm_head and embed_tokens bf16 gives
    peft's step-1 loss to the last bit (bf16 -> fp32 is exact), with 128,000 + 128,000 bytes
    of upcast saved (two 1000 x 64 tensors, 2 bytes each instead of 4)."""
    peft = _peft_loss(llama(model_root, torch.float32))
    loss, report = _kept_loss(llama(model_root, torch.float32), keep_in_low_precision=("lm_head", "embed_tokens"))
    assert loss == peft
    assert report.compute_dtype == torch.float32
    rows = {r.name: r for r in report.precision}
    for name in ("model.embed_tokens", "lm_head"):
        assert (rows[name].stored, rows[name].computes, rows[name].upcast_at_use) == (
            torch.bfloat16,
            torch.float32,
            ("weight",),
        )
    assert report.bytes_delta == 640  # only the five 64-element norms, bf16 -> fp32
    none_loss, none_report = _kept_loss(llama(model_root, torch.float32), upcast="none")
    assert none_report.bytes_delta == 0 and none_loss == peft


def test_defaults_add_no_compute_rule(model_root: str) -> None:
    """With no keep pattern or partial policy, nothing is added: exactly peft."""
    model = llama(model_root)
    report = _prepare(model)
    assert report.precision == ()
    assert not any(spec_of(m) is not None for m in model.modules())


# -- the rule survives what users do after prepare ------------------------------------------------


def _kept(root: str) -> tuple[nn.Module, kbitprep.PreparationReport]:
    model = llama(root, torch.float32)
    return model, _prepare(model, keep_in_low_precision=("lm_head", "embed_tokens"))


def test_deepcopy_and_state_dict_keep_the_rule_and_the_keys(model_root: str) -> None:
    model = llama(model_root, torch.float32)
    keys = list(model.state_dict())
    _prepare(model, keep_in_low_precision=("lm_head", "embed_tokens"))
    assert list(model.state_dict()) == keys
    clone = copy.deepcopy(model)
    assert spec_of(clone.lm_head) is not None and spec_of(clone.lm_head).dtype == torch.float32  # type: ignore[union-attr]
    ids = _ids(2, 8)
    assert clone(ids).logits.dtype == torch.float32
    assert torch.equal(clone(ids).logits, model(ids).logits)


def test_undo_is_bit_exact_and_removes_the_rule(model_root: str) -> None:
    model = llama(model_root, torch.float32)
    before = {n: (p.dtype, p.detach().clone()) for n, p in model.named_parameters()}
    classes = {n: type(m) for n, m in model.named_modules()}
    report = _prepare(model, keep_in_low_precision=("lm_head",), upcast="none")
    assert type(model.lm_head) is not classes["lm_head"]
    report.undo()
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not any(spec_of(m) is not None for m in model.modules())
    for n, p in model.named_parameters():
        assert p.dtype == before[n][0] and torch.equal(p.detach(), before[n][1]), n


def test_modules_to_save_copy_keeps_the_rule_and_trains_at_the_upcast_dtype(model_root: str) -> None:
    """peft's modules_to_save deep-copies lm_head (kept bf16) after prepare: the copy keeps the
    rule, and at the first forward its trainable weight is stored in fp32 (the upcast dtype), in
    place, with no warning; the report lists the cast."""
    from peft import LoraConfig, get_peft_model

    model, report = _kept(model_root)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    copies = [m for n, m in peft_model.named_modules() if n.endswith("modules_to_save.default")]
    assert copies and spec_of(copies[0]) is not None
    _loss, grads = standard_step(peft_model)
    assert grad_counts(grads)[:2] == (8, 8)
    trained = dict(peft_model.named_parameters())
    head = [p for n, p in trained.items() if "modules_to_save" in n]
    assert head and all(p.grad is not None and p.dtype == torch.float32 for p in head)
    assert [c.name for c in report.trainable_casts] == ["lm_head.modules_to_save.default.weight"]


def test_weight_tying_with_modules_to_save_keeps_one_compute_dtype(model_root: str) -> None:
    """A tied embedding and lm_head kept low, with peft's ensure_weight_tying: the step runs and
    the logits are fp32 (the compute dtype)."""
    from peft import LoraConfig, get_peft_model

    model = load(
        saved_tiny(model_root, tie=True), quantization_config=bnb4_config(bnb_4bit_compute_dtype=torch.float32)
    )
    _prepare(model, keep_in_low_precision=("embed_tokens",))
    cfg = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"], ensure_weight_tying=True
    )
    peft_model = get_peft_model(model, cfg)
    peft_model.train()
    ids = _ids(2, 8)
    out = peft_model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.float32
    out.loss.backward()


@pytest.mark.parametrize("options", [{}, {"keep_in_low_precision": ("lm_head", "embed_tokens")}, {"upcast": "none"}])
def test_modules_to_save_attached_before_prepare_follows_the_policy_and_trains(
    model_root: str, options: dict[str, Any]
) -> None:
    """peft first, then prepare (the unusual order): the trainable modules_to_save copy of lm_head
    is cast by the policy like the module it copies (peft 0.21 casts every fp16/bf16 parameter),
    never held low by a keep pattern, and the step runs (no 'expected m1 and m2 to have the same
    dtype'), with a gradient for every LoRA tensor and the copy."""
    from peft import LoraConfig, get_peft_model

    model = llama(model_root)  # bf16 storage, bf16 compute
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    copy_name = "base_model.model.lm_head.modules_to_save.default.weight"
    report = _prepare(peft_model, **options)
    head = dict(peft_model.named_parameters())[copy_name]
    assert head.requires_grad
    assert head.dtype == (torch.bfloat16 if options.get("upcast") == "none" else torch.float32)
    assert (copy_name in {c.name for c in report.casts}) == (options.get("upcast") != "none")
    _loss, grads = standard_step(peft_model)
    assert grad_counts(grads)[:2] == (8, 8)
    assert head.grad is not None and bool(head.grad.abs().sum() > 0)


def test_a_second_prepare_on_the_peft_model_leaves_one_adoption_hook_and_trains(model_root: str) -> None:
    """prepare (keep patterns) -> get_peft_model(modules_to_save) -> prepare again on the PeftModel:
    exactly one adoption hook in the whole model, the copy computes in one dtype, the step runs."""
    from peft import LoraConfig, get_peft_model

    from kbitprep.steps.cast_at_use import _Adopt

    keep = {"keep_in_low_precision": ("lm_head", "embed_tokens")}
    model = llama(model_root)
    _prepare(model, **keep)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    _prepare(peft_model, **keep)
    adopters = [h for m in peft_model.modules() for h in m._forward_pre_hooks.values() if isinstance(h, _Adopt)]
    assert len(adopters) == 1
    _loss, grads = standard_step(peft_model)
    assert grad_counts(grads)[:2] == (8, 8)


def test_modules_adopted_after_prepare_are_reverted_by_undo(model_root: str) -> None:
    """A bf16 nn.Linear added after prepare (compute dtype fp32, lm_head kept bf16) adopts the
    rule at the next forward; undo() takes it off again: the module is a plain nn.Linear and
    returns bf16 for bf16 input, as before prepare."""
    model = llama(model_root, torch.float32)
    report = _prepare(model, keep_in_low_precision=("lm_head",))
    model.extra = nn.Linear(64, 64, dtype=torch.bfloat16)
    model(_ids(1, 4))
    assert spec_of(model.extra) is not None and type(model.extra) is not nn.Linear
    report.undo()
    assert type(model.extra) is nn.Linear and spec_of(model.extra) is None
    assert model.extra(torch.ones(1, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_a_module_with_the_rule_pickles_and_keeps_it(model_root: str) -> None:
    """torch.save / pickle of a module carrying the compute-dtype rule: it loads back with the
    rule (same spec, computes fp32 from its bf16 weight) and the same output, bit for bit."""
    import io

    model, _report = _kept(model_root)
    buffer = io.BytesIO()
    torch.save(model.lm_head, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert spec_of(loaded) == spec_of(model.lm_head) and loaded.weight.dtype == torch.bfloat16
    x = torch.randn(2, 64)
    assert loaded(x).dtype == torch.float32 and torch.equal(loaded(x), model.lm_head(x))
