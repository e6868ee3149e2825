"""Runtime invariants of ``keep_in_low_precision`` (issue 16, items 2, 4 and 5).

- A trainable parameter is never stored below the upcast dtype unless the user asked for it: a
  peft ``modules_to_save`` copy of a kept module (with or without ``ensure_weight_tying``) is
  stored at the upcast dtype before the optimizer first steps, in place (the optimizer built
  before the first forward holds the same ``Parameter``), the report lists the cast, and
  ``undo`` reverts it.
- A prepared model compiles with no more graph breaks than the same model prepared by peft
  (``torch._dynamo.explain``), with and without checkpointing, and the compiled loss is the eager
  one.
- What ``prepare`` installs walks the model no more often per forward than peft does (training
  and ``generate()``): the adoption hook walks once after modules are registered, then never.
  ``benchmarks/overhead.py`` prints the time this costs on SmolLM2 nf4.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from _lora import add_lora, grad_counts, standard_step
from _models import load, saved_tiny, standard_batch, tiny_config
from _quantized import bnb4_config

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

KEEP = ("lm_head", "embed_tokens")


def _prepare(model: nn.Module, **options: Any) -> kbitprep.PreparationReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kbitprep.KbitPrepWarning)
        return kbitprep.prepare(model, **options)


def _nf4(root: str, compute: torch.dtype = torch.float32, tie: bool = False) -> nn.Module:
    return load(saved_tiny(root, tie=tie), quantization_config=bnb4_config(bnb_4bit_compute_dtype=compute))


def _lora(model: nn.Module, **extra: Any) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, **extra))


# -- item 2: trainable copies of kept modules are stored at the upcast dtype ----------------------


@pytest.mark.parametrize("tying", [False, True], ids=["two-copies", "ensure_weight_tying"])
def test_modules_to_save_copies_of_kept_modules_are_stored_at_the_upcast_dtype_before_the_first_step(
    model_root: str, tying: bool
) -> None:
    """Tied Llama, nf4 with bf16 compute, embeddings and head kept bf16, then peft
    modules_to_save=["embed_tokens", "lm_head"]: peft copies the bf16 weights and makes them
    trainable. The optimizer is built before the first forward (as Trainer does). After one
    step every copy is fp32 (the default upcast dtype), still the Parameter the optimizer holds,
    with fp32 optimizer state; the report names exactly the copies' parameters (a tied one once,
    its other name as tied); undo casts them back to bf16."""
    model = _nf4(model_root, torch.bfloat16, tie=True)
    report = _prepare(model, keep_in_low_precision=KEEP)
    peft_model = _lora(model, modules_to_save=["embed_tokens", "lm_head"], ensure_weight_tying=tying)
    copies = {n: p for n, p in model.named_parameters(remove_duplicate=False) if ".modules_to_save." in n}
    assert len(copies) == 2 and all(p.dtype == torch.bfloat16 and p.requires_grad for p in copies.values())
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    peft_model.train()
    ids = standard_batch()
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    optimizer.step()
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, param in copies.items():
        assert param.dtype == torch.float32, name
        assert id(param) in held and optimizer.state[param]["exp_avg"].dtype == torch.float32, name
    assert bool(torch.isfinite(out.loss)) and out.logits.dtype == torch.float32
    assert report.trainable_dtype == torch.float32
    assert {n for c in report.trainable_casts for n in (c.name, *c.tied)} == set(copies)
    assert len(report.trainable_casts) == len({id(p) for p in copies.values()})
    assert {(c.from_dtype, c.to_dtype) for c in report.trainable_casts} == {(torch.bfloat16, torch.float32)}
    report.undo()
    assert all(p.dtype == torch.bfloat16 for p in copies.values())


def _seq_classifier(root: str) -> nn.Module:
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    path = Path(root) / "tiny-seqcls-float16"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        cfg = tiny_config(pad_token_id=0, num_labels=2)
        LlamaForSequenceClassification(cfg).to(torch.float16).save_pretrained(path)  # type: ignore[arg-type]
    model: nn.Module = AutoModelForSequenceClassification.from_pretrained(
        path,
        dtype=torch.float16,
        device_map="cpu",
        quantization_config=bnb4_config(bnb_4bit_compute_dtype=torch.float32),
    )
    return model


def test_fp16_classifier_with_its_score_kept_does_not_go_nan_after_one_adamw_step(model_root: str) -> None:
    """fp16 LlamaForSequenceClassification, nf4, score kept fp16; peft task_type SEQ_CLS makes a
    trainable modules_to_save copy of score. With the loss scaled by 1/100 (as gradient
    accumulation over 100 micro-batches does), AdamW on an fp16 copy divides by an eps that
    rounds to zero in fp16 and the weights go NaN; stored fp32 they stay finite."""
    from peft import LoraConfig, get_peft_model

    model = _seq_classifier(model_root)
    report = _prepare(model, keep_in_low_precision=("score",))
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS", lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    score = dict(model.named_parameters())["score.modules_to_save.default.weight"]
    assert score.dtype == torch.float16 and score.requires_grad
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    peft_model.train()
    ids = torch.randint(1, 1000, (4, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0, 1])
    losses = []
    for _ in range(2):
        out = peft_model(input_ids=ids, labels=labels)
        (out.loss / 100).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out.loss.detach()))
    assert score.dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(losses))) and bool(torch.isfinite(score).all())
    assert [c.name for c in report.trainable_casts] == ["score.modules_to_save.default.weight"]


def test_upcast_none_asks_for_storage_as_it_is() -> None:
    """The plan states the dtype trainable copies get: the upcast dtype, or None when the user
    asked to keep storage as it is (upcast="none")."""
    model = nn.Sequential(nn.Linear(4, 4).to(torch.bfloat16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kbitprep.KbitPrepWarning)
        assert kbitprep.plan(model, upcast="none").trainable_dtype is None
        assert kbitprep.plan(model, upcast_dtype=torch.float64).trainable_dtype == torch.float64


def test_a_deepcopy_of_a_prepared_model_stores_its_own_copies_wide(model_root: str) -> None:
    """The rule travels with copy.deepcopy: modules_to_save on the deep copy of a prepared model
    trains its lm_head copy in fp32, and the original model is untouched."""
    model = _nf4(model_root)
    _prepare(model, keep_in_low_precision=KEEP)
    clone = copy.deepcopy(model)
    peft_model = _lora(clone, modules_to_save=["lm_head"])
    _loss, grads = standard_step(peft_model)
    assert grad_counts(grads)[:2] == (8, 8)
    assert dict(clone.named_parameters())["lm_head.modules_to_save.default.weight"].dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_torch_compile_wrapping_stores_the_copies_wide_before_any_forward(model_root: str) -> None:
    """torch.compile(model) right after get_peft_model (no eager forward in between, as Trainer
    with torch_compile does): the lm_head copy is fp32 as soon as the model is wrapped."""
    model = _nf4(model_root)
    _prepare(model, keep_in_low_precision=KEEP)
    peft_model = _lora(model, modules_to_save=["lm_head"])
    head = dict(model.named_parameters())["lm_head.modules_to_save.default.weight"]
    assert head.dtype == torch.bfloat16
    torch.compile(peft_model, backend="aot_eager")
    assert head.dtype == torch.float32


# -- item 4: compile-friendly ---------------------------------------------------------------------


def _peft_prepared(root: str, checkpointing: bool) -> nn.Module:
    from peft import prepare_model_for_kbit_training

    model = _nf4(root)
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    return model


def _kbit_prepared(root: str, checkpointing: bool, **options: Any) -> nn.Module:
    model = _nf4(root)
    _prepare(model, use_gradient_checkpointing=checkpointing, **options)
    return model


def _graph_breaks(model: nn.Module) -> int:
    peft_model = add_lora(model)
    peft_model.train()
    ids = standard_batch()
    explained = torch._dynamo.explain(peft_model)(input_ids=ids, labels=ids)
    return int(explained.graph_break_count)


@functools.cache
def _peft_graph_breaks(root: str, checkpointing: bool) -> int:
    return _graph_breaks(_peft_prepared(root, checkpointing))


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no-checkpointing"])
def test_prepared_models_compile_with_no_more_graph_breaks_than_peft(model_root: str, checkpointing: bool) -> None:
    """LoRA on q/v of the nf4 tiny Llama (fp32 compute), counted by torch._dynamo.explain:
    kbitprep's defaults and keep=("lm_head", "embed_tokens") break the graph no more often than
    peft's prepare_model_for_kbit_training."""
    peft = _peft_graph_breaks(model_root, checkpointing)
    defaults = _graph_breaks(_kbit_prepared(model_root, checkpointing))
    kept = _graph_breaks(_kbit_prepared(model_root, checkpointing, keep_in_low_precision=KEEP))
    assert defaults <= peft and kept <= peft, f"graph breaks: peft {peft}, defaults {defaults}, keep {kept}"


