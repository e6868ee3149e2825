"""The checkpointing step's layout options (issue 13): activation offload, every n-th layer,
and checkpointing only the blocks that hold trainable parameters. Each is a plan/prepare
keyword, shown in the plan, and undone by ``undo()``."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from _lora import grad_counts, standard_step
from _models import ENABLE_ADDS_INPUT_GRAD_HOOK, load, saved_tiny
from _plan_warnings import warning_of
from _quantized import bnb4_config

pytest.importorskip("bitsandbytes")
tf5_only = pytest.mark.skipif(
    not ENABLE_ADDS_INPUT_GRAD_HOOK, reason="needs transformers 5 activation_checkpointing_enable"
)


def _model(root: str) -> nn.Module:
    return load(saved_tiny(root), quantization_config=bnb4_config())


def _prepare(model: nn.Module, **options: Any) -> kbitprep.PreparationReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kbitprep.KbitPrepWarning)
        return kbitprep.prepare(model, **options)


def _lora(model: nn.Module, layers: list[int] | None = None) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, layers_to_transform=layers,
        init_lora_weights=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return get_peft_model(model, cfg)


def _flags(model: nn.Module) -> list[bool]:
    return [bool(layer.gradient_checkpointing) for layer in model.model.layers]  # type: ignore[union-attr]


@tf5_only
def test_offload_on_a_cpu_model_is_not_applied_and_says_why(model_root: str) -> None:
    """transformers 5.24's offload wraps checkpoints in save_on_cpu(pin_memory=True), which
    raises without an accelerator; on the CPU the activations are in host memory already."""
    model = _model(model_root)
    report = _prepare(model, activation_offload=True)
    assert report.activation_offload is False
    warning_of(report, "checkpointing", "activation_offload=True is not applied")
    _loss, grads = standard_step(_lora(model))
    assert grad_counts(grads) == (8, 8, 4)


def _cuda_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    model.train()
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.cpu() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


@pytest.mark.gpu
def test_offload_on_cuda_trains_with_the_same_gradients(model_root: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (gpu marker); run `nox -s tests_gpu` on a GPU machine")
    plain = load(saved_tiny(model_root), quantization_config=bnb4_config()).cuda()
    _prepare(plain)
    want = _cuda_grads(_lora(plain))
    model = load(saved_tiny(model_root), quantization_config=bnb4_config()).cuda()
    report = _prepare(model, activation_offload=True)
    assert report.activation_offload is True
    got = _cuda_grads(_lora(model))
    assert len(want) == 8
    for name, grad in want.items():
        assert torch.allclose(got[name], grad, atol=1e-5), name
    report.undo()
    assert _flags(model) == [False, False]


@tf5_only
def test_every_n_layers_checkpoints_every_second_block(model_root: str) -> None:
    """transformers flags every second block; the count is what a training forward of the model
    as it stands checkpoints: with no adapter yet every block is a frozen prefix (issue 16), with
    adapters on both blocks block 0 is checkpointed and block 1 keeps its activations."""
    model = _model(model_root)
    p = kbitprep.plan(model, checkpoint_every_n_layers=2)
    assert (p.checkpoint_every_n_layers, p.checkpointed_blocks) == (2, (0, 2))
    _prepare(model, checkpoint_every_n_layers=2)
    assert _flags(model) == [True, False]
    peft_model = _lora(model)
    assert kbitprep.plan(peft_model, checkpoint_every_n_layers=2).checkpointed_blocks == (1, 2)
    standard_step(peft_model)
    assert _flags(model) == [True, False]


@tf5_only
def test_only_blocks_with_trainable_parameters_are_checkpointed(model_root: str) -> None:
    """Adapters on layer 1 only: at the training forward, layer 0 (a frozen prefix, issue 16) is
    not checkpointed and layer 1 is; the gradients are those of checkpointing every block, to the
    bit."""
    full = _model(model_root)
    _prepare(full)
    _loss, want = standard_step(_lora(full, [1]))

    model = _model(model_root)
    p = kbitprep.plan(model, checkpoint_trainable_blocks_only=True)
    assert p.checkpoint_trainable_blocks_only and p.checkpointed_blocks == (0, 2)  # no adapter yet
    report = _prepare(model, checkpoint_trainable_blocks_only=True)
    peft_model = _lora(model, [1])
    _loss, got = standard_step(peft_model)
    assert _flags(model) == [False, True]
    assert grad_counts(got) == (4, 4, 2)
    for name, grad in want.items():
        assert torch.equal(got[name], grad), name  # type: ignore[arg-type]
    assert kbitprep.plan(peft_model, checkpoint_trainable_blocks_only=True).checkpointed_blocks == (1, 2)
    report.undo()
    assert _flags(model) == [False, False]


@pytest.mark.skipif(ENABLE_ADDS_INPUT_GRAD_HOOK, reason="transformers 5 supports offload and every_n_layers")
@pytest.mark.parametrize("option", [{"activation_offload": True}, {"checkpoint_every_n_layers": 2}])
def test_layout_options_are_refused_on_transformers_4(option: dict[str, Any], model_root: str) -> None:
    model = _model(model_root)
    with pytest.raises(kbitprep.InvalidArgumentError, match="transformers 5.24"):
        kbitprep.plan(model, **option)


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_every_n_layers_must_be_a_positive_int(value: Any, model_root: str) -> None:
    with pytest.raises(kbitprep.InvalidArgumentError, match="checkpoint_every_n_layers"):
        kbitprep.plan(_model(model_root), checkpoint_every_n_layers=value)