@pytest.mark.slow
def test_kept_norms_in_checkpointed_blocks_compile_to_the_eager_loss(model_root: str) -> None:
    """keep=("lm_head", "embed_tokens", "input_layernorm") with checkpointing: every rule (the
    kept Linear and Embedding, and a norm inside each checkpointed block bringing its bf16
    weight up at use). Compiled with aot_eager, the graph breaks no more often than peft's
    (counted as the graphs the backend receives, minus one), and the step-1 loss and the LoRA
    gradients are the eager ones, bit for bit."""
    model = _kbit_prepared(model_root, True, keep_in_low_precision=(*KEEP, "input_layernorm"))
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    peft_model = add_lora(model)
    peft_model.train()
    ids = standard_batch()
    lora = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    eager = peft_model(input_ids=ids, labels=ids).loss
    eager.backward()
    eager_grads = [p.grad.clone() for p in lora]  # type: ignore[union-attr]
    peft_model.zero_grad()

    graphs: list[torch.fx.GraphModule] = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def counting(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(peft_model, backend=counting)(input_ids=ids, labels=ids).loss
    compiled.backward()
    assert torch.equal(compiled, eager)
    assert all(torch.equal(p.grad, g) for p, g in zip(lora, eager_grads, strict=True))  # type: ignore[arg-type]
    peft = _peft_graph_breaks(model_root, True)
    assert len(graphs) - 1 <= peft, f"graph breaks: peft {peft}, keep with norms {len(graphs) - 1}"


# -- item 5: no per-forward walk ------------------------------------------------------------------


class _Walks:
    """Counts ``named_modules`` calls on one model object (``modules()`` goes through it too)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.targets: list[nn.Module] = []
        self.count = 0
        original = nn.Module.named_modules

        def counted(module: nn.Module, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]:
            if any(module is t for t in self.targets):
                self.count += 1
            return original(module, *args, **kwargs)

        monkeypatch.setattr(nn.Module, "named_modules", counted)

    def during(self, model: nn.Module, run: Callable[[], object]) -> int:
        self.targets, self.count = [model], 0
        run()
        self.targets = []
        return self.count


def _train_and_generate(peft_model: nn.Module) -> Callable[[], None]:
    ids = standard_batch(1, 8)

    def run() -> None:
        peft_model.train()
        for _ in range(3):
            peft_model(input_ids=ids, labels=ids).loss.backward()
        peft_model.eval()
        with torch.no_grad():
            peft_model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)  # type: ignore[operator]

    return run


def test_forwards_walk_the_model_no_more_than_peft_and_a_registration_costs_one_walk(
    model_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three training forwards and a 3-token generate() walk the model (named_modules / modules)
    as often with keep as with peft's prepare; after a module is added, the next forward walks
    once more (and adopts it: a bf16 nn.Linear computes at the fp32 compute dtype), the one after
    it no more."""
    walks = _Walks(monkeypatch)
    peft_base = _peft_prepared(model_root, True)
    peft_run = _train_and_generate(add_lora(peft_base))
    peft_run()  # warm-up, as for the kept model below
    baseline = walks.during(peft_base, peft_run)

    kept = _kbit_prepared(model_root, True, keep_in_low_precision=KEEP)
    kept_run = _train_and_generate(add_lora(kept))
    kept_run()  # the first forward walks once: LoRA was added after prepare
    assert walks.during(kept, kept_run) == baseline

    ids = standard_batch(1, 8)
    one_peft = walks.during(peft_base, lambda: peft_base(input_ids=ids))
    kept.model.extra = nn.Linear(64, 64, dtype=torch.bfloat16)
    assert walks.during(kept, lambda: kept(input_ids=ids)) == one_peft + 1
    assert walks.during(kept, lambda: kept(input_ids=ids)) == one_peft
    assert kept.model.extra(torch.ones(1, 64, dtype=torch.bfloat16)).dtype == torch.float32
